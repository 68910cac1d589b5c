"""Opening an image file from an untrusted collection without letting it exhaust memory.

Every stage that opens an image (extract's and train's decoder, the report's faces) goes through
:func:`read_limited` and :func:`open_limited`:

* a file larger than ``data.max_image_bytes`` is refused after reading at most that many bytes
  plus one (ingest already refuses it from the listing's size, so this only catches a file
  that grew since);
* an image whose header declares more than ``data.max_image_pixels`` pixels is refused before
  its pixels are decoded (``PIL.Image.open`` reads only the header). Pillow's own guard only
  warns below ~179 M pixels, and a 88 KB PNG can declare 90 M.

Both raise :class:`ImageRejected`, whose message is the ``errors/`` reason.
"""

from __future__ import annotations

import io
import warnings

import pyarrow as pa

from pipeline import storage
from pipeline.config import StorageConfig


class ImageRejected(ValueError):
    """An image refused by a size limit or unreadable; the message is the errors/ reason."""


def read_limited(uri: str, storage_cfg: StorageConfig | None, max_bytes: int) -> bytes:
    """The bytes of ``uri``; refuses a file over ``max_bytes`` without reading more than that."""
    loc = storage.filesystem(uri, storage_cfg)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageRejected("missing file") from None
    except (OSError, pa.ArrowException) as exc:
        raise ImageRejected(f"unreadable: {storage.describe_error(uri, exc)}") from None
    if len(data) > max_bytes:
        raise ImageRejected(f"file too large: over {max_bytes:,} bytes "
                            f"(data.max_image_bytes); not decoded")
    return data


def open_limited(data: bytes, max_pixels: int):
    """``PIL.Image.open`` on ``data`` (header only), refusing images over ``max_pixels``."""
    from PIL import Image

    with warnings.catch_warnings():  # Pillow's bomb warning: the limit below is ours
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # over 2x Pillow's own limit
            raise ImageRejected(f"image too large: {exc}; not decoded") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageRejected(f"image too large: {w}x{h} = {w * h:,} pixels, over "
                            f"data.max_image_pixels = {max_pixels:,}; not decoded")
    return im
