"""Peak memory of this process and every process it started (an in-process Ray cluster).

PSS (proportional set size) splits shared pages among the processes that share them, so the
sum over the tree counts each page once. Anonymous PSS leaves out file-backed and shared-memory
pages: Ray's object store maps its whole configured size once touched, whatever is live in it.
"""

from __future__ import annotations

import os
import threading


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def pss_bytes(pid: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) of one process in bytes; (0, 0) when it is gone."""
    pss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Pss_Anon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, anon


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed between listing and stat
    return total


class MemorySampler(threading.Thread):
    """Samples the tree every ``interval_s``; ``peak_driver`` / ``peak_total`` / ``peak_anon``.

    ``peak_driver_anon`` is the driver's anonymous PSS: what the driver itself allocated.
    Use as a context manager around the work to measure.
    """

    def __init__(self, interval_s: float = 0.5, pid: int | None = None, watch_dir: str = ""):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.pid = pid or os.getpid()  # the driver: the tree's root
        self.watch_dir = watch_dir  # a folder whose peak size is sampled too (Ray's spill dir)
        self.peak_dir = 0
        self.peak_total = 0
        self.peak_anon = 0
        self.peak_driver = 0
        self.peak_driver_anon = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        kids = _children()
        todo, pids = [self.pid], []
        while todo:
            p = todo.pop()
            pids.append(p)
            todo.extend(kids.get(p, []))
        sizes = [pss_bytes(p) for p in pids]
        self.peak_driver = max(self.peak_driver, sizes[0][0])
        self.peak_driver_anon = max(self.peak_driver_anon, sizes[0][1])
        self.peak_total = max(self.peak_total, sum(s[0] for s in sizes))
        self.peak_anon = max(self.peak_anon, sum(s[1] for s in sizes))
        if self.watch_dir:
            self.peak_dir = max(self.peak_dir, _dir_bytes(self.watch_dir))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def __enter__(self) -> "MemorySampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def mib(self) -> dict[str, float]:
        return {"driver_pss_mib": round(self.peak_driver / 2**20, 1),
                "driver_anon_mib": round(self.peak_driver_anon / 2**20, 1),
                "all_pss_mib": round(self.peak_total / 2**20, 1),
                "all_anon_mib": round(self.peak_anon / 2**20, 1)}
