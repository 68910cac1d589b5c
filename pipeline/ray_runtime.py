"""Connect to Ray the same way everywhere: in-process, a local head, or a remote cluster.

``cfg.ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) selects a running
cluster; with neither, Ray starts in this process. A head started with token auth needs the
client to set ``RAY_AUTH_MODE=token``; we never turn auth off.
"""

from __future__ import annotations

import logging
import os

from pipeline.config import Config

log = logging.getLogger(__name__)


class NoGPUError(RuntimeError):
    """The config asks for GPUs and the cluster has none (and CPU fallback is off)."""


def ensure_ray(cfg: Config) -> None:
    """Initialise Ray once per process (a no-op when a caller or a test already did)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    kwargs: dict = {"log_to_driver": True, "ignore_reinit_error": True}
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
    ray.init(**kwargs)
    # Ray Data's own progress bars are noisy in job logs; stages log their own progress.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
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
