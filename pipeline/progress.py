"""Progress lines for a stage's long steps: counts, rate and time left, at most every few seconds.

A stage logs its own start and summary (:func:`pipeline.run.run_stage`); in between, a step
that takes long (extract's shards, the cluster sweep, classify's fits, explain's blocks) logs
``[stage] what: done/total (pct), rate/s, ~N s left`` through :class:`Progress`, so a console
with Ray's own warnings kept in its log files (:mod:`pipeline.ray_runtime`) still shows the
work moving. A step that finishes within one period prints nothing of its own.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

EVERY_S = 15.0  # seconds between two progress lines of one step


class Progress:
    """Counts done items of ``total``; logs a line when ``every_s`` passed since the last one,
    and a final one when the step took longer than a period."""

    def __init__(self, stage: str, what: str, total: int, unit: str = "", every_s: float = EVERY_S):
        self.stage, self.what, self.total, self.unit = stage, what, int(total), unit
        self.every_s = every_s
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.monotonic()
        finished = self.done >= self.total
        if now - self.last >= self.every_s or (finished and now - self.t0 >= self.every_s):
            self.last = now
            log.info("[%s] %s", self.stage, self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.t0, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = ((self.total - self.done) / rate) if rate > 0 and self.done < self.total else None
        eta = f", ~{left:.0f} s left" if left is not None else f", {elapsed:.0f} s"
        return f"{self.what}: {self.done:,}/{self.total:,}{unit}{pct}, {rate:,.1f}{unit}/s{eta}"


def gather(refs: list, stage: str, what: str, unit: str = "tasks",
           every_s: float = EVERY_S) -> list:
    """``ray.get(refs)`` in order, with a :class:`Progress` line every ``every_s`` seconds while
    they finish; a failed task raises as soon as it is seen."""
    import ray

    progress = Progress(stage, what, len(refs), unit, every_s)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        if done:
            ray.get(done)  # raises a failed task's error now, not after the others
            progress.add(len(done))
    return ray.get(list(refs))


class _Lines:
    """The relay actor: log lines from workers, taken by the driver."""

    def __init__(self):
        self._lines: list[str] = []

    def add(self, line: str) -> None:
        self._lines.append(line)

    def take(self) -> list[str]:
        out, self._lines = self._lines, []
        return out


class LineRelay:
    """Carries a stage's own log lines from Ray workers to the driver's console.

    Ray starts with ``log_to_driver`` off (:mod:`pipeline.ray_runtime`): worker output stays in
    Ray's log files, Ray's internal warnings with it. A worker step whose lines the user should
    see (train's epoch and step lines) sends them through this relay instead: ``actor`` goes to
    the workers, which call :func:`relay_logs_to`; a driver thread logs what arrived every
    ``poll_s`` seconds until :meth:`close`. With ``--verbose`` Ray forwards worker output
    itself and ``actor`` is None (no line twice).
    """

    def __init__(self, poll_s: float = 2.0):
        import ray

        from pipeline.ray_runtime import verbose

        self.actor = None if verbose() else ray.remote(num_cpus=0)(_Lines).remote()
        self._stop = threading.Event()
        self._thread = None
        if self.actor is not None:
            self._thread = threading.Thread(target=self._pump, args=(poll_s,), daemon=True,
                                            name="log-relay")
            self._thread.start()

    def _pump(self, poll_s: float) -> None:
        import ray

        while True:
            stopped = self._stop.wait(poll_s)
            for line in ray.get(self.actor.take.remote()):
                log.info("%s", line)
            if stopped:
                return

    def close(self) -> None:
        """Log the last lines, then end the thread and the actor."""
        if self.actor is None:
            return
        import ray

        self._stop.set()
        self._thread.join()
        ray.kill(self.actor)
        self.actor = None


class _RelayHandler(logging.Handler):
    def __init__(self, actor):
        super().__init__(logging.INFO)
        self.actor = actor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.actor.add.remote(self.format(record))  # fire and forget: never blocks training
        except Exception:  # noqa: BLE001 - logging must not fail the step (logging's own rule)
            self.handleError(record)


def relay_logs_to(actor, logger: str = "pipeline") -> None:
    """In a worker: ``logger``'s records at INFO and up also go to a :class:`LineRelay` actor
    (once per process; nothing when ``actor`` is None)."""
    if actor is None:
        return
    target = logging.getLogger(logger)
    for h in target.handlers:
        if isinstance(h, _RelayHandler):  # a loop rerun in this process: the new relay
            h.actor = actor
            return
    if target.level == logging.NOTSET or target.level > logging.INFO:
        target.setLevel(logging.INFO)
    target.addHandler(_RelayHandler(actor))
