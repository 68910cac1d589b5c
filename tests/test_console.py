"""The console: the stages' own progress lines, Ray's loggers kept off it, worker lines relayed."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline import progress, ray_runtime


def test_progress_lines_give_counts_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    p = progress.Progress("extract", "images", 10, unit="images", every_s=0.0)
    p.add(5)
    p.add(5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("[extract] images: 5/10 images (50%), ") and "s left" in lines[0]
    assert lines[1].startswith("[extract] images: 10/10 images (100%), ")
    assert "images/s" in lines[1]


def test_a_step_shorter_than_one_period_prints_nothing(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    p = progress.Progress("cluster", "sweep", 3, every_s=60.0)
    for _ in range(3):
        p.add()
    assert caplog.records == []


@pytest.fixture
def fake_ray_logger():
    logger = logging.getLogger("ray.faceaudit_test")
    console = logging.StreamHandler()
    console.setLevel(logging.INFO)
    logger.addHandler(console)
    logger.propagate = False
    yield logger, console
    logger.handlers.clear()


def test_ray_loggers_keep_only_errors_on_the_console(fake_ray_logger, monkeypatch):
    monkeypatch.delenv(ray_runtime.VERBOSE_ENV, raising=False)
    logger, console = fake_ray_logger
    ray_runtime.quiet_ray_logging()
    assert console.level == logging.ERROR
    assert ray_runtime._WARNINGS in logger.handlers  # warnings held for Ray's session folder


def test_verbose_leaves_ray_loggers_alone(fake_ray_logger, monkeypatch):
    monkeypatch.setenv(ray_runtime.VERBOSE_ENV, "1")
    logger, console = fake_ray_logger
    ray_runtime.quiet_ray_logging()
    assert console.level == logging.INFO and ray_runtime._WARNINGS not in logger.handlers


def test_worker_lines_reach_the_driver_through_the_relay(ray_session, caplog, monkeypatch):
    monkeypatch.delenv(ray_runtime.VERBOSE_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="pipeline.progress")

    def work(actor):
        progress.relay_logs_to(actor)
        logging.getLogger("pipeline.train").info("[train_attributes] epoch 1/1 done")
        time.sleep(0.5)  # the fire-and-forget add reaches the actor before the task returns
        return True

    relay = progress.LineRelay(poll_s=0.2)
    assert ray_session.get(ray_session.remote(work).remote(relay.actor))
    relay.close()
    assert "[train_attributes] epoch 1/1 done" in [r.getMessage() for r in caplog.records]
