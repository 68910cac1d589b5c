"""`python -m jobs.benchmark cluster [--config FILE] [-- --rows N --dim D --spaces S --full-n N
--repeat R --threaded false]`

Two measurements on generated data (no inputs needed, so it runs anywhere):

1. **Sweep, sequential vs Ray.** ``spaces`` generated matrices of ``rows`` x ``dim`` (planted
   Gaussian clusters) go through the stage's own sweep (:func:`pipeline.cluster.run_sweep`,
   the config's algorithms and k range): one spec after another in one Ray worker (the same
   niceness, +15, and the same Linux autogroup, the Ray instance's, as the tasks), twice —
   with BLAS/OpenMP free to use every core (as a user's plain loop would run) and limited to
   one thread (``threadpoolctl``; what each Ray task gets, since Ray sets OMP_NUM_THREADS to a
   task's CPUs) — and once as Ray tasks on the same machine (``cluster.cpus_per_task`` CPUs
   each). The one-thread loop is the fair baseline for the parallelism itself; the gap between
   the two loops is oversubscription (OpenMP threads spinning on busy cores), which on a
   loaded machine is large. Ray's workers are started before the clock starts (a warm-up task
   per CPU that imports the sweep's libraries, as the loop's process has), so the Ray time is
   the sweep itself plus ``ray.put``. The load average is
   reported because shared machines make every number here noisy.
   The one-thread loop and Ray alternate ``repeat`` times (medians kept, each pair reported):
   the load moves by several x within minutes. ``--threaded false`` skips the threaded loop.
   All paths run the same function on the same seeds; the result says whether Ray's labels equal
   the one-thread loop's exactly and how close (ARI) they are to the multi-threaded loop's.
2. **Full-N fit.** K-Means on a ``full_n`` x 50 matrix (CelebA's 202,599 rows by default):
   ``MiniBatchKMeans`` (what the stage uses above ``cluster.minibatch_threshold``) and, with
   ``--full-kmeans true``, Lloyd's ``KMeans`` for comparison.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.cluster import Space, SpaceJob, SweepSpec, fit_predict, run_sweep, sweep_specs
from pipeline.config import Config
from pipeline.seeds import derive_seed, rng


def planted(n: int, dim: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows in ``dim`` dimensions around ``k`` Gaussian centres (overlapping a little)."""
    r = np.random.default_rng(seed)
    truth = r.integers(0, k, n)
    centres = r.normal(0, 3, (k, dim))
    return (centres[truth] + r.normal(0, 1, (n, dim))).astype(np.float32), truth


def _warm() -> int:
    """A Ray worker ready as the loop is: started, with the sweep's libraries imported."""
    import sklearn.cluster  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.mixture  # noqa: F401

    return os.getpid()


def _loop(jobs: list[SpaceJob], specs: dict, threads: int) -> tuple[float, list]:
    """The sweep one spec after another, BLAS / OpenMP limited to ``threads``; (seconds, results)."""
    from threadpoolctl import threadpool_limits

    _warm()
    t0 = time.perf_counter()
    with threadpool_limits(threads):
        out = run_sweep(jobs, specs, parallel=False)
    return time.perf_counter() - t0, out


def run(cfg: Config, rows: int = 10000, dim: int = 50, spaces: int = 3, full_n: int = 202599,
        full_k: int = 5, full_kmeans: bool = False, repeat: int = 3,
        threaded: bool = True) -> dict:
    import ray

    from pipeline.ray_runtime import cluster_cpus, ensure_ray

    c = cfg.cluster
    jobs, specs = [], {}
    for s in range(spaces):
        name = f"space{s}"
        X, truth = planted(rows, dim, 5, derive_seed(cfg.run.seed, "bench", "cluster", name))
        job = SpaceJob.seeded(cfg, Space(name, np.arange(rows).astype(str).astype(object), X,
                                         [f"d{i}" for i in range(dim)]),
                              {"planted": truth.astype(np.int8)})
        jobs.append(job)
        specs[name], _ = sweep_specs(cfg, job)
    n_tasks = sum(len(v) for v in specs.values())

    load_before = os.getloadavg()[0]
    ensure_ray(cfg)
    cpus = cluster_cpus()
    warm = ray.remote(num_cpus=c.cpus_per_task)(_warm)
    ray.get([warm.remote() for _ in range(max(1, int(cpus / c.cpus_per_task)))])
    # The loops run in a Ray worker too, so both sides get the same niceness (+15) and the
    # same scheduler group (autogroup). Their inputs are put once, before any clock starts, as
    # the loop's own process would hold them in memory.
    loop_task = ray.remote(_loop)
    jobs_ref, specs_ref = ray.put(jobs), ray.put(specs)

    def loop(threads: int):
        return ray.get(loop_task.options(num_cpus=threads).remote(jobs_ref, specs_ref, threads))

    seq_s = None
    if threaded:
        seq_s, seq = loop(max(1, int(cpus)))
    # one-thread loop and Ray alternate ``repeat`` times: on a shared machine the load moves by
    # several x within minutes, so each pair is measured close together and the median kept
    seq1_times, ray_times, loads = [], [], []
    for _ in range(max(1, int(repeat))):
        loads.append(os.getloadavg()[0])
        seconds, seq1 = loop(1)
        seq1_times.append(seconds)
        t0 = time.perf_counter()
        par = run_sweep(jobs, specs, parallel=True, cpus_per_task=c.cpus_per_task)
        ray_times.append(time.perf_counter() - t0)
    seq1_s, ray_s = float(np.median(seq1_times)), float(np.median(ray_times))
    pair_speedups = [a / b for a, b in zip(seq1_times, ray_times)]
    load_after = os.getloadavg()[0]
    fits = [r[0]["fit_seconds"] for r in seq1]
    from sklearn.metrics import adjusted_rand_score

    # Ray tasks and the one-thread loop do the same arithmetic, so their labels must match
    # exactly; the multi-threaded loop sums in another order, which can move a few borderline
    # rows (or relabel clusters), so it is compared by ARI.
    same_1thread = all(np.array_equal(b[1], c1[1]) for b, c1 in zip(par, seq1))
    min_ari_threaded = (min(adjusted_rand_score(a[1], b[1]) for a, b in zip(seq, par))
                        if threaded else None)

    X, _ = planted(full_n, 50, full_k, derive_seed(cfg.run.seed, "bench", "cluster", "full"))
    seed = derive_seed(cfg.run.seed, "bench", "cluster", "full", "fit")
    full = {}
    kinds = ["minibatch"] + (["lloyd"] if full_kmeans else [])
    for kind in kinds:
        threshold = 0 if kind == "minibatch" else full_n + 1
        t0 = time.perf_counter()
        labels, _ = fit_predict(X, SweepSpec("full", "kmeans", full_k, seed, threshold), None)
        full[f"{kind}_kmeans_seconds"] = round(time.perf_counter() - t0, 2)
    sil_idx = np.sort(rng(cfg.run.seed, "bench", "sil").choice(full_n, c.silhouette_rows,
                                                               replace=False))
    from sklearn.metrics import silhouette_score

    t0 = time.perf_counter()
    silhouette_score(X[sil_idx], labels[sil_idx])
    full[f"silhouette_on_{c.silhouette_rows}_rows_seconds"] = round(time.perf_counter() - t0, 2)

    return {
        "machine": {"os_cpus": os.cpu_count(), "ray_cpus": cpus,
                    "cpus_per_task": c.cpus_per_task, "load_average_1min": round(load_before, 1),
                    "load_average_1min_after": round(load_after, 1)},
        "sweep": {"spaces": spaces, "rows": rows, "dim": dim, "algorithms": c.algorithms,
                  "k": [c.k_min, c.k_max], "tasks": n_tasks,
                  "sequential_seconds": None if seq_s is None else round(seq_s, 2),
                  "sequential_1thread_seconds": round(seq1_s, 2),
                  "ray_seconds": round(ray_s, 2),
                  "speedup_vs_sequential": None if seq_s is None else round(seq_s / ray_s, 2),
                  "speedup_vs_sequential_1thread": round(seq1_s / ray_s, 2),
                  "repeat": len(pair_speedups),
                  "speedup_vs_1thread_each_pair": [round(x, 2) for x in pair_speedups],
                  "load_average_1min_each_pair": [round(x, 1) for x in loads],
                  "fit_seconds_1thread_sum": round(sum(fits), 2),
                  "fit_seconds_1thread_longest": round(max(fits), 2),
                  "labels_identical_ray_vs_1thread": same_1thread,
                  "min_ari_ray_vs_threaded": (None if min_ari_threaded is None
                                              else round(float(min_ari_threaded), 4))},
        "full_n_fit": {"rows": full_n, "dim": 50, "k": full_k, **full},
    }
