"""`python -m jobs.run --config FILE [--set k=v ...] [--force STAGE ...]`: every stage in order."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from jobs._cli import ConfigOpt, ForceOpt, SetOpt, VerboseOpt, guarded, load, setup_logging

app = typer.Typer(add_completion=False, help="Run every stage in order, skipping complete ones.")


@app.command()
def main(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt,
         force: Optional[list[str]] = ForceOpt, verbose: bool = VerboseOpt) -> None:
    setup_logging(verbose)
    cfg = load(config, set_)
    from pipeline.run import run_all
    from pipeline.storage import join_uri

    guarded(lambda: run_all(cfg, force=force or []))
    typer.echo(f"outputs: {cfg.output.root}")
    typer.echo(f"report: {join_uri(cfg.output.root, 'report', 'index.html')}")


if __name__ == "__main__":
    app(prog_name="python -m jobs.run", args=sys.argv[1:])
