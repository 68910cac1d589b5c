"""Arrow schemas of the tables every stage shares: ``manifest/`` and ``errors/``.

Stage-specific tables declare their schemas next to the code that writes them; the test
``tests/test_schemas.py`` holds every written table to its schema.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.config import CELEBA_ATTRIBUTES

# CelebA's aligned-landmark columns, as spelled in list_landmarks_align_celeba.txt.
LANDMARKS: tuple[str, ...] = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# The two tables every stage reads: the manifest (written by ingest) and errors/ (one file per
# stage, see pipeline.tables.write_errors).
MANIFEST = "manifest"
ERRORS = "errors"


def manifest_schema(attributes: list[str] | tuple[str, ...] = CELEBA_ATTRIBUTES) -> pa.Schema:
    """One row per image. ``attributes`` are the dataset's annotated boolean attributes."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),  # file name, unique in the dataset
        pa.field("uri", pa.string(), nullable=False),  # absolute path or s3:// URI of the image
        pa.field("split", pa.string(), nullable=False),  # train / val / test
    ]
    fields += [pa.field(a, pa.bool_()) for a in attributes]
    fields += [pa.field("identity", pa.int32())]  # CelebA identity / LFW person index
    fields += [pa.field(c, pa.int32()) for c in LANDMARKS]
    fields += [
        pa.field("age", pa.int16()),  # UTKFace only
        pa.field("gender", pa.string()),  # UTKFace only: male / female
        pa.field("race", pa.string()),  # UTKFace only: white / black / asian / indian / others
        pa.field("person", pa.string()),  # LFW only: the person's folder name
        pa.field("dataset", pa.string(), nullable=False),
    ]
    return pa.schema(fields)


def manifest_attributes(schema: pa.Schema) -> list[str]:
    """The boolean attribute columns of a manifest, in order."""
    return [f.name for f in schema if pa.types.is_boolean(f.type)]


ERRORS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),  # null when the problem is not tied to one image
    pa.field("uri", pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])
