"""Where each table lives under a run's output root, and the shared ``errors/`` table.

Names are design.md's: ``manifest``, ``errors``, ``features``, ``clusters/assignments`` ...
Each stage writes its own error file ``errors/<stage>[-<part>].parquet``, so a rerun of a stage
replaces its own errors and never touches another stage's.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline import storage
from pipeline.config import Config
from pipeline.schemas import ERRORS_SCHEMA


def root(cfg: Config) -> storage.Location:
    return storage.filesystem(cfg.output.root, cfg.storage)


def location(cfg: Config, name: str) -> storage.Location:
    """The folder of table ``name`` (``"features"``, ``"clusters/sweep"`` ...)."""
    return root(cfg).join(*name.split("/"))


def read(cfg: Config, name: str, columns=None, schema: pa.Schema | None = None) -> pa.Table:
    return storage.read_table(location(cfg, name), columns=columns, schema=schema)


def metadata(cfg: Config, name: str) -> dict[str, str]:
    """Key-value metadata of table ``name`` (what the owning stage recorded: settings, model
    names, versions), read from its first Parquet file; ``{}`` when the table is absent."""
    schema = storage.read_schema(location(cfg, name))
    md = (schema.metadata if schema is not None else None) or {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in md.items()
            if not k.startswith(b"ARROW:") and k != b"pandas"}


def exists(cfg: Config, name: str) -> bool:
    return bool(storage.parquet_files(location(cfg, name)))


def write(cfg: Config, name: str, table: pa.Table, schema: pa.Schema | None = None,
          part: str = "part-00000", metadata: dict[str, str] | None = None) -> int:
    """Replace part ``part`` of table ``name``; returns rows written."""
    storage.write_table(table, location(cfg, name), name=f"{part}.parquet", schema=schema,
                        metadata=metadata)
    return table.num_rows


def replace(cfg: Config, name: str, table: pa.Table, schema: pa.Schema | None = None,
            metadata: dict[str, str] | None = None) -> int:
    """Write ``name`` as a single file, removing any older parts first-written-last-deleted."""
    loc = location(cfg, name)
    old = storage.parquet_files(loc)
    n = write(cfg, name, table, schema=schema, metadata=metadata, part="part-00000")
    keep = loc.join("part-00000.parquet").path
    for path in old:
        if path != keep:
            loc.fs.delete_file(path)
    return n


def errors_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def write_errors(cfg: Config, stage: str, rows: list[dict] | pa.Table, part: str = "") -> int:
    """Record the inputs ``stage`` could not use (``image_id``, ``uri``, ``reason``)."""
    table = rows if isinstance(rows, pa.Table) else errors_table(
        [{**r, "stage": stage} for r in rows])
    name = f"{stage}-{part}" if part else stage
    return write(cfg, "errors", table, schema=ERRORS_SCHEMA, part=name)


def clear_errors(cfg: Config, stage: str) -> None:
    """Remove ``stage``'s error files (a forced rerun starts clean)."""
    loc = location(cfg, "errors")
    for path in storage.parquet_files(loc):
        base = path.rsplit("/", 1)[-1]
        if base == f"{stage}.parquet" or base.startswith(f"{stage}-"):
            loc.fs.delete_file(path)


def read_errors(cfg: Config, stage: str | None = None) -> pa.Table:
    t = read(cfg, "errors", schema=ERRORS_SCHEMA)
    if stage is not None:
        import pyarrow.compute as pc

        t = t.filter(pc.equal(t["stage"], stage))
    return t
