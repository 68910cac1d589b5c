"""`python -m jobs.benchmark STAGE --config FILE [--set k=v ...] [stage options]`

Measures a stage against its baseline, side by side on the same machine, and prints both and
the ratio. Each stage's benchmark lives in ``pipeline/benchmarks/<stage>.py`` as
``run(cfg, **options) -> dict``; options after ``--`` are passed as ``--name value``.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Optional

import typer

from jobs._cli import SetOpt, guarded, load, setup_logging

app = typer.Typer(add_completion=False, context_settings={"allow_extra_args": True,
                                                          "ignore_unknown_options": True})


def _options(extra: list[str]) -> dict:
    out, key = {}, None
    for tok in extra:
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            out[key] = True
        elif key is not None:
            try:
                out[key] = json.loads(tok)
            except json.JSONDecodeError:
                out[key] = tok
            key = None
    return out


@app.command()
def main(ctx: typer.Context, stage: str = typer.Argument(..., help="train, extract, cluster, classify, explain, ingest, sample"),
         config: str = typer.Option("jobs/configs/demo.toml", "--config", "-c"),
         set_: Optional[list[str]] = SetOpt) -> None:
    setup_logging()
    cfg = load(config, set_)
    try:
        mod = importlib.import_module(f"pipeline.benchmarks.{stage}")
    except ModuleNotFoundError:
        typer.echo(f"error: no benchmark for stage {stage!r}", err=True)
        raise typer.Exit(2)
    result = guarded(lambda: mod.run(cfg, **_options(ctx.args)))
    typer.echo(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    app(prog_name="python -m jobs.benchmark", args=sys.argv[1:])
