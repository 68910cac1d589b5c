"""What a stage asks of the Ray cluster, checked against what the cluster can ever hold.

A Ray request that no node can hold does not fail: Ray Train's worker group times out and
retries, an actor pool waits for actors that never start. Stages therefore check their request
*before* submitting it, per node (a 4-GPU request does not fit four 1-GPU bundles' worth of
total GPUs spread so that no node holds one bundle), and:

* when it fits, go on;
* on an autoscaling cluster (``ray.autoscaling = true``), send the request to the autoscaler
  (``ray.autoscaler.sdk.request_resources``) and wait for nodes, logged, up to
  ``ray.resource_wait_s``;
* on a remote fixed-size cluster, wait up to ``ray.resource_wait_s`` for nodes still joining;
* on a Ray started by this process (nothing can join it), fail at once;

and fail with :class:`ResourceError` naming what was asked and what each node has.

``"auto"`` sizes (``train.num_workers``, ``extract.min_actors`` / ``max_actors``) are resolved
here from the nodes' totals: :func:`fit_count`.

The GPU start-up check (:func:`check_cuda`) runs inside every GPU actor / training worker: a
torch build whose CUDA is newer than the node's driver makes ``torch.cuda.is_available()`` false
or the first kernel fail; either becomes one error naming the torch build and the driver.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable

from pipeline.config import Config

log = logging.getLogger(__name__)

Bundle = dict[str, float]
# Resources a request is checked on; memory and custom resources are left to Ray.
CHECKED = ("CPU", "GPU")


class ResourceError(RuntimeError):
    """The stage asks for more than the cluster holds (and no node arrived in time)."""


class GPUStartupError(RuntimeError):
    """A GPU actor's torch cannot run a kernel on its GPU (build/driver mismatch, bad device)."""


# --------------------------------------------------------------------------- pure functions

def unplaced(bundles: Iterable[Bundle], nodes: list[Bundle]) -> list[Bundle]:
    """Bundles that do not fit on ``nodes`` (first-fit decreasing, each bundle on one node).

    ``nodes`` are the nodes' total resources. First-fit decreasing can miss a packing that
    exists, but only for mixed bundle shapes; stages ask for one shape plus small CPU bundles.
    """
    free = [{k: float(n.get(k, 0.0)) for k in CHECKED} for n in nodes]
    left = []
    for b in sorted(bundles, key=lambda b: tuple(-float(b.get(k, 0.0)) for k in
                                               reversed(CHECKED))):
        for f in free:
            if all(f[k] + 1e-9 >= float(b.get(k, 0.0)) for k in CHECKED):
                for k in CHECKED:
                    f[k] -= float(b.get(k, 0.0))
                break
        else:
            left.append(b)
    return left


def fit_count(bundle: Bundle, nodes: list[Bundle], reserve: Bundle | None = None) -> int:
    """How many copies of ``bundle`` the nodes hold together, after ``reserve`` (one bundle kept
    free on the cluster, e.g. for a decode task) is placed first."""
    free = [{k: float(n.get(k, 0.0)) for k in CHECKED} for n in nodes]
    if reserve:
        for f in sorted(free, key=lambda f: -f["CPU"]):
            if all(f[k] + 1e-9 >= float(reserve.get(k, 0.0)) for k in CHECKED):
                for k in CHECKED:
                    f[k] -= float(reserve.get(k, 0.0))
                break
    total = 0
    for f in free:
        per = [f[k] / float(bundle[k]) for k in CHECKED if float(bundle.get(k, 0.0)) > 0]
        total += int(min(per) + 1e-9) if per else 0
    return total


def describe(bundles: Iterable[Bundle]) -> str:
    """``"4 x {CPU: 4, GPU: 1} + 1 x {CPU: 1}"``: a request, grouped by shape."""
    counts: dict[tuple, int] = {}
    for b in bundles:
        key = tuple((k, float(b[k])) for k in CHECKED if float(b.get(k, 0.0)) > 0)
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n} x {{{', '.join(f'{k}: {v:g}' for k, v in key)}}}"
                      for key, n in counts.items()) or "nothing"


def describe_nodes(nodes: list[Bundle]) -> str:
    if not nodes:
        return "no alive node"
    return ", ".join(f"{{{', '.join(f'{k}: {float(n.get(k, 0.0)):g}' for k in CHECKED)}}}"
                     for n in nodes)


# --------------------------------------------------------------------------- cluster

def node_totals() -> list[Bundle]:
    """Every alive node's total CPU and GPU (what it can ever hold, busy or not)."""
    import ray

    return [{k: float(n["Resources"].get(k, 0.0)) for k in CHECKED}
            for n in ray.nodes() if n.get("Alive")]


def _cluster_can_grow(cfg: Config) -> bool:
    """A Ray started in this process (no address) has all the nodes it will ever have."""
    return cfg.ray.autoscaling or bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def ensure_fits(cfg: Config, what: str, bundles: list[Bundle], hint: str, *,
                nodes_fn: Callable[[], list[Bundle]] = node_totals,
                poll_s: float = 2.0) -> list[Bundle]:
    """Return the nodes once ``bundles`` fit on them; else wait (bounded) or raise.

    ``what`` names the request in messages ("train: 4 workers"), ``hint`` says which settings
    to change. Returns the node totals the request was checked against.
    """
    nodes = nodes_fn()
    if not unplaced(bundles, nodes):
        return nodes
    wait_s = cfg.ray.resource_wait_s if _cluster_can_grow(cfg) else 0.0
    if cfg.ray.autoscaling:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])
        log.warning("%s: asks for %s; the cluster holds %s; asked the autoscaler, waiting up to "
                    "%.0f s (ray.resource_wait_s)", what, describe(bundles),
                    describe_nodes(nodes), wait_s)
    elif wait_s > 0:
        log.warning("%s: asks for %s; the cluster holds %s; waiting up to %.0f s for nodes to "
                    "join (ray.resource_wait_s)", what, describe(bundles), describe_nodes(nodes),
                    wait_s)
    deadline = time.monotonic() + wait_s
    last_log = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        nodes = nodes_fn()
        if not unplaced(bundles, nodes):
            log.info("%s: the cluster now holds the request (%s)", what, describe_nodes(nodes))
            if cfg.ray.autoscaling:
                from ray.autoscaler.sdk import request_resources

                # the stage's own tasks/actors are the demand from here on; a standing
                # request would keep the nodes up after the stage ends
                request_resources(bundles=[])
            return nodes
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            log.info("%s: still waiting for %s (cluster: %s, %.0f s left)", what,
                     describe(unplaced(bundles, nodes)), describe_nodes(nodes),
                     deadline - time.monotonic())
    left = unplaced(bundles, nodes)
    waited = (f" after waiting {wait_s:.0f} s (ray.resource_wait_s"
              f"{', autoscaler asked' if cfg.ray.autoscaling else ''})" if wait_s > 0 else
              " (a Ray started by this job cannot grow)")
    raise ResourceError(f"{what} asks for {describe(bundles)} but the Ray cluster's nodes hold "
                        f"{describe_nodes(nodes)}: {describe(left)} cannot be placed on any "
                        f"node{waited}; {hint}")


# --------------------------------------------------------------------------- GPU start-up

# Minimum Linux driver per CUDA major version of the torch wheel (NVIDIA's CUDA compatibility
# notes: 12.x runs on >= 525.60.13 through minor-version compatibility, 13.x on >= 580.65.06).
MIN_DRIVER = {"12": "525.60.13", "13": "580.65.06"}


def min_driver(cuda: str | None) -> str:
    """The minimum driver for a torch CUDA build ("13.0" -> "580.65.06")."""
    if not cuda:
        return "none (CPU build: it cannot use a GPU)"
    return MIN_DRIVER.get(cuda.split(".")[0], f"unknown for CUDA {cuda}")


def driver_version() -> str:
    """The NVIDIA kernel driver's version, from /proc or nvidia-smi; "unknown" when neither."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for tok in f.readline().split():
                if tok[:1].isdigit() and "." in tok:
                    return tok
    except OSError:
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (no /proc/driver/nvidia/version, no nvidia-smi)"


def check_cuda(where: str) -> None:
    """Inside a GPU actor: fail with one clear message unless torch can run a kernel here."""
    import torch

    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (CPU build)'}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    problem = None
    if not torch.cuda.is_available():
        problem = "torch.cuda.is_available() is False"
    else:
        try:
            x = torch.arange(16, device="cuda", dtype=torch.float32)
            if float((x * 2).sum().item()) != 240.0:  # one kernel plus a copy back
                problem = "a test kernel returned a wrong result"
        except Exception as exc:  # noqa: BLE001 -- any CUDA failure becomes the one error
            problem = f"a test kernel failed: {type(exc).__name__}: {exc}"
    if problem:
        raise GPUStartupError(
            f"{where}: Ray gave this actor a GPU (CUDA_VISIBLE_DEVICES={visible}) but {problem}; "
            f"{build} (needs NVIDIA driver >= {min_driver(torch.version.cuda)}), NVIDIA driver "
            f"{driver_version()}; install the torch variant matching the driver "
            f"(infra/Dockerfile --build-arg TORCH_VARIANT=cu126|cu128|cu130) or upgrade it")
