"""Ingest: turn a face collection on disk or S3 into the ``manifest/`` and ``errors/`` tables.

Adapters (``data.dataset``):

* ``celeba`` -- the original txt annotation files (``list_attr_celeba.txt``,
  ``list_eval_partition.txt``, ``identity_CelebA.txt``, ``list_landmarks_align_celeba.txt``, at the
  root or in the official ``Anno/`` / ``Eval/`` folders) or Kaggle's CSV variants
  (``list_attr_celeba.csv`` ..., images under ``img_align_celeba/img_align_celeba/``).
* ``utkface`` -- labels parsed from ``age_gender_race_date.jpg.chip.jpg`` file names.
* ``lfw`` -- one folder per person (``lfw/<Name>/<Name>_0001.jpg``).
* ``folder`` -- any folder of images, no labels.

How it stays fast: the root is listed ONCE (one recursive listing finds the annotation files and
every image with its size, into Arrow columns), annotation files are read whole and parsed with
polars string kernels in pieces of about 1 MiB (tokenise, validate and convert a piece's rows at
once; the driver holds one piece's lines and tokens, not the whole file's), and the joins between
annotations and the listing are polars joins. 202,599 CelebA rows parse in about a second
(``python -m jobs.benchmark ingest``).

Nothing is dropped silently: every input that cannot be used becomes a row of ``errors/`` with
its reason (missing, zero-byte or over ``data.max_image_bytes`` image, image without
annotation, malformed or non-UTF-8 line, empty CSV header field, bad value, count line that
disagrees, duplicate id, unparseable UTKFace name, LFW image outside ``<person>/``, a symlink the
listing did not follow, a file name that is not UTF-8), and every good row is kept. A header
column with a reserved name (:data:`RESERVED_COLUMNS`) is an error naming it.
A root that cannot be read (bad endpoint, missing bucket, wrong keys) fails first, in one line.

Splits (:func:`draw_split`, checked by :func:`check_split`): CelebA's official partition when it
gives train, val and test rows; otherwise (no partition file, or one of train rows only, as in a
subset of the official train partition) a split drawn from ``derive_seed(run.seed, "ingest",
"split")`` in ``data.split_fractions``: identity-disjoint where identities are known (CelebA's
identity file, LFW's person folders), by image where they are not (UTKFace, folders). run.json's
``split_rule`` and the report say which rule made the split.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import storage, tables
from pipeline.config import Config
from pipeline.schemas import ERRORS_SCHEMA, LANDMARKS, MANIFEST, SPLITS, manifest_schema
from pipeline.seeds import derive_seed

log = logging.getLogger(__name__)

STAGE = "ingest"
SCHEMAS = {MANIFEST: manifest_schema}  # every table the stage writes (besides errors/)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Where each CelebA file may sit under the root, in order of preference (txt before Kaggle csv).
CELEBA_FILES = {
    "attr": ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt", "list_attr_celeba.csv"),
    "partition": ("list_eval_partition.txt", "Eval/list_eval_partition.txt",
                  "Anno/list_eval_partition.txt", "list_eval_partition.csv"),
    "identity": ("identity_CelebA.txt", "Anno/identity_CelebA.txt", "identity_CelebA.csv"),
    "landmarks": ("list_landmarks_align_celeba.txt", "Anno/list_landmarks_align_celeba.txt",
                  "list_landmarks_align_celeba.csv"),
}
CELEBA_IMAGE_DIRS = ("img_align_celeba/img_align_celeba", "img_align_celeba",
                     "Img/img_align_celeba")

# UTKFace: "[age]_[gender]_[race]_[date&time].jpg.chip.jpg"; gender 0 male / 1 female,
# race 0 white / 1 black / 2 asian / 3 indian / 4 others.
UTK_PATTERN = r"^(\d{1,3})_([01])_([0-4])_(\d+)(?:\.jpg\.chip)?\.jpg$"
# What is still read (with a warning row): a stray space before the extension, a missing dot
# ("...357jpg.chip.jpg"), a missing race field ("39_1_2017....jpg.chip.jpg": race null).
UTK_LENIENT = r"^(\d{1,3})_([01])_(?:([0-4])_)?(\d+)\s*\.?(?:jpg\.chip\.)?jpg$"
UTK_RACES = ("white", "black", "asian", "indian", "others")
UTK_MAX_AGE = 120
UTK_YOUNG_BELOW = 35  # UTKFace has ages, CelebA a "Young" flag: Young = age < 35 (our rule)
LFW_DIRS = ("lfw", "lfw-deepfunneled", "lfw_funneled")

_ERR_COLS = {"image_id": pl.Utf8, "uri": pl.Utf8, "reason": pl.Utf8}


def _no_errors() -> pl.DataFrame:
    return pl.DataFrame(schema=_ERR_COLS)


@dataclass
class Parsed:
    """One parsed annotation file: good rows, the problems found, and what the file declared."""

    rows: pl.DataFrame  # image_id, line, one column per value
    errors: pl.DataFrame  # image_id, uri, reason
    names: list[str]
    declared: int | None = None
    data_lines: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Parsing


# Lines are read and parsed in pieces of about this many bytes: the driver then holds the file's
# bytes, one piece's lines and tokens, and the compact typed rows, never a Python string per line
# of the whole file nor a 41-token list per row of it (issue 16: 202,599 rows took +320 MiB).
CHUNK_BYTES = 1 << 20


def _pieces(data: bytes, start: int, size: int) -> Iterator[tuple[bytes, bool]]:
    """``data[start:]`` cut just after a newline about every ``size`` bytes, each with whether it
    is the last piece. A newline byte is never part of a multi-byte UTF-8 sequence, and
    str.splitlines never joins a "\\n" with what follows it, so each piece decodes and splits
    alone exactly as it would inside the whole file."""
    n = len(data)
    while start < n:
        end = data.find(b"\n", start + size - 1)
        end = n if end < 0 else end + 1
        yield data[start:end], end == n
        start = end


class _Lines:
    """The lines of an annotation file, in pieces (as :func:`str.splitlines` of the file decoded
    with a leading BOM dropped). A file that is not all UTF-8 is split on "\\n" instead (a
    trailing "\\r" dropped), and each line that does not decode becomes a blank line and an
    errors row (``errors``, in line order) so the numbering holds.

    ``line()`` / ``advance()`` step through the first lines (count line, header); ``rest()``
    then gives the remaining lines as (0-based number of the first, lines) pieces."""

    def __init__(self, data: bytes, uri: str, size: int = CHUNK_BYTES):
        self.errors: list[dict] = []
        self._data, self._uri, self._size = data, uri, size
        try:
            for piece, _ in _pieces(data, 0, size):
                piece.decode("utf-8")  # a check only: each piece is decoded again when used
            self._utf8 = True
        except UnicodeDecodeError:
            self._utf8 = False
            if not any(x.strip() for lines in self._raw_pieces(None) for x in lines):
                raise ValueError(f"{uri}: not a UTF-8 text file (no line decodes as UTF-8)") \
                    from None
        self._src = self._decoded() if self._utf8 else self._raw_pieces(self.errors)
        self._buf: list[str] = []
        self._i = 0  # index in _buf of the current line
        self._base = 0  # line number (0-based) of _buf[0]

    def _decoded(self) -> Iterator[list[str]]:
        first = True
        for piece, _ in _pieces(self._data, 0, self._size):
            # -sig: a BOM at the start of the file; splitlines: CRLF too
            yield piece.decode("utf-8-sig" if first else "utf-8").splitlines()
            first = False

    def _raw_pieces(self, errors: list[dict] | None) -> Iterator[list[str]]:
        name = posixpath.basename(self._uri)
        start = 3 if self._data.startswith(b"\xef\xbb\xbf") else 0
        number = 0
        for piece, last in _pieces(self._data, start, self._size):
            raws = piece.split(b"\n")
            if not last:
                raws.pop()  # the empty rest after the piece's final "\n" (next piece's first line)
            lines = []
            for raw in raws:
                number += 1
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r"))
                except UnicodeDecodeError as exc:
                    lines.append("")  # keeps the numbering; a blank line is no row
                    if errors is not None:
                        errors.append({"image_id": None, "uri": self._uri,
                                       "reason": f"{name} line {number}: not valid UTF-8 (byte "
                                                 f"{raw[exc.start:exc.start + 1]!r} at column "
                                                 f"{exc.start + 1}); line left out"})
            yield lines

    def _fill(self) -> bool:
        while self._i >= len(self._buf):
            nxt = next(self._src, None)
            if nxt is None:
                return False
            self._base += len(self._buf)
            self._buf, self._i = nxt, 0
        return True

    @property
    def pos(self) -> int:
        """0-based number of the current line (the number of lines when all are read)."""
        self._fill()
        return self._base + self._i

    def line(self) -> str | None:
        """The current line, None past the end."""
        return self._buf[self._i] if self._fill() else None

    def advance(self) -> None:
        self._i += 1

    def skip_blank(self) -> None:
        while (x := self.line()) is not None and not x.strip():
            self.advance()

    def rest(self) -> Iterator[tuple[int, list[str]]]:
        """The lines not yet stepped through, in pieces; at least one piece (maybe empty)."""
        self._fill()
        yield self._base + self._i, self._buf[self._i:]
        self._base += len(self._buf)
        self._buf, self._i = [], 0
        for lines in self._src:
            yield self._base, lines
            self._base += len(lines)


# Names an annotation column may not take: the manifest's own columns and the parser's working
# columns (a header naming one would overwrite it or collide with it).
RESERVED_COLUMNS = frozenset(
    {f.name for f in manifest_schema([])} | {"path", "size", "line", "rel", "sub", "raw", "tok",
                                             "n", "m"})


def _check_names(names: list[str], uri: str) -> None:
    bad = [c for c in names if c in RESERVED_COLUMNS or c.startswith("_")]
    if bad:
        raise ValueError(f"{uri}: header column(s) {bad} use a reserved name (the manifest's own "
                         f"columns {sorted(RESERVED_COLUMNS)} and names starting with '_'); "
                         "rename them in the file")


def _squeeze_spaces(s: pl.Series) -> pl.Series:
    """Collapse runs of blanks to one space with literal (memchr-speed) replaces.

    CelebA pads values to fixed width ("-1  1", "  77  142"); a regex split costs ~2x more.
    """
    s = s.str.strip_chars()
    if s.str.contains("\t", literal=True).any():
        s = s.str.replace_all("\t", " ", literal=True)
    while s.str.contains("  ", literal=True).any():
        s = s.str.replace_all("  ", " ", literal=True)
    return s


def parse_annotation(data: bytes, uri: str, *, csv: bool, count_line: bool, header: bool,
                     columns: list[str] | None = None, kind: str = "pm1",
                     chunk_bytes: int = CHUNK_BYTES) -> Parsed:
    """Parse a CelebA-style annotation file (``image_id v1 v2 ...`` per line), vectorised.

    ``csv``: comma-separated with an ``image_id,...`` header (Kaggle) instead of runs of spaces.
    ``count_line``: the first line is the number of images (CelebA txt). ``header``: a line of
    column names follows (the names are taken from it; ``columns`` names them when there is
    none). ``kind``: ``pm1`` values must be 1 / -1 (become booleans), ``int`` must be integers.
    The body is parsed in pieces of about ``chunk_bytes`` (:class:`_Lines`); the result does
    not depend on it.
    """
    name = posixpath.basename(uri)
    lines = _Lines(data, uri, chunk_bytes)
    errors: list[dict] = []
    # Skip leading blank lines so a stray empty first line does not shift the header.
    lines.skip_blank()
    declared = None
    if count_line and not csv:
        first = (lines.line() or "").strip()
        if first.isdigit():
            declared = int(first)
            lines.advance()
        else:
            errors.append({"image_id": None, "uri": uri,
                           "reason": f"{name} line {lines.pos + 1}: expected the image count, "
                                     f"found {first[:40]!r}; reading on without it"})
        lines.skip_blank()  # blank lines before the header
    keep_pos: list[int] | None = None  # value positions kept (None: all)
    if header:
        head = lines.line()
        if head is None:
            raise ValueError(f"{uri}: empty file (expected a header line of column names)")
        tokens = [t.strip() for t in head.split(",")] if csv else head.split()
        lines.advance()
        pos = lines.pos
        if csv:
            if not tokens or tokens[0] != "image_id":
                raise ValueError(f"{uri}: expected a CSV header starting with 'image_id', found "
                                 f"{head[:60]!r}")
            tokens = tokens[1:]
            empty = [i for i, t in enumerate(tokens) if not t]
            if empty:
                # a column without a name cannot be used; its values are skipped, the rest kept
                errors.append({"image_id": None, "uri": uri, "reason":
                               f"{name} line {pos}: header field(s) {[i + 2 for i in empty]} "
                               "are empty; those columns are left out"})
                keep_pos = [i for i, t in enumerate(tokens) if t]
        n_fields = len(tokens)
        names = [t for t in tokens if t]
        if columns is None:
            _check_names(names, uri)
        if columns is not None and names != list(columns):
            raise ValueError(f"{uri}: expected columns {list(columns)}, found {names}")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ValueError(f"{uri}: duplicate column names {dup} in the header")
    else:
        if columns is None:
            raise ValueError("parse_annotation needs `columns` when the file has no header")
        names = list(columns)
        n_fields = len(names)
    if not names:
        raise ValueError(f"{uri}: no value columns in the header")

    positions = keep_pos if keep_pos is not None else list(range(len(names)))
    goods, bad_ns, bad_vs, data_lines = [], [], [], 0
    for start, piece in lines.rest():
        good, bad_n, bad_v, n = _parse_rows(piece, start, uri, csv=csv, want=n_fields + 1,
                                            positions=positions, names=names, kind=kind)
        goods.append(good)
        bad_ns += [bad_n] if bad_n.height else []
        bad_vs += [bad_v] if bad_v.height else []
        data_lines += n
    good = pl.concat(goods, how="vertical")
    del goods
    if declared is not None and declared != data_lines:
        errors.append({"image_id": None, "uri": uri,
                       "reason": f"{name} line 1 declares {declared} images but the file has "
                                 f"{data_lines} annotation rows; all valid rows kept"})
    errors = lines.errors + errors  # the undecodable lines first, as they are met first
    err_frames = [pl.DataFrame(errors, schema=_ERR_COLS)] if errors else []
    err_frames += bad_ns + bad_vs

    # Duplicate ids: keep the first, record the rest with where the kept one is.
    first_line = pl.col("line").min().over("image_id")
    dup = good.filter(pl.col("line") != first_line)
    if dup.height:
        dup = good.with_columns(first_line.alias("_first")).filter(pl.col("line") != pl.col("_first"))
        err_frames.append(dup.select(
            "image_id", pl.lit(uri).alias("uri"),
            pl.format("{} line {}: duplicate image id (first on line {}, which is kept)",
                      pl.lit(name), pl.col("line"), pl.col("_first")).alias("reason")))
        good = good.filter(pl.col("line") == first_line)
    errs = pl.concat(err_frames, how="vertical") if err_frames else _no_errors()
    return Parsed(rows=good, errors=errs, names=names, declared=declared, data_lines=data_lines)


def _parse_rows(lines: list[str], start: int, uri: str, *, csv: bool, want: int,
                positions: list[int], names: list[str], kind: str
                ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, int]:
    """One piece of an annotation file's body (``lines``, the first being line ``start + 1``):
    its good rows typed (image_id, line, one column per value), its rows with the wrong number
    of fields and its rows with a bad value as errors rows, and its count of non-blank lines."""
    name = posixpath.basename(uri)
    body = pl.DataFrame({"raw": lines}, schema={"raw": pl.Utf8}).with_row_index(
        "line", offset=start + 1)
    body = body.filter(pl.col("raw").str.strip_chars() != "")
    # csv: split on commas (an empty field still counts as a column); txt: runs of whitespace.
    if csv:
        body = body.with_columns(pl.col("raw").str.strip_chars().str.split(",").alias("tok"))
    else:
        body = body.with_columns(_squeeze_spaces(body["raw"]).str.split(" ").alias("tok"))
    body = body.drop("raw").with_columns(pl.col("tok").list.len().alias("n"))
    bad_n = body.filter(pl.col("n") != want).select(
        pl.col("tok").list.first().alias("image_id"), pl.lit(uri).alias("uri"),
        pl.format("{} line {}: expected {} columns (image id + {} values), found {}",
                  pl.lit(name), pl.col("line"), pl.lit(want), pl.lit(want - 1),
                  pl.col("n")).alias("reason"))
    good = body.filter(pl.col("n") == want).select(
        pl.col("tok").list.get(0).str.strip_chars().alias("image_id"), "line",
        *[pl.col("tok").list.get(i + 1).str.strip_chars().alias(c)
          for i, c in zip(positions, names)])
    n_lines = body.height
    del body

    # Values: find the first bad value of each row (one vectorised pass per column).
    if kind == "pm1":
        ok = [pl.col(c).is_in(["1", "-1"]) for c in names]
        expect = "1 or -1"
    else:
        ok = [pl.col(c).str.strip_chars().cast(pl.Int64, strict=False).is_not_null() for c in names]
        expect = "an integer"
    # Messages are built only for the (few) bad rows: formatting 40 strings for every row of a
    # 200k-row file would cost more than the whole parse.
    good = good.with_columns(pl.all_horizontal(ok).alias("_ok"))
    bad_v = good.filter(~pl.col("_ok"))
    if bad_v.height:
        first_bad = pl.coalesce([
            pl.when(~o).then(pl.format("{} = '{}'", pl.lit(c), pl.col(c))) for o, c in zip(ok, names)])
        bad_v = bad_v.with_columns(first_bad.alias("_bad")).select(
            "image_id", pl.lit(uri).alias("uri"),
            pl.format("{} line {}: {}, expected {}", pl.lit(name), pl.col("line"), pl.col("_bad"),
                      pl.lit(expect)).alias("reason"))
    good = good.filter(pl.col("_ok")).drop("_ok")
    if kind == "pm1":
        good = good.with_columns([(pl.col(c) == "1").alias(c) for c in names])
    else:
        good = good.with_columns([pl.col(c).cast(pl.Int64) for c in names])
    return good, bad_n, bad_v, n_lines


# ---------------------------------------------------------------------------------------------
# Listing


def list_root(root: storage.Location) -> pl.DataFrame:
    """One recursive listing of the root: ``rel`` (posix path under root), ``path``, ``size``."""
    return _list(root)[0]


def _list(root: storage.Location) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The listing and one errors row per entry it left out (a symlink out of the root or round
    a loop, a broken link, a name that is not UTF-8; see :func:`storage.list_tree`)."""
    files, skipped = storage.list_table(root, recursive=True)
    errs = pl.DataFrame({"image_id": [None] * len(skipped), "uri": [k.uri for k in skipped],
                         "reason": [f"not listed: {k.reason}" for k in skipped]}, schema=_ERR_COLS)
    df = pl.from_arrow(files.select(["path", "size"]))
    del files
    base = root.path.rstrip("/") + "/"
    under = pl.col("path").str.starts_with(base)
    rel = pl.col("path").str.slice(len(base))
    if not df.select(under.all()).item():  # paths not spelled from the root (none locally)
        rel = pl.when(under).then(rel).otherwise(pl.col("path").map_elements(
            lambda p: posixpath.relpath(p, root.path), return_dtype=pl.Utf8))
    return df.select(rel.alias("rel"), "path", "size"), errs


def _uri_expr(root: storage.Location) -> pl.Expr:
    # Absolute local path, or the full s3:// URI of the object.
    if storage.is_s3(root.uri):
        return (pl.lit("s3://") + pl.col("path")).alias("uri")
    return pl.col("path").alias("uri")


def _images(listing: pl.DataFrame, under: str | None, depth: int | None) -> pl.DataFrame:
    """Image files under folder ``under`` ('' = root); ``depth`` = path parts below it (None: any)."""
    prefix = f"{under}/" if under else ""
    df = listing.filter(pl.col("rel").str.starts_with(prefix)).with_columns(
        pl.col("rel").str.slice(len(prefix)).alias("sub"))
    df = df.filter(pl.col("rel").str.to_lowercase().str.ends_with(IMAGE_EXTENSIONS[0])
                   | pl.col("rel").str.to_lowercase().str.ends_with(IMAGE_EXTENSIONS[1])
                   | pl.col("rel").str.to_lowercase().str.ends_with(IMAGE_EXTENSIONS[2]))
    # Hidden files (".tmp-...", "._x.jpg" from macOS) are not images of the collection.
    df = df.filter(~pl.col("sub").str.contains(r"(^|/)[._]"))
    if depth is not None:
        df = df.filter(pl.col("sub").str.count_matches("/") == depth - 1)
    return df


def _zero_byte_errors(images: pl.DataFrame, root: storage.Location,
                      max_bytes: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split off zero-byte files (an interrupted copy) and files over ``data.max_image_bytes``
    (sizes from the listing: nothing is read) as errors."""
    zero = images.filter(pl.col("size") == 0)
    big = images.filter(pl.col("size") > max_bytes)
    errs = pl.concat([
        zero.select("image_id", _uri_expr(root),
                    pl.lit("zero-byte file (empty image; re-copy it)").alias("reason")),
        big.select("image_id", _uri_expr(root),
                   pl.format("file too large: {} bytes, over data.max_image_bytes = {}",
                             pl.col("size"), pl.lit(max_bytes)).alias("reason"))])
    return images.filter((pl.col("size") != 0) & (pl.col("size") <= max_bytes)), errs


# ---------------------------------------------------------------------------------------------
# Splits


def seeded_splits(keys: np.ndarray, counts: np.ndarray, fractions: tuple[float, float],
                  seed: int) -> np.ndarray:
    """A train/val/test split of ``keys`` (sorted, unique), weighted by ``counts`` images each.

    Keys are shuffled with ``seed``; a key goes to train while the images before it fill less than
    ``fractions[0]`` of the total, then to val up to ``fractions[0] + fractions[1]``, then test.
    """
    f_train, f_val = fractions
    if f_train < 0 or f_val < 0 or f_train + f_val > 1:
        raise ValueError(f"data.split_fractions must be two non-negative fractions (train, val) "
                         f"summing to at most 1, got {list(fractions)}")
    n = len(keys)
    out = np.empty(n, dtype=object)
    if n == 0:
        return out
    perm = np.random.default_rng(seed).permutation(n)
    c = counts[perm].astype(np.float64)
    before = (np.cumsum(c) - c) / c.sum()
    split = np.where(before < f_train, "train", np.where(before < f_train + f_val, "val", "test"))
    out[perm] = split
    return out


def _split_seed(cfg: Config) -> int:
    return derive_seed(cfg.run.seed, "ingest", "split")


class SplitError(ValueError):
    """A split that breaks its own rule (a person in two splits of an identity-disjoint split)."""


# How the manifest's split was made (run.json `split_rule`, the report's Data section).
SPLIT_OFFICIAL = "official"  # the dataset's own partition file, used as is
SPLIT_BY_IDENTITY = "seeded, identity-disjoint"  # drawn from run.seed, one person in one split
SPLIT_BY_IMAGE = "seeded, by image"  # drawn from run.seed; no identities known


def _has_usable_split(df: pl.DataFrame, details: dict) -> bool:
    """An official partition that gives train, val and test rows (after data.limit)."""
    source = str(details.get("split_source", ""))
    if source.startswith("seeded") or "split" not in df.columns:
        return False
    present = set(df["split"].drop_nulls().unique().to_list())
    return present >= set(SPLITS)


def _split_groups(df: pl.DataFrame) -> tuple[pl.Expr, str | None]:
    """What keeps images together in a drawn split: the person where known, else the image."""
    if "identity" in df.columns and df["identity"].is_not_null().any():
        # An image whose identity is unknown (a bad identity line) is a group of its own.
        key = pl.when(pl.col("identity").is_not_null()).then(
            pl.lit("id:") + pl.col("identity").cast(pl.Utf8)).otherwise(
            pl.lit("img:") + pl.col("image_id"))
        who = "person" if "person" in df.columns and df["person"].is_not_null().any() else "identity"
        return key, who
    return pl.lit("img:") + pl.col("image_id"), None


def draw_split(cfg: Config, df: pl.DataFrame, details: dict) -> pl.DataFrame:
    """Keep a usable official split, or draw one from ``run.seed`` (identity-disjoint if possible).

    "Usable" means the official partition gives train, val and test rows; a partition file of
    train rows only (a CelebA subset cut from the official train partition) is not. Where the
    manifest knows who is pictured (CelebA's identity file, LFW's person folders) the draw keeps
    each person in one split; otherwise (UTKFace, plain folders) it splits by image, and says so.
    Records ``split_rule`` (and what it was drawn on) in ``details``.
    """
    if _has_usable_split(df, details):
        details["split_rule"] = f"{SPLIT_OFFICIAL} ({details.get('split_source')})"
        return df
    key, who = _split_groups(df)
    df = df.with_columns(key.alias("_group"))
    groups = df.group_by("_group").len().sort("_group")
    split = seeded_splits(groups["_group"].to_numpy(), groups["len"].to_numpy(),
                          cfg.data.split_fractions, _split_seed(cfg))
    lookup = pl.DataFrame({"_group": groups["_group"], "split": split.tolist()},
                          schema={"_group": pl.Utf8, "split": pl.Utf8})
    df = (df.drop("split", strict=False).join(lookup, on="_group", how="left").drop("_group")
          .sort("image_id"))
    why = ("no official partition" if str(details.get("split_source", "")).startswith("seeded")
           or "split_source" not in details else
           f"the official partition ({details['split_source']}) lacks a val or test split")
    if who is None:
        details["split_rule"] = (f"{SPLIT_BY_IMAGE} ({why}; no identities known, so one person "
                                 f"may appear in two splits)")
    else:
        details["split_rule"] = f"{SPLIT_BY_IDENTITY} by {who} ({why})"
    details["split_groups"] = groups.height
    return df


def check_split(df: pl.DataFrame, details: dict) -> int:
    """Identities found in more than one split; raises :class:`SplitError` if the rule forbids it.

    Run on every manifest: a drawn identity-disjoint split must have none; for an official or
    by-image split the count is recorded (CelebA's official partition is identity-disjoint).
    """
    if "identity" not in df.columns or not df["identity"].is_not_null().any():
        details["identities_in_two_splits"] = None
        return 0
    spread = (df.filter(pl.col("identity").is_not_null()).group_by("identity")
              .agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1))
    details["identities_in_two_splits"] = spread.height
    if spread.height and str(details.get("split_rule", "")).startswith(SPLIT_BY_IDENTITY):
        raise SplitError(f"identity-disjoint split broken: {spread.height} identities (e.g. "
                         f"{spread['identity'].head(3).to_list()}) are in more than one split")
    return spread.height


# ---------------------------------------------------------------------------------------------
# Adapters: each returns (manifest frame, errors frame, attribute names, details)


def _find(listing: pl.DataFrame, candidates: tuple[str, ...]) -> str | None:
    present = set(listing.filter(pl.col("rel").is_in(list(candidates)))["rel"].to_list())
    return next((c for c in candidates if c in present), None)


def _read(root: storage.Location, rel: str) -> bytes:
    return storage.read_bytes(root.join(*rel.split("/")))


def _celeba(cfg: Config, root: storage.Location, listing: pl.DataFrame):
    attr_rel = _find(listing, CELEBA_FILES["attr"])
    if attr_rel is None:
        raise ValueError(f"{root.uri}: no CelebA attribute file; expected one of "
                         f"{list(CELEBA_FILES['attr'])} (or set data.dataset to utkface, lfw or folder)")
    details: dict = {"files": {"attr": attr_rel}}

    def parse(rel: str, **kw) -> Parsed:
        return parse_annotation(_read(root, rel), root.join(*rel.split("/")).uri,
                                csv=rel.endswith(".csv"), **kw)

    attr = parse(attr_rel, count_line=True, header=True, kind="pm1")
    names = attr.names
    errs = [attr.errors]
    ann = attr.rows.drop("line")
    attr_name = posixpath.basename(attr_rel)

    # Images: the first candidate folder that holds any (Kaggle nests img_align_celeba twice).
    image_dir = None
    for cand in CELEBA_IMAGE_DIRS:
        imgs = _images(listing, cand, depth=1)
        if imgs.height:
            image_dir = cand
            break
    if image_dir is None:
        raise ValueError(f"{root.uri}: no images found; expected them in one of "
                         f"{[d + '/' for d in CELEBA_IMAGE_DIRS]}")
    details["files"]["images"] = image_dir + "/"
    imgs = imgs.with_columns(pl.col("sub").alias("image_id")).select("image_id", "path", "size")

    # Annotated images missing from storage; images without annotation; then empty files.
    missing = ann.join(imgs, on="image_id", how="anti")
    if missing.height:
        errs.append(missing.select(
            "image_id", (pl.lit(root.join(*image_dir.split("/")).uri + "/") + pl.col("image_id")).alias("uri"),
            pl.lit(f"annotated in {attr_name} but the image is missing from storage").alias("reason")))
    unannotated = imgs.join(ann, on="image_id", how="anti")
    if unannotated.height:
        errs.append(unannotated.select(
            "image_id", _uri_expr(root),
            pl.lit(f"image has no row in {attr_name} (not annotated)").alias("reason")))
    imgs, zero = _zero_byte_errors(imgs.join(ann.select("image_id"), on="image_id", how="semi"),
                                   root, cfg.data.max_image_bytes)
    errs.append(zero)
    df = ann.join(imgs, on="image_id", how="inner")
    # One row per image each: let go of them before the next file is parsed (its working memory
    # can then reuse theirs).
    del attr, ann, imgs, missing, unannotated

    # Official split.
    part_rel = _find(listing, CELEBA_FILES["partition"])
    if part_rel is not None:
        details["files"]["partition"] = part_rel
        csv = part_rel.endswith(".csv")
        part = parse(part_rel, count_line=False, header=csv, kind="int",
                     columns=["partition"])
        errs.append(part.errors)
        bad = part.rows.filter(~pl.col("partition").is_in([0, 1, 2]))
        if bad.height:
            errs.append(bad.select("image_id", pl.lit(root.join(*part_rel.split("/")).uri).alias("uri"),
                                   pl.format("{} line {}: partition = {}, expected 0, 1 or 2",
                                             pl.lit(posixpath.basename(part_rel)), pl.col("line"),
                                             pl.col("partition")).alias("reason")))
        part_rows = part.rows.filter(pl.col("partition").is_in([0, 1, 2])).select(
            "image_id", pl.col("partition").replace_strict([0, 1, 2], list(SPLITS),
                                                           return_dtype=pl.Utf8).alias("split"))
        no_split = df.join(part_rows, on="image_id", how="anti")
        if no_split.height:
            errs.append(no_split.select(
                "image_id", _uri_expr(root),
                pl.lit(f"no valid row in {posixpath.basename(part_rel)} (no split)").alias("reason")))
        df = df.join(part_rows, on="image_id", how="inner")
        del part, part_rows, no_split
        details["split_source"] = part_rel
    else:
        log.warning("%s: no list_eval_partition file; splits drawn from the seed "
                    "(data.split_fractions)", root.uri)
        details["split_source"] = "seeded (no list_eval_partition file)"
        df = df.sort("image_id")
        keys = df["image_id"].to_numpy()
        df = df.with_columns(pl.Series("split", seeded_splits(
            keys, np.ones(len(keys)), cfg.data.split_fractions, _split_seed(cfg)), dtype=pl.Utf8))

    # Identity and landmarks are optional; a bad line there costs only that value.
    id_rel = _find(listing, CELEBA_FILES["identity"])
    if id_rel is not None:
        details["files"]["identity"] = id_rel
        ident = parse(id_rel, count_line=False, header=id_rel.endswith(".csv"), kind="int",
                      columns=["identity"])
        errs.append(ident.errors)
        df = df.join(ident.rows.select("image_id", pl.col("identity").cast(pl.Int32)),
                     on="image_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, pl.Int32).alias("identity"))
    lm_rel = _find(listing, CELEBA_FILES["landmarks"])
    if lm_rel is not None:
        details["files"]["landmarks"] = lm_rel
        lm = parse(lm_rel, count_line=True, header=True, kind="int", columns=list(LANDMARKS))
        errs.append(lm.errors)
        df = df.join(lm.rows.select("image_id", *[pl.col(c).cast(pl.Int32) for c in LANDMARKS]),
                     on="image_id", how="left")
    else:
        df = df.with_columns([pl.lit(None, pl.Int32).alias(c) for c in LANDMARKS])
    return df, errs, names, details


def _utkface(cfg: Config, root: storage.Location, listing: pl.DataFrame):
    under = "UTKFace" if listing.filter(pl.col("rel").str.starts_with("UTKFace/")).height else ""
    imgs = _images(listing, under, depth=None).with_columns(
        pl.col("sub").str.split("/").list.last().alias("image_id")).select("image_id", "path", "size")
    if imgs.height == 0:
        raise ValueError(f"{root.uri}: no UTKFace images found (expected "
                         f"age_gender_race_date.jpg.chip.jpg files under UTKFace/ or the root)")
    imgs, zero = _zero_byte_errors(imgs, root, cfg.data.max_image_bytes)
    errs = [zero]
    parts = imgs.with_columns(
        pl.col("image_id").str.contains(UTK_PATTERN).alias("_strict"),
        pl.col("image_id").str.extract_groups(UTK_LENIENT).alias("m")).unnest("m")
    parts = parts.rename({"1": "age", "2": "g", "3": "r", "4": "date"})
    parts = parts.with_columns(pl.col("age").cast(pl.Int64, strict=False))
    odd = parts.filter(~pl.col("_strict") & pl.col("age").is_not_null()
                       & (pl.col("age") <= UTK_MAX_AGE))
    if odd.height:  # read, but said: a stray space / missing dot / missing race field
        errs.append(odd.select("image_id", _uri_expr(root), pl.when(pl.col("r").is_null()).then(
            pl.lit("warning: UTKFace file name has no race field; age and gender read from it, "
                   "race left null (image kept)")).otherwise(
            pl.lit("warning: irregular UTKFace file name (a stray space or missing dot); "
                   "labels read from it (image kept)")).alias("reason")))
    bad = parts.filter(pl.col("age").is_null() | (pl.col("age") > UTK_MAX_AGE))
    if bad.height:
        errs.append(bad.select("image_id", _uri_expr(root), pl.lit(
            "UTKFace file name does not parse as age_gender_race_date.jpg.chip.jpg "
            f"(age 0-{UTK_MAX_AGE}, gender 0/1, race 0-4)").alias("reason")))
    df = parts.filter(pl.col("age").is_not_null() & (pl.col("age") <= UTK_MAX_AGE))
    df = df.with_columns(
        pl.col("age").cast(pl.Int16),
        pl.col("g").replace_strict(["0", "1"], ["male", "female"]).alias("gender"),
        pl.col("r").replace_strict([str(i) for i in range(5)], list(UTK_RACES),
                                   default=None).alias("race"),
        (pl.col("g") == "0").alias("Male"),
        (pl.col("age") < UTK_YOUNG_BELOW).alias("Young"),
    )
    df, dup_errs = _dedupe_ids(df, root)
    errs.append(dup_errs)
    df = df.sort("image_id")
    keys = df["image_id"].to_numpy()
    df = df.with_columns(pl.Series("split", seeded_splits(
        keys, np.ones(len(keys)), cfg.data.split_fractions, _split_seed(cfg)), dtype=pl.Utf8))
    return df, errs, ["Male", "Young"], {"files": {"images": (under or ".") + "/"},
                                         "split_source": "seeded", "young_rule": f"age < {UTK_YOUNG_BELOW}"}


def _dedupe_ids(df: pl.DataFrame, root: storage.Location) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The same file name in two folders: keep the first path (sorted), record the others."""
    df = df.sort("image_id", "path")
    dup = df.filter(pl.col("image_id").is_duplicated() & ~pl.col("image_id").is_first_distinct())
    errs = dup.select("image_id", _uri_expr(root), pl.lit(
        "duplicate image id (same file name in another folder; the first path is kept)").alias("reason"))
    return df.filter(pl.col("image_id").is_first_distinct()), errs


def _lfw(cfg: Config, root: storage.Location, listing: pl.DataFrame):
    under = next((d for d in LFW_DIRS if listing.filter(pl.col("rel").str.starts_with(d + "/")).height), "")
    imgs = _images(listing, under, depth=2)
    if imgs.height == 0:
        raise ValueError(f"{root.uri}: no LFW images found (expected lfw/<Person>/<Person>_0001.jpg)")
    stray = _images(listing, under, depth=None).join(imgs.select("path"), on="path", how="anti")
    stray_errs = stray.select(pl.lit(None, pl.Utf8).alias("image_id"), _uri_expr(root), pl.lit(
        "LFW image not in a <person>/ folder directly under the root (at the top level or "
        "nested deeper); no person to assign, left out").alias("reason"))
    imgs = imgs.with_columns(pl.col("sub").str.split("/").alias("_p")).with_columns(
        pl.col("_p").list.first().alias("person"), pl.col("_p").list.last().alias("image_id"))
    imgs, zero = _zero_byte_errors(imgs.select("image_id", "person", "path", "size"), root,
                                   cfg.data.max_image_bytes)
    df, dup_errs = _dedupe_ids(imgs, root)
    people = df.group_by("person").len().sort("person")
    person_ids = people["person"].to_numpy()
    split = seeded_splits(person_ids, people["len"].to_numpy(), cfg.data.split_fractions,
                          _split_seed(cfg))
    lookup = pl.DataFrame({"person": person_ids.tolist(), "split": split.tolist(),
                           "identity": np.arange(1, len(person_ids) + 1, dtype=np.int32)},
                          schema={"person": pl.Utf8, "split": pl.Utf8, "identity": pl.Int32})
    df = df.join(lookup, on="person", how="left")
    return df, [stray_errs, zero, dup_errs], [], {"files": {"images": (under or ".") + "/"},
                                      "split_source": "seeded by person", "people": len(person_ids)}


def _folder(cfg: Config, root: storage.Location, listing: pl.DataFrame):
    imgs = _images(listing, "", depth=None)
    if imgs.height == 0:
        raise ValueError(f"{root.uri}: no images (.jpg, .jpeg, .png) found")
    # The relative path is the id: file names alone need not be unique across sub-folders.
    imgs = imgs.with_columns(pl.col("sub").alias("image_id")).select("image_id", "path", "size")
    imgs, zero = _zero_byte_errors(imgs, root, cfg.data.max_image_bytes)
    df = imgs.sort("image_id")
    keys = df["image_id"].to_numpy()
    df = df.with_columns(pl.Series("split", seeded_splits(
        keys, np.ones(len(keys)), cfg.data.split_fractions, _split_seed(cfg)), dtype=pl.Utf8))
    return df, [zero], [], {"split_source": "seeded"}


ADAPTERS = {"celeba": _celeba, "utkface": _utkface, "lfw": _lfw, "folder": _folder}


# ---------------------------------------------------------------------------------------------
# Assembly


def build_manifest(cfg: Config, listing: pl.DataFrame | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Manifest and errors tables for ``cfg`` (``listing`` replaces the storage listing; benchmark)."""
    root = storage.filesystem(cfg.data.root, cfg.storage)
    skipped = _no_errors()
    if listing is None:
        storage.check_readable(root)  # bad endpoint / bucket / keys: one line, before any work
        listing, skipped = _list(root)
    df, err_frames, attributes, details = ADAPTERS[cfg.data.dataset](cfg, root, listing)
    del listing  # one row per file; the manifest has what it needs from it
    err_frames = [skipped, *err_frames]
    schema = manifest_schema(attributes)
    df = df.with_columns(_uri_expr(root), pl.lit(cfg.data.dataset).alias("dataset"))
    missing = [f for f in schema if f.name not in df.columns]
    df = df.with_columns([pl.lit(None).alias(f.name) for f in missing])
    df = df.sort("image_id")
    total = df.height
    if cfg.data.limit and cfg.data.limit < df.height:
        # A seeded random subset, not the head: CelebA's splits are contiguous in image_id,
        # so the first N rows would all be `train`.
        order = np.random.default_rng(derive_seed(cfg.run.seed, "ingest", "limit")).permutation(
            df.height)[: cfg.data.limit]
        df = df[np.sort(order)]
    df = draw_split(cfg, df, details)  # after the limit: the subset gets all three splits
    check_split(df, details)
    # Converted one column at a time, each let go of once converted, so the driver never holds
    # the whole manifest twice (polars and Arrow) nor its strings three times (issue 16).
    df = df.select([f.name for f in schema])
    cols = {}
    for f in schema:
        cols[f.name] = df.get_column(f.name).to_arrow().cast(f.type)
        df = df.drop(f.name)
    manifest = storage.conform(pa.table(cols), schema)
    del cols
    errs = [e for e in err_frames if e.height]
    err_df = pl.concat([e.select(list(_ERR_COLS)).cast(_ERR_COLS) for e in errs], how="vertical") \
        if errs else _no_errors()
    errors = storage.conform(err_df.with_columns(pl.lit(STAGE).alias("stage")).to_arrow(),
                             ERRORS_SCHEMA)
    details.update({"usable_images": total, "attributes": len(attributes)})
    return manifest, errors, details


def _summarise(errors: pa.Table, k: int = 5) -> dict[str, int]:
    """Error counts by kind (the reason with line numbers stripped), most common first."""
    if errors.num_rows == 0:
        return {}
    kinds = (pl.from_arrow(errors.select(["reason"]))
             .select(pl.col("reason").str.replace_all(r"line \d+", "line N")
                     .str.replace_all(r"'[^']*'", "'…'").str.replace_all(r"\d+", "N"))
             .group_by("reason").len().sort("len", descending=True).head(k))
    return dict(zip(kinds["reason"].to_list(), kinds["len"].to_list()))


def run(cfg: Config) -> dict:
    """Write ``manifest/`` and ``errors/`` for ``cfg.data``; returns counts for run.json."""
    t0 = time.perf_counter()
    manifest, errors, details = build_manifest(cfg)
    tables.clear_errors(cfg, STAGE)
    tables.write_errors(cfg, STAGE, errors)
    if manifest.num_rows == 0:
        first = errors["reason"][0].as_py() if errors.num_rows else "no images matched"
        raise ValueError(f"ingest found no usable images under {cfg.data.root} "
                         f"(dataset {cfg.data.dataset}); {errors.num_rows} problems recorded in "
                         f"errors/ (first: {first})")
    # where the images came from, for readers that describe the run (the report's subtitle)
    tables.replace(cfg, "manifest", manifest, schema=manifest.schema,
                   metadata={"dataset": cfg.data.dataset, "data_root": cfg.data.root})
    splits = pl.from_arrow(manifest.select(["split"]))["split"].value_counts()
    summary = _summarise(errors)
    if errors.num_rows:
        log.warning("[ingest] %d inputs not usable (see errors/): %s", errors.num_rows, summary)
    return {"dataset": cfg.data.dataset, "rows": manifest.num_rows, "errors": errors.num_rows,
            "splits": dict(zip(splits["split"].to_list(), splits["count"].to_list())),
            "error_kinds": summary, "seconds": round(time.perf_counter() - t0, 3), **details}
