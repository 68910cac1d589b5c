"""`python -m jobs.make_sample --out DIR --n N --seed S [--format celeba|utkface|lfw] [--workers W]`

Writes the built-in synthetic face collection (pipeline.sample) in the chosen dataset's layout.
"""

from __future__ import annotations

import json
import sys

import typer

from jobs._cli import guarded, setup_logging

app = typer.Typer(add_completion=False, help="Write the synthetic face sample.")


@app.command()
def main(out: str = typer.Option(..., "--out", help="folder to write the sample into"),
         n: int = typer.Option(..., "--n", min=1, help="number of images"),
         seed: int = typer.Option(0, "--seed", help="sample seed (same seed = same bytes)"),
         fmt: str = typer.Option("celeba", "--format", help="celeba, utkface or lfw"),
         workers: int = typer.Option(1, "--workers", min=1, help="drawing processes")) -> None:
    setup_logging()
    from pipeline.sample import make_sample

    result = guarded(lambda: make_sample(out, n, seed, fmt=fmt, workers=workers))
    typer.echo(json.dumps(result))


if __name__ == "__main__":
    app(prog_name="python -m jobs.make_sample", args=sys.argv[1:])
