"""docs/design.md's "Tables and their owners" list matches the code: the same tables, each with
the owning stage and the module whose name constant and schema define it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from pipeline.run import STAGES
from pipeline.schemas import ERRORS, ERRORS_SCHEMA

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
ROW = re.compile(r"^\| `([^`]+)` \| ([a-z_ ]+) \| `([\w.]+)\.(\w+)`, `(\w+)` \|")


def _documented() -> dict[str, tuple[str, str, str, str]]:
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Tables and their owners", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            name, owner, module, const, schema = m.groups()
            assert name not in rows, f"{name} is listed twice"
            rows[name] = (owner.strip(), module, const, schema)
    return rows


def _in_code() -> dict[str, tuple[str, str, object]]:
    """table -> (owning stage, module, schema) from every stage's SCHEMAS."""
    out = {ERRORS: ("every stage", "pipeline.schemas", ERRORS_SCHEMA)}
    for stage in STAGES:
        for name, schema in getattr(importlib.import_module(stage.module), "SCHEMAS", {}).items():
            assert name not in out, f"{name} is claimed by two stages"
            out[name] = (stage.name, stage.module, schema)
    return out


def test_design_doc_lists_every_table_with_its_owner_and_definition():
    doc, code = _documented(), _in_code()
    assert sorted(doc) == sorted(code), (sorted(set(code) - set(doc)), sorted(set(doc) - set(code)))
    for name, (owner, module, const, schema) in doc.items():
        stage, _, code_schema = code[name]
        assert owner == stage, f"{name}: design.md says {owner}, the code {stage}"
        mod = importlib.import_module(module)
        assert getattr(mod, const) == name, f"{name}: {module}.{const} is not its name"
        assert getattr(mod, schema) is code_schema, f"{name}: {module}.{schema} is not its schema"
