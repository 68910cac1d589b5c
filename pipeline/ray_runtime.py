"""Connect to Ray the same way everywhere: in-process, a local head, or a remote cluster.

``cfg.ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) selects a running
cluster; with neither, Ray starts in this process. A head started with token auth needs the
client to set ``RAY_AUTH_MODE=token``; we never turn auth off.

The console carries the stages' own lines (start, progress, summary) and errors. Unless
``--verbose`` (``FACEAUDIT_VERBOSE=1``), Ray starts with ``log_to_driver`` off, so the workers'
output (Ray Train's controller polling, worker start-up notes, Ray Data's execution plans,
C++ warnings) stays in Ray's session log files (``worker-*.err``), and the driver's Ray
loggers write to ``ray-warnings.log`` there (:func:`quiet_ray_logging`), their errors to the
console too. A failed task's exception is raised on the driver as before; train relays its
workers' epoch lines itself (:class:`pipeline.progress.LineRelay`).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import tempfile

from pipeline.config import Config

log = logging.getLogger(__name__)


class NoGPUError(RuntimeError):
    """The config asks for GPUs and the cluster has none (and CPU fallback is off)."""


VERBOSE_ENV = "FACEAUDIT_VERBOSE"  # "1": Ray's own warnings on the console too (--verbose)
WARNINGS_FILE = "ray-warnings.log"
# Ray's documented default session folder; a driver on another machine than the head may
# not have it, then the file goes to the temp folder
RAY_SESSION_LOGS = "/tmp/ray/session_latest/logs"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


# Ray's log records, held until Ray's session folder is known (ray.init), then written there
_WARNINGS = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
_WARNINGS.setLevel(logging.INFO)


def quiet_ray_logging() -> None:
    """Ray's loggers (``ray`` and below) write to :data:`WARNINGS_FILE` (see
    :func:`_warnings_to_session_log`), and only their errors to the console; nothing changes
    when :func:`verbose`. Called before and after ``ray.init``, which creates loggers too."""
    if verbose():
        return
    for name in ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if h is not _WARNINGS and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.ERROR))  # Ray Data keeps its ray-data.log
        # the file where the console handlers are: the "ray" logger and the ones that do not
        # pass records up to it, unless they write a file of their own
        stops_here = name == "ray" or not logger.propagate
        if (logger.handlers and stops_here and _WARNINGS not in logger.handlers
                and not any(isinstance(h, logging.FileHandler) for h in logger.handlers)):
            logger.addHandler(_WARNINGS)


def _warnings_to_session_log() -> None:
    """Point the held Ray records at Ray's session log folder (known once Ray has started)."""
    if verbose() or _WARNINGS.target is not None:
        return
    folder = RAY_SESSION_LOGS if os.path.isdir(RAY_SESSION_LOGS) else tempfile.gettempdir()
    to_file = logging.FileHandler(os.path.join(folder, WARNINGS_FILE), delay=True)
    to_file.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    _WARNINGS.setTarget(to_file)
    _WARNINGS.flush()
    _WARNINGS.capacity = 1  # from now on each record goes straight to the file


def ensure_ray(cfg: Config) -> None:
    """Initialise Ray once per process (a no-op when a caller or a test already did)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    # worker output (Ray's internal warnings among it) stays in Ray's log files; the stages
    # relay their own worker lines (pipeline.progress.LineRelay)
    kwargs: dict = {"log_to_driver": verbose(), "ignore_reinit_error": True}
    if address:
        kwargs["address"] = address
    else:
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.num_gpus >= 0:
            kwargs["num_gpus"] = cfg.ray.num_gpus
        if cfg.ray.object_store_mib:
            kwargs["object_store_memory"] = cfg.ray.object_store_mib * 1024 * 1024
        kwargs["include_dashboard"] = False
    quiet_ray_logging()  # ray.init's own notes (token auth, the local instance) included
    ray.init(**kwargs)
    # Ray Data's own progress bars are noisy in job logs; stages log their own progress.
    import ray.data
    import ray.train  # noqa: F401 - its loggers exist now, so they are quieted too

    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_logging()  # and the loggers ray.init and those imports created
    _warnings_to_session_log()
    log.info("ray: %s", "connected to " + address if address else "started in-process")


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def resolve_use_gpu(cfg: Config, wanted: str | bool | float) -> bool:
    """``"auto"`` → GPUs when the cluster has them; an explicit request without GPUs is an error
    unless ``ray.autoscaling`` is on (then GPUs are requested from the autoscaler) or
    ``ray.allow_cpu_fallback`` is on (then a warning, and CPU)."""
    have = cluster_gpus() > 0
    if wanted in ("auto",):
        return have
    if wanted in ("false", False, 0, 0.0):
        return False
    if have:
        return True
    if cfg.ray.autoscaling:
        # GPU nodes may scale from zero: the stage's resource check asks the autoscaler for them
        # (pipeline.resources.ensure_fits) and fails after ray.resource_wait_s if none arrive
        log.info("GPUs requested and none in the cluster yet; the autoscaler will be asked")
        return True
    if cfg.ray.allow_cpu_fallback:
        log.warning("GPUs requested but the cluster has none; running on CPU "
                    "(ray.allow_cpu_fallback = true)")
        return False
    raise NoGPUError("GPUs requested but the Ray cluster has no GPU; add GPU nodes, set the "
                     "stage's GPU option to \"auto\"/false, or set ray.allow_cpu_fallback = true")
