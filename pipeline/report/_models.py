"""Models: every network the run used, which weights it had and where they came from.

Read from the features files' metadata (written by extract) and train's ``model.json``; the dlib
embedding's face-detection count comes from ``features.face_detected``.
"""

from __future__ import annotations

import json

import pandas as pd

from pipeline import storage
from pipeline.report._context import Context, h, note, table_html
from pipeline.train import MODEL_DIR

TITLE = "Models and weights"


def build(ctx: Context) -> list[str]:
    if not ctx.has("features"):
        return [ctx.missing("features", "the record of models and weights (<code>features/</code>)")]
    meta = ctx.table_metadata("features")
    return [ctx.part("Networks", lambda: _networks(ctx, meta)),
            *([ctx.part("Face detection (dlib)", lambda: _faces(ctx))]
              if meta.get("faceaudit.embedding_model") == "dlib" else [])]


def _init(spec: str) -> str:
    if spec == "none":
        return "random initialisation"
    if spec == "imagenet":
        return "torchvision's ImageNet weights (torch cache)"
    return f"the state dict {spec}"


def _model_json(ctx: Context) -> dict:
    loc = ctx.root.join(*MODEL_DIR.split("/"), "model.json")
    return json.loads(storage.read_bytes(loc)) if storage.exists(loc) else {}


def _networks(ctx: Context, meta: dict[str, str]) -> list[str]:
    info = _model_json(ctx)  # what train recorded, not this report's config
    init = (f"; backbone initialised from {_init(info['pretrained'])}" if info.get("pretrained")
            else "; backbone initialisation not recorded (model.json predates it)")
    rows = [{
        "role": "attribute model (p_* columns)",
        "model": meta.get("faceaudit.attribute_model", info.get("arch", "?")),
        "weights": meta.get("faceaudit.attribute_model_version", "?"),
        "origin": (meta.get("faceaudit.attribute_model_origin")
                   or "trained by this run's train_attributes stage") + init,
    }, {
        "role": f"embedding ({meta.get('faceaudit.embedding_dim', '?')}-d, embedding space)",
        "model": meta.get("faceaudit.embedding_model", "?"),
        "weights": meta.get("faceaudit.embedding_version", "?"),
        "origin": meta.get("faceaudit.embedding_origin", "not recorded (features written "
                                                           "before origins were recorded)"),
    }]
    prefix = "faceaudit.embedding_sha256."
    hashes = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    out = [table_html(pd.DataFrame(rows))]
    if hashes:
        out.append("<p>Embedding weight files (sha256): " + ", ".join(
            f"<code>{h(k)}</code> {h(v)}" for k, v in sorted(hashes.items())) + ".</p>")
    if "none(seed=" in meta.get("faceaudit.embedding_version", ""):
        out.append(note("The embedding network has random weights: its clusters reflect image "
                        "statistics, not faces.", "warn"))
    return out


def _faces(ctx: Context) -> list[str]:
    f = ctx.table("features", columns=["face_detected"])
    n, found = len(f), int(f["face_detected"].sum())
    return [f"<p>dlib's HOG detector found a face in <b>{found:,}</b> of {n:,} images "
            f"({100.0 * found / max(n, 1):.1f} %); for the other {n - found:,} the embedding was "
            f"computed on the fallback box in the crop's centre "
            f"(<code>face_detected = false</code> in <code>features/</code>).</p>"]
