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
