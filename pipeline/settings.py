"""Stage settings recorded in a table's Parquet key-value metadata, so that readers (the report)
describe the run that made the table, not the current config.

A stage declares a frozen dataclass that subclasses :class:`TableSettings`; tuple fields are
stored comma-joined, every other field as ``str`` and read back through the field's type
(``int``, ``float``; anything else stays ``str``).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import ClassVar

_READ = {"int": int, "float": float,
         "tuple[str, ...]": lambda s: tuple(x for x in s.split(",") if x)}


class TableSettings:
    STAGE: ClassVar[str] = ""  # the stage that writes the settings (named in the rerun hint)

    def metadata(self) -> dict[str, str]:
        return {k: ",".join(v) if isinstance(v, tuple) else str(v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, md: dict[str, str], table: str):
        missing = [f.name for f in fields(cls) if f.name not in md]
        if missing:
            raise KeyError(f"{table} metadata lacks {missing} (written by a {cls.STAGE} stage "
                           f"older than this reader): rerun {cls.STAGE} "
                           f"(python -m jobs.{cls.STAGE} --force)")
        return cls(**{f.name: _READ.get(_type_name(f.type), str)(md[f.name])
                      for f in fields(cls)})


def _type_name(t) -> str:
    """A field's annotation as written: a string under ``from __future__ import annotations``,
    else the type itself (``int`` -> "int", ``tuple[str, ...]`` -> "tuple[str, ...]")."""
    return t if isinstance(t, str) else (t.__name__ if isinstance(t, type) else str(t))
