"""Reading and decoding images from an untrusted collection: the one decoder of the pipeline.

Train and extract decode through :func:`read_and_decode` (bounded, threaded reads, then
:func:`decode_rgb` / :func:`decode_image`): the attribute model sees at training time exactly the
pixels it is given at extraction time (any mode -> RGB, centre square crop, bilinear resize), and
a bad file gets the same ``errors/`` reason in both. Every stage that opens an image (those two
and the report's faces) goes through :func:`read_limited` and :func:`open_limited`:

* a file larger than ``data.max_image_bytes`` is refused after reading at most that many bytes
  plus one (ingest already refuses it from the listing's size, so this only catches a file
  that grew since);
* an image whose header declares more than ``data.max_image_pixels`` pixels is refused before
  its pixels are decoded (``PIL.Image.open`` reads only the header). Pillow's own guard only
  warns below ~179 M pixels, and a 88 KB PNG can declare 90 M.

Both raise :class:`ImageRejected`, whose message is the ``errors/`` reason; the decoders raise
:class:`BadImage` for every input they cannot use. Anything else (a bug, memory) is not a bad
image and propagates.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import DataConfig, StorageConfig

T = TypeVar("T")


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


class BadImage(ValueError):
    """An input that cannot be used; the message is the errors/ reason."""


def decode_rgb(data: bytes | None, min_side: int = 16, draft_side: int = 0,
               max_pixels: int = DataConfig().max_image_pixels):
    """Decode any image PIL reads into an RGB ``PIL.Image`` at (about) its own resolution.

    Grayscale, CMYK, palette and alpha images are converted to RGB; a PNG (or any other format)
    named ``.jpg`` is decoded by its content. ``draft_side`` > 0 lets libjpeg decode a JPEG much
    larger than needed at a reduced scale (DCT scaling), keeping both sides >= ``draft_side``.
    Raises :class:`BadImage` for empty, truncated, corrupt, too small or too large
    (``max_pixels``, checked on the header before decoding) files.
    """
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise BadImage("unreadable")
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        im = open_limited(data, max_pixels)
        w, h = im.size
        if min(w, h) < min_side:
            raise BadImage(f"image too small: {w}x{h} px (extract.min_image_side = {min_side})")
        if draft_side and im.format == "JPEG" and min(w, h) >= 2 * draft_side:
            im.draft("RGB", (draft_side, draft_side))
        im.load()  # decode now: truncated / corrupt data raises here, not later
        if im.mode != "RGB":
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # high bit-depth grayscale: scale to 8 bits before the RGB conversion
                arr = np.asarray(im, dtype=np.float32)
                hi = float(arr.max()) or 1.0
                im = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8), "L")
            im = im.convert("RGB")  # L, LA, P, CMYK, RGBA, YCbCr ... -> RGB
        return im
    except BadImage:
        raise
    except ImageRejected as exc:
        raise BadImage(str(exc)) from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from None


def square_crops(im, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Centre-crop an RGB image to a square, then resize it to each size (uint8 HWC arrays)."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    square = im.crop((left, top, left + s, top + s))
    return [np.asarray(square.resize((n, n), Image.BILINEAR, reducing_gap=None
                                     if s < 3 * n else 2.0), dtype=np.uint8)
            for n in sizes]


def original_pixels(im, max_side: int) -> np.ndarray:
    """The RGB image as uint8 HWC, downscaled (aspect kept) when its longer side is > max_side."""
    from PIL import Image

    w, h = im.size
    if max_side and max(w, h) > max_side:
        f = max_side / max(w, h)
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR,
                       reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes | None, sizes: tuple[int, ...], min_side: int = 16,
                 max_pixels: int = DataConfig().max_image_pixels) -> list[np.ndarray]:
    """Decode any image PIL reads into RGB uint8 arrays, one per square ``size``.

    :func:`decode_rgb` then :func:`square_crops`: the image is centre-cropped to a square, then
    resized, so faces keep their aspect ratio whatever the source size. Raises :class:`BadImage`
    for empty, truncated, corrupt, too small or too large files.
    """
    return square_crops(decode_rgb(data, min_side, draft_side=max(sizes), max_pixels=max_pixels),
                        sizes)


def _read_one(uri: str, storage_cfg: StorageConfig | None, max_bytes: int
              ) -> tuple[bytes | None, str | None]:
    try:
        return read_limited(uri, storage_cfg, max_bytes), None
    except ImageRejected as exc:
        return None, str(exc)


def read_and_decode(uris: list[str], decode: Callable[[bytes], T], *,
                    storage_cfg: StorageConfig | None, max_bytes: int, read_threads: int,
                    decode_threads: int = 1) -> Iterator[tuple[bytes | None, T | None, str | None]]:
    """``(bytes, decode(bytes), None)`` or ``(bytes or None, None, reason)`` per uri, in order.

    Reads are I/O (S3 round trips): ``read_threads`` threads overlap them, in windows of
    ``read_threads`` files, so at most that many files' bytes (each <= ``max_bytes``) are held at
    once. Decoding is CPU bound (PIL releases the GIL): ``decode_threads`` threads, or the
    calling thread when 1. A file refused by :func:`read_limited` or a :class:`BadImage` from
    ``decode`` is a reason, never an exception.
    """
    def load(item: tuple[bytes | None, str | None]):
        data, err = item
        if err is not None:
            return data, None, err
        try:
            return data, decode(data), None
        except BadImage as exc:
            return data, None, str(exc)

    with ThreadPoolExecutor(max_workers=min(read_threads, max(1, len(uris)))) as readers, \
            ThreadPoolExecutor(max_workers=max(1, decode_threads)) as decoders:
        for start in range(0, len(uris), read_threads):
            raw = readers.map(lambda u: _read_one(u, storage_cfg, max_bytes),
                              uris[start:start + read_threads])
            yield from (decoders.map(load, list(raw)) if decode_threads > 1 else map(load, raw))
