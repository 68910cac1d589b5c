"""No module of the project uses another module's private (underscore) names.

The rule, for every module M under ``pipeline/`` and ``jobs/`` whose package is P (for a
package's ``__init__.py``, P is the package itself):

1. ``from A import _x`` only when A is P: a package's modules may import its private modules
   (``from pipeline.report import _plots``), never a private name of another module
   (``from pipeline.models import _apply``).
2. A private module ``O._m`` in any import (``import O._m``, ``from O._m import y``) only from
   inside O's package: ``pipeline/classify/_stage.py`` may import ``pipeline.classify._data``,
   ``pipeline/benchmarks/classify.py`` may not (it imports what ``pipeline.classify`` exports).
3. ``X._y`` where X was bound by an import (``from pipeline import extract`` then
   ``extract._decode_block``) never.

Dunder names (``__version__``) are not private. Tests are outside the rule: a unit test may pin
down a private step of the module it tests; nothing that ships may depend on one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCOPE = ("pipeline", "jobs")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path) -> tuple[str, str]:
    """(module, package) of a file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private_module_outside(dotted: str, package: str) -> str | None:
    """The first private segment of ``dotted`` whose owner does not contain ``package``."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        owner = ".".join(parts[:i])
        if _private(part) and not (package == owner or package.startswith(owner + ".")):
            return ".".join(parts[: i + 1])
    return None


def violations(path: Path) -> list[str]:
    module, package = _module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    out, imported = [], set()
    where = f"{path.relative_to(ROOT)}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(node, package)
            bad = _private_module_outside(source, package)
            if bad:
                out.append(f"{where}:{node.lineno}: imports private module {bad}")
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if _private(alias.name) and source != package:
                    out.append(f"{where}:{node.lineno}: imports {source}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported.add(alias.asname or alias.name.split(".")[0])
                bad = _private_module_outside(alias.name, package)
                if bad:
                    out.append(f"{where}:{node.lineno}: imports private module {bad}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in imported):
            out.append(f"{where}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return out


def _files() -> list[Path]:
    return sorted(p for d in SCOPE for p in (ROOT / d).rglob("*.py"))


def test_no_module_uses_another_modules_private_names():
    found = [v for p in _files() for v in violations(p)]
    assert not found, ("private names used across modules (make the name public in its owner, "
                       "documented, or move it):\n" + "\n".join(found))


def test_the_check_catches_each_kind_of_use(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    pkg = tmp_path / "pipeline" / "bench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pipeline.bench import _own\n")  # own package: fine
    own = pkg / "_own.py"
    own.write_text("from ._other import thing\nfrom pipeline import x\n")  # fine
    bad = pkg / "b.py"
    bad.write_text("from pipeline.models import _apply\n"
                   "from pipeline.classify._data import load_inputs\n"
                   "import pipeline.cluster._stage\n"
                   "from pipeline import extract\n"
                   "extract._decode_block(None)\n"
                   "extract.__name__\n")
    assert violations(pkg / "__init__.py") == [] and violations(own) == []
    assert [v.split(": ", 1)[1] for v in violations(bad)] == [
        "imports pipeline.models._apply",
        "imports private module pipeline.classify._data",
        "imports private module pipeline.cluster._stage",
        "uses extract._decode_block",
    ]
