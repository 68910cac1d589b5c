"""The run lock: one writing run per ``output.root`` at a time.

Two runs on one output root destroy each other (extract's clean start deletes the other run's
features, train its checkpoints), so every stage that writes holds ``<output.root>/run.lock``
while it runs. The lock is a small JSON object: ``owner`` (user), ``host``, ``pid``, ``job``,
``token`` (unique per acquisition), ``started`` and ``heartbeat`` (UTC ISO times, refreshed
every ``run.lock_heartbeat_s`` by a daemon thread).

* Created with a create-if-absent write (:func:`pipeline.storage.create_exclusive`: a hard link
  locally, which fails like ``O_EXCL`` when the name exists; ``put_object(IfNoneMatch="*")`` on
  S3). A second run stops at once with :class:`RunLocked` naming the holder.
* A lock is stale when its heartbeat is older than ``run.lock_stale_s``, or at once when its
  process is on this host and no longer alive. A stale lock is taken over with a
  replace-if-unchanged write (:func:`pipeline.storage.replace_if`), so of two runs taking over
  the same dead lock exactly one wins.
* The report (read-only apart from its own ``report/`` folder) does not take it
  (``Stage.needs_lock``).

Within one process the lock is re-entrant: ``jobs.run`` takes it once for all stages.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from pipeline import storage, tables
from pipeline.config import Config

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLocked(storage.StorageError):
    """Another live run holds the output root's lock; the message names it."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass
class Lock:
    """A held lock: where it is, what it says, and its heartbeat thread."""

    cfg: Config
    loc: storage.Location
    info: dict
    version: str = ""
    depth: int = 1
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; False (and ``lost``) when another run has taken the lock."""
        with self._mutex:
            now = storage.read_versioned(self.loc, self.cfg.storage)
            if now is None or _parse(now[0]).get("token") != self.info["token"]:
                self.lost = True
                return False
            info = {**self.info, "heartbeat": _now().isoformat()}
            if not storage.replace_if(self.loc, _dump(info), now[1], self.cfg.storage):
                self.lost = True
                return False
            self.info = info
            return True

    def _beat(self) -> None:
        while not self._stop.wait(self.cfg.run.lock_heartbeat_s):
            try:
                if not self.heartbeat():
                    log.error("run lock %s was taken over by another run (this run's heartbeat "
                              "stopped for over run.lock_stale_s = %g s); stop this run",
                              self.loc.uri, self.cfg.run.lock_stale_s)
                    return
            except storage.StorageError as exc:  # transient: try again at the next beat
                log.warning("run lock heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._mutex:
            now = storage.read_versioned(self.loc, self.cfg.storage)
            if now is not None and _parse(now[0]).get("token") == self.info["token"]:
                storage.delete_file(self.loc, self.cfg.storage)


def _dump(info: dict) -> bytes:
    return json.dumps(info, indent=2, sort_keys=True).encode()


def _parse(data: bytes) -> dict:
    try:
        doc = json.loads(data)
        return doc if isinstance(doc, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}  # an unreadable lock is treated as stale once old enough (see _stale)


def _age_s(info: dict) -> float | None:
    try:
        beat = datetime.fromisoformat(info["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return None
    return (_now() - beat).total_seconds()


def stale_reason(info: dict, stale_s: float) -> str | None:
    """Why the lock ``info`` belongs to a dead run, or None while its holder may be alive."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
            and not _alive(info["pid"]):
        return f"its process {info['pid']} on this host is gone"
    age = _age_s(info)
    if age is None:
        return "it has no readable heartbeat"
    if age > stale_s:
        return f"its last heartbeat is {age:.0f} s old (run.lock_stale_s = {stale_s:g})"
    return None


def describe(info: dict) -> str:
    age = _age_s(info)
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return (f"job {info.get('job', '?')!r} of {info.get('owner', '?')}@{info.get('host', '?')} "
            f"pid {info.get('pid', '?')}, started {info.get('started', '?')}{beat}")


_held: dict[str, Lock] = {}
_held_mutex = threading.Lock()


def acquire(cfg: Config, job: str) -> Lock:
    """Take ``<output.root>/run.lock`` for ``job`` or raise :class:`RunLocked`."""
    r = cfg.run
    if r.lock_stale_s <= 2 * r.lock_heartbeat_s:
        raise ValueError(f"run.lock_stale_s ({r.lock_stale_s:g}) must exceed twice "
                         f"run.lock_heartbeat_s ({r.lock_heartbeat_s:g})")
    loc = tables.root(cfg).join(LOCK_NAME)
    with _held_mutex:
        mine = _held.get(loc.uri)
        if mine is not None and not mine.lost:
            mine.depth += 1
            return mine
    now = _now().isoformat()
    info = {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(), "job": job,
            "token": uuid.uuid4().hex, "started": now, "heartbeat": now,
            "output_root": cfg.output.root}
    data = _dump(info)
    if not storage.create_exclusive(loc, data, cfg.storage):
        current = storage.read_versioned(loc, cfg.storage)
        if current is None:  # released between our two calls: one more try
            if not storage.create_exclusive(loc, data, cfg.storage):
                raise RunLocked(f"{loc.uri}: another run took the lock just now; try again")
        else:
            held = _parse(current[0])
            why = stale_reason(held, r.lock_stale_s)
            if why is None:
                raise RunLocked(
                    f"{cfg.output.root} is in use by another run ({describe(held)}); wait for it "
                    f"to finish or use another output.root. A lock whose heartbeat stops for "
                    f"run.lock_stale_s = {r.lock_stale_s:g} s is taken over ({loc.uri}).")
            if not storage.replace_if(loc, data, current[1], cfg.storage):
                raise RunLocked(f"{loc.uri}: another run took over the stale lock first")
            log.warning("run lock %s: took over the lock of %s (%s)", loc.uri, describe(held),
                        why)
    version = storage.read_versioned(loc, cfg.storage)
    lock = Lock(cfg, loc, info, version=version[1] if version else "")
    lock._thread = threading.Thread(target=lock._beat, name="run-lock-heartbeat", daemon=True)
    lock._thread.start()
    with _held_mutex:
        _held[loc.uri] = lock
    return lock


def release(lock: Lock) -> None:
    """Give the lock back (the outermost holder of a re-entrant lock deletes it)."""
    with _held_mutex:
        lock.depth -= 1
        if lock.depth > 0:
            return
        _held.pop(lock.loc.uri, None)
    lock.release()


@contextlib.contextmanager
def held(cfg: Config, job: str) -> Iterator[Lock]:
    """``with held(cfg, "extract"):`` the body runs holding the output root's lock."""
    lock = acquire(cfg, job)
    try:
        yield lock
    finally:
        release(lock)
