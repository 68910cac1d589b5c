"""The argument shape every job shares (design.md, "Running it")."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

import typer

from pipeline.config import Config, ConfigError, load_config
from pipeline.storage import StorageError

ConfigOpt = typer.Option(..., "--config", "-c", help="TOML run config (jobs/configs/*.toml)")
SetOpt = typer.Option(None, "--set", "-s", help="Override: section.key=value (TOML value)")
ForceOpt = typer.Option(None, "--force", "-f", help="Rerun this stage (and its dependants)")
VerboseOpt = typer.Option(False, "--verbose", "-v",
                          help="Ray's own warnings on the console too (else in Ray's log folder)")


def setup_logging(verbose: bool = False) -> None:
    """The stages' lines on the console; ``verbose`` also keeps Ray's own warnings there (set
    for the workers too, through the environment they inherit: pipeline.ray_runtime)."""
    from rich.logging import RichHandler

    from pipeline.ray_runtime import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])


def load(config: str, overrides: Optional[list[str]]) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def guarded(fn: Callable[[], object]) -> object:
    """Run ``fn``; expected failures print one clear line instead of a traceback wall."""
    from pipeline.ray_runtime import NoGPUError

    try:
        return fn()
    except (StorageError, ConfigError, NoGPUError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)


def stage_app(stage: str) -> typer.Typer:
    """A Typer app for ``python -m jobs.<stage>``."""
    app = typer.Typer(add_completion=False, help=f"Run the {stage} stage.")

    @app.command()
    def main(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             force: bool = typer.Option(False, "--force", help="Rerun even if complete"),
             verbose: bool = VerboseOpt) -> None:
        setup_logging(verbose)
        cfg = load(config, set_)
        from pipeline.run import run_stage

        guarded(lambda: run_stage(cfg, stage, force=force))

    return app


def main_for(stage: str) -> None:
    stage_app(stage)(prog_name=f"python -m jobs.{stage}", args=sys.argv[1:])
