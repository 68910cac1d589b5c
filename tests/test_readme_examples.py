"""The README's examples of reading the outputs (DuckDB, polars) work as written.

Every fenced block in README.md whose info string is ``python readme-example`` is executed
against the tables of a tiny run, with ``OUTPUT`` set to that run's output root (the README
tells readers to set it to their own ``output.root``). Each example must print something.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from tests.report_tables import write_run

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]+readme-example[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def examples(markdown: str) -> list[str]:
    """The code of every ```python readme-example block, in order."""
    return [m.group(1) for m in FENCE.finditer(markdown)]


def test_example_blocks_are_found_and_others_ignored():
    md = ("text\n```python readme-example\nprint(1)\n```\n```python\nprint(2)\n```\n"
          "```bash\nls\n```\n```python readme-example\nx = 3\nprint(x)\n```\n")
    assert examples(md) == ["print(1)\n", "x = 3\nprint(x)\n"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("readme_run"))
    write_run(cfg)
    return cfg.output.root


def _readme_examples() -> list[str]:
    return examples(README.read_text(encoding="utf-8")) if README.exists() else []


def test_readme_has_examples():
    assert len(_readme_examples()) >= 3, (
        "README.md must hold three or four ```python readme-example blocks that read the "
        "outputs with DuckDB / polars (they are executed by this test)")


@pytest.mark.parametrize("index", range(len(_readme_examples())))
def test_readme_example_runs(tiny_run, index):
    code = _readme_examples()[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md example {index + 1}", "exec"), {"OUTPUT": tiny_run})
    assert out.getvalue().strip(), f"README example {index + 1} printed nothing:\n{code}"
