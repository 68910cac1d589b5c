"""`python -m jobs.benchmark identity [-- --root DIR --pairs N --workers W]`: face verification.

Is the dlib embedding a face-recognition embedding? On LFW (a folder per person, the layout of
``../shared/real/lfw``) every image is embedded as extract embeds it (:mod:`pipeline.dlib_face`:
HOG detection or the fallback box, 5-point alignment, 128-d descriptor), then:

* every same-person pair, and as many different-person pairs drawn with a seed from ``run.seed``;
* verification accuracy at dlib's threshold 0.6 (same person when the Euclidean distance < 0.6)
  over the pairs (balanced: as many of each kind), and at the best threshold on the same pairs
  (an optimistic figure: the threshold is chosen on the pairs it is scored on);
* ROC AUC of the negated distance; the share of images where a face was detected.

dlib publishes 99.38 % on LFW's own 10-fold protocol (6,000 fixed pairs); this is not that
protocol, so the figures are comparable only roughly. Images are embedded by ``--workers`` Ray
tasks of one CPU each.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def real_data_root() -> Path | None:
    """``shared/real`` beside the project (or above a git worktree of it)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "real").is_dir():
            return parent / "shared" / "real"
    return None


def _embed_files(paths: list[str]) -> tuple[list, list, float]:
    import numpy as np
    from PIL import Image

    from pipeline.dlib_face import FaceEmbedder

    model = FaceEmbedder()
    t0 = time.perf_counter()
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    emb, detected = model.embed(images)
    return emb.tolist(), detected.tolist(), time.perf_counter() - t0


def pairs(labels, seed: int):
    """Every same-label pair and as many different-label pairs drawn with ``seed``."""
    import numpy as np

    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), 1)
    same = labels[i] == labels[j]
    rng = np.random.default_rng(seed)
    diff_idx = np.flatnonzero(~same)
    pick = rng.choice(diff_idx, size=min(int(same.sum()), len(diff_idx)), replace=False)
    keep = np.concatenate([np.flatnonzero(same), np.sort(pick)])
    return i[keep], j[keep], same[keep]


def verification(emb, labels, seed: int, threshold: float = 0.6) -> dict:
    """Accuracy at ``threshold`` and at the best threshold, ROC AUC, distances by kind."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    emb = np.asarray(emb, np.float32)
    a, b, same = pairs(labels, seed)
    d = np.linalg.norm(emb[a] - emb[b], axis=1)
    fpr, tpr, thr = roc_curve(same, -d)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    acc_curve = (tpr * n_pos + (1 - fpr) * n_neg) / (n_pos + n_neg)
    best = int(np.argmax(acc_curve))
    return {
        "same_pairs": n_pos, "different_pairs": n_neg,
        "accuracy_at_threshold": round(float(((d < threshold) == same).mean()), 4),
        "threshold": threshold,
        "best_accuracy": round(float(acc_curve[best]), 4),
        "best_threshold": round(float(-thr[best]), 4),
        "roc_auc": round(float(roc_auc_score(same, -d)), 4),
        "true_positive_rate_at_threshold": round(float((d[same] < threshold).mean()), 4),
        "false_positive_rate_at_threshold": round(float((d[~same] < threshold).mean()), 4),
        "mean_distance_same": round(float(d[same].mean()), 3),
        "mean_distance_different": round(float(d[~same].mean()), 3),
    }


def run(cfg, root: str = "", workers: int = 2) -> dict:
    import ray

    from pipeline import dlib_face
    from pipeline.ray_runtime import ensure_ray
    from pipeline.seeds import derive_seed

    base = Path(root) if root else (real_data_root() or Path("missing")) / "lfw"
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no LFW folder (a folder per person); pass --root DIR")
    files, labels = [], []
    for person in sorted(p for p in base.iterdir() if p.is_dir()):
        for f in sorted(person.iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                files.append(str(f))
                labels.append(person.name)
    if not files:
        raise FileNotFoundError(f"{base}: no images in per-person folders")
    ensure_ray(cfg)
    task = ray.remote(num_cpus=1)(_embed_files)
    chunks = [files[k::workers] for k in range(workers)]
    t0 = time.perf_counter()
    parts = ray.get([task.remote(c) for c in chunks])
    wall = time.perf_counter() - t0
    emb = [None] * len(files)
    detected = [None] * len(files)
    for k, (e, d, _) in enumerate(parts):
        for pos, idx in enumerate(range(k, len(files), workers)):
            emb[idx], detected[idx] = e[pos], d[pos]
    out = {"images": len(files), "people": len(set(labels)), "root": str(base),
           "embedding": f"dlib ({dlib_face.weights_version()})",
           "faces_detected": int(sum(detected)),
           "embed_wall_s": round(wall, 1),
           "images_per_s_per_worker": round(len(files) / sum(p[2] for p in parts), 2),
           **verification(emb, labels, derive_seed(cfg.run.seed, "benchmark", "identity"))}
    for k in ("accuracy_at_threshold", "best_accuracy", "roc_auc"):
        print(f"{k}: {out[k]}")
    return out
