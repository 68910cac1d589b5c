"""One run seed, a derived seed per random step.

``derive_seed(cfg.run.seed, "cluster", "kmeans", 5)`` gives the same integer on every machine and
every rerun, and different steps get unrelated streams (no step reuses another's seed).
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *names: object) -> int:
    """A 31-bit seed for the step named by ``names`` (stable across processes and Python runs)."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(str(n) for n in names)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") % (2**31 - 1)


def rng(seed: int, *names: object) -> np.random.Generator:
    """A numpy Generator for the step named by ``names``."""
    return np.random.default_rng(derive_seed(seed, *names))


def sample_indices(n: int, m: int, seed: int, *names: object) -> np.ndarray:
    """Sorted positions of a seeded sample of ``m`` of ``n`` rows, drawn without replacement
    from :func:`rng` ``(seed, *names)``; all ``n`` positions when ``m <= 0`` or ``m >= n``.

    The one subsampling rule of the pipeline (cluster's fit, silhouette and map samples, its PCA
    fit rows, audit's PCA fit rows, explain's rows and background): sorted, so a sample keeps the
    table's order, and the same for the same seed and names on every machine.
    """
    if m <= 0 or m >= n:
        return np.arange(n)
    return np.sort(rng(seed, *names).choice(n, m, replace=False))
