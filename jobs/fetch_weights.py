"""`python -m jobs.fetch_weights --config FILE [--set section.key=value ...]`

Downloads every standard weight file the config names into the torch cache, hash-checked
(pipeline.weights), so that runs with ``weights.download = false`` find them; prints one JSON
line per file.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from jobs._cli import ConfigOpt, SetOpt, guarded, load, setup_logging

app = typer.Typer(add_completion=False, help="Fetch the standard weights a config names.")


@app.command()
def main(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    setup_logging()
    cfg = load(config, set_)
    from pipeline.weights import fetch

    rows = guarded(lambda: fetch(cfg))
    for row in rows:
        typer.echo(json.dumps(row))
    if not rows:
        typer.echo("the config names no standard weights (nothing to fetch)", err=True)


if __name__ == "__main__":
    app(prog_name="python -m jobs.fetch_weights", args=sys.argv[1:])
