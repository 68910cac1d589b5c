"""Local paths and ``s3://`` URIs behind one interface.

Every stage reaches storage through :func:`filesystem` (a ``pyarrow.fs.FileSystem`` plus the
path inside it), so the same code reads local disk and object storage. Credentials come from the
config or, when it leaves them empty, from the standard AWS chain; they are never logged.

Tables are folders of Parquet files. :func:`write_table` writes a file under a hidden temporary
name and then moves it into place, so a reader that lists the folder (DuckDB, polars, Spark, all
of which skip names starting with ``.`` or ``_``) never sees a half-written file; on S3 an object
only becomes visible once its upload completes, which gives the same guarantee.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import os
import posixpath
import re
import stat
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import StorageConfig


class StorageError(RuntimeError):
    """Storage could not be used; the message names the URI and the cause in one line."""


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it (no scheme)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(base: str, *parts: str) -> str:
    if is_s3(base):
        return base.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(base, *parts)


# Prefix of the hidden names atomic writes use before the final move; readers skip them and a
# stage that finds them left by a killed run may delete them.
TEMP_PREFIX = ".tmp-"


def _cfg_key(cfg: StorageConfig | None) -> tuple:
    c = cfg or StorageConfig()
    return (c.endpoint_url, c.region, c.access_key_id, c.secret_access_key, c.anonymous,
            c.connect_timeout_s)


@lru_cache(maxsize=16)
def _s3fs(key: tuple) -> pafs.S3FileSystem:
    endpoint, region, ak, sk, anonymous, timeout = key
    kwargs: dict = {"connect_timeout": timeout, "request_timeout": max(30.0, timeout)}
    if endpoint:
        scheme = "https" if endpoint.startswith("https://") else "http"
        kwargs["endpoint_override"] = endpoint.split("://", 1)[-1]
        kwargs["scheme"] = scheme
        kwargs["allow_bucket_creation"] = True
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # local S3 servers ignore it; avoids a region lookup
    ak = ak or os.environ.get("AWS_ACCESS_KEY_ID", "")
    sk = sk or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if ak and sk:
        kwargs["access_key"] = ak
        kwargs["secret_key"] = sk
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token:
            kwargs["session_token"] = token
    elif anonymous:
        kwargs["anonymous"] = True
    # else: pyarrow uses the AWS default chain (profile, instance role, web identity)
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str, cfg: StorageConfig | None = None) -> Location:
    """Turn a local path or ``s3://bucket/prefix`` into a :class:`Location`."""
    if is_s3(uri):
        return Location(_s3fs(_cfg_key(cfg)), uri[len("s3://"):].rstrip("/"), uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme (use a local path or s3://bucket/prefix)")
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    return Location(pafs.LocalFileSystem(), path, path)


# pyarrow's S3 errors carry the AWS error code ("AWS Error ACCESS_DENIED during ...", or
# "AWS Error UNKNOWN (HTTP status 403) ..."); the cause is read from that code, never from
# words elsewhere in the message (a path such as .../000403.jpg is not a 403).
_AWS_CODE = re.compile(r"AWS Error ([A-Z_]+)(?: \(HTTP status (\d{3})\))?")
_DENIED_CODES = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                 "INVALID_CLIENT_TOKEN_ID", "EXPIRED_TOKEN", "MISSING_AUTHENTICATION_TOKEN"}
_UNREACHABLE_CODES = {"NETWORK_CONNECTION", "REQUEST_TIMEOUT", "SERVICE_UNAVAILABLE",
                      "ENDPOINT_RESOLUTION_FAILURE", "SLOW_DOWN", "THROTTLING"}
_DENIED = "access denied (check the credentials: storage.access_key_id / AWS_* / profile)"
_UNREACHABLE = "the endpoint is unreachable (check storage.endpoint_url and the network)"
_NOT_FOUND = "not found (no such bucket, prefix or file)"


def describe_error(uri: str, exc: BaseException) -> str:
    """One line naming the URI and the cause, without the traceback wall.

    The cause comes from the exception's type (``PermissionError``, ``FileNotFoundError``,
    ``TimeoutError`` ...) or the AWS error code / HTTP status pyarrow puts in S3 errors.
    """
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    m = _AWS_CODE.search(text)
    code, status = (m.group(1), m.group(2)) if m else ("", None)
    if isinstance(exc, PermissionError):
        cause = "permission denied (check the file's owner and mode)"
    elif code in _DENIED_CODES or status in ("401", "403"):
        cause = _DENIED
    elif code == "NO_SUCH_BUCKET":
        cause = "the bucket does not exist"
    elif isinstance(exc, (TimeoutError, ConnectionError)) or code in _UNREACHABLE_CODES \
            or (code == "UNKNOWN" and status is None and "curlCode" in text):
        cause = _UNREACHABLE
    elif isinstance(exc, (FileNotFoundError, NotADirectoryError)) or code in (
            "RESOURCE_NOT_FOUND", "NO_SUCH_KEY") or status == "404":
        cause = _NOT_FOUND
    else:
        cause = msg
    return f"{uri}: {cause}"


def _wrap(uri: str, exc: BaseException) -> StorageError:
    return StorageError(describe_error(uri, exc))


def exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None


def check_readable(loc: Location) -> None:
    """Fail early, in one line, when a root cannot be listed (bad keys, no bucket, no endpoint)."""
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{loc.uri}: not found (no such bucket, prefix or file)")
        if info.type == pafs.FileType.Directory:
            loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None


@dataclass(frozen=True)
class Skipped:
    """An entry a listing left out: ``uri`` (non-UTF-8 bytes shown as ``\\xNN``) and why."""

    uri: str
    reason: str


def _printable(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir keeps undecodable bytes as lone surrogates
        return False


# What a listing gives per file: the filesystem path, the size in bytes and the modification time.
LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])
_LIST_BATCH = 8192  # files stat-ed and turned into Arrow columns at a time


def _join(folder: str, name: str) -> str:
    # as os.scandir builds DirEntry.path
    return folder + name if folder.endswith("/") else folder + "/" + name


def _walk_local(root: str, recursive: bool) -> tuple[pa.Table, list[Skipped]]:
    """Files under ``root`` without leaving it (a :data:`LISTING_SCHEMA` table): the real folders
    are listed first, then each symlink is followed only when its target lies inside ``root`` and
    was not reached before (real paths are deduplicated, so a link loop ends at once); every link
    not followed and every name that is not UTF-8 is a :class:`Skipped`. Each folder's entries
    come in name order, a sub-folder's files at the sub-folder's place.

    A folder's plain files are kept as their names only until they are stat-ed, in batches, into
    Arrow columns: 202,599 images in one folder cost their names, not a DirEntry, a FileInfo and
    a path string each (issue 16)."""
    real_root = os.path.realpath(root)
    batches: list[pa.RecordBatch] = []
    skipped: list[Skipped] = []
    seen_dirs = {real_root}
    listed_dirs: dict[str, str] = {}  # real path of a listed folder -> the path it was listed as
    linked_files: dict[str, str] = {}  # real path of a file listed through a link -> that link
    links: list[str] = []

    def inside(real: str) -> bool:
        return real == real_root or real.startswith(real_root.rstrip("/") + "/")

    def add(paths: list[str], sizes: list[int], mtimes: list[int]) -> None:
        if paths:
            batches.append(pa.record_batch(
                [pa.array(paths, pa.string()), pa.array(sizes, pa.int64()),
                 pa.array(mtimes, pa.int64())], schema=LISTING_SCHEMA))

    def add_plain(folder: str, names: list[str]) -> None:
        for lo in range(0, len(names), _LIST_BATCH):
            paths, sizes, mtimes = [], [], []
            for name in names[lo:lo + _LIST_BATCH]:
                path = _join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError as exc:
                    skipped.append(Skipped(path, describe_error(path, exc).split(": ", 1)[-1]))
                    continue
                paths.append(path)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime_ns)
            add(paths, sizes, mtimes)

    def visit(folder: str, real_folder: str) -> None:
        listed_dirs.setdefault(real_folder, folder)
        # Plain files (most entries) as Arrow string chunks of names: a Python list of every
        # name would leave its memory pinned by whatever is allocated while it lives.
        plain: list[pa.Array] = []
        names: list[str] = []
        other: list[tuple[str, os.DirEntry, OSError | None]] = []  # folders, links, odd names
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if not _utf8(entry.name):
                        other.append((entry.name, entry, None))
                        continue
                    try:
                        if entry.is_symlink() or entry.is_dir(follow_symlinks=False):
                            other.append((entry.name, entry, None))
                        elif entry.is_file(follow_symlinks=False):
                            names.append(entry.name)
                            if len(names) == _LIST_BATCH:
                                plain.append(pa.array(names, pa.string()))
                                names = []
                    except OSError as exc:
                        other.append((entry.name, entry, exc))
        except FileNotFoundError:
            return
        plain.append(pa.array(names, pa.string()))
        del names
        # Arrow sorts UTF-8 bytewise, which is code point order: the order sorted() gives.
        sorted_names = pa.concat_arrays(plain)
        sorted_names = sorted_names.take(pc.sort_indices(sorted_names))
        del plain
        other.sort(key=lambda o: o[0])
        prefix = real_folder.rstrip("/") + "/"
        pending = iter(other)
        nxt = next(pending, None)

        def handle(name: str, entry: os.DirEntry, exc: OSError | None) -> None:
            path = entry.path
            if not _utf8(name):
                skipped.append(Skipped(_printable(path), "file name is not valid UTF-8; "
                                       "rename it to read it"))
            elif exc is not None:
                skipped.append(Skipped(path, describe_error(path, exc).split(": ", 1)[-1]))
            elif entry.is_symlink():
                links.append(path)  # followed after every real folder is listed
            elif recursive:  # a folder
                seen_dirs.add(prefix + name)
                visit(path, prefix + name)

        for lo in range(0, len(sorted_names), _LIST_BATCH):
            chunk = sorted_names.slice(lo, _LIST_BATCH).to_pylist()
            done = 0  # plain files of this chunk listed so far
            # the entries named before this chunk's last file, each at its place
            while nxt is not None and nxt[0] < chunk[-1]:
                at = bisect.bisect_left(chunk, nxt[0], done)
                add_plain(folder, chunk[done:at])
                done = at
                handle(*nxt)
                nxt = next(pending, None)
            add_plain(folder, chunk[done:])
        while nxt is not None:
            handle(*nxt)
            nxt = next(pending, None)

    def listed_as(real: str) -> str | None:
        """The path a file was already listed as (``real``: its real path), None if not yet."""
        if real in linked_files:
            return linked_files[real]
        parent, base = os.path.split(real)
        folder = listed_dirs.get(parent)
        # a real path names no link, so the file was listed there as a plain file
        return _join(folder, base) if folder is not None and _utf8(base) else None

    def follow(path: str) -> None:
        try:
            real = os.path.realpath(path)
            if not os.path.exists(real):
                skipped.append(Skipped(path, "broken symbolic link (its target does not exist)"))
                return
            if not inside(real):
                skipped.append(Skipped(path, f"symbolic link to {_printable(real)}, outside "
                                       "the listed root; not followed"))
                return
            st = os.stat(path)
        except OSError as exc:
            skipped.append(Skipped(path, describe_error(path, exc).split(": ", 1)[-1]))
            return
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                return
            if real in seen_dirs:
                skipped.append(Skipped(path, f"symbolic link to {_printable(real)}, a folder "
                                       "already listed (a loop or a duplicate); not followed"))
                return
            seen_dirs.add(real)
            visit(path, real)
        elif stat.S_ISREG(st.st_mode):
            listed = listed_as(real)
            if listed is not None:
                skipped.append(Skipped(path, f"symbolic link to a file already listed as "
                                       f"{listed}; not read twice"))
                return
            linked_files[real] = path
            add([path], [st.st_size], [st.st_mtime_ns])

    if os.path.isdir(root):
        visit(root, real_root)
        while links:  # in the order met; each may list more folders (and so more links)
            follow(links.pop(0))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA), skipped


def list_table(loc: Location, recursive: bool = True) -> tuple[pa.Table, list[Skipped]]:
    """Files under ``loc`` as a :data:`LISTING_SCHEMA` table, and the entries left out (see
    :func:`_walk_local`; S3 has no links). A local listing never follows a symlink out of
    ``loc`` or round a loop."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        try:
            return _walk_local(loc.path, recursive)
        except OSError as exc:
            raise _wrap(loc.uri, exc) from None
    infos = _remote_files(loc, recursive)
    return pa.table([pa.array([i.path for i in infos], pa.string()),
                     pa.array([i.size for i in infos], pa.int64()),
                     pa.array([i.mtime_ns for i in infos], pa.int64())],
                    schema=LISTING_SCHEMA), []


def list_tree(loc: Location, recursive: bool = True) -> tuple[list[pafs.FileInfo], list[Skipped]]:
    """:func:`list_table` as FileInfo objects (for folders of a few files: one object each)."""
    if not isinstance(loc.fs, pafs.LocalFileSystem):
        return _remote_files(loc, recursive), []
    table, skipped = list_table(loc, recursive)
    return [pafs.FileInfo(p, pafs.FileType.File, size=s, mtime_ns=m) for p, s, m in
            zip(*(table.column(c).to_pylist() for c in ("path", "size", "mtime_ns")))], skipped


def _remote_files(loc: Location, recursive: bool) -> list[pafs.FileInfo]:
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive,
                                                       allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None
    return [i for i in infos if i.type == pafs.FileType.File]


def list_files(loc: Location, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under ``loc`` (:func:`list_tree` without the skipped entries)."""
    return list_tree(loc, recursive)[0]


def read_bytes(loc: Location) -> bytes:
    # A local file is read straight into the bytes object (its size is known); a stream is read
    # into an Arrow buffer first and then copied, which holds the file twice (26 MB extra for
    # CelebA's attribute file, kept by Arrow's allocator afterwards).
    local = isinstance(loc.fs, pafs.LocalFileSystem)
    try:
        with (loc.fs.open_input_file if local else loc.fs.open_input_stream)(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{loc.uri}: not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object atomically (temp name, then move; S3 puts are atomic already)."""
    try:
        parent = posixpath.dirname(loc.path)
        loc.fs.create_dir(parent, recursive=True)
        if isinstance(loc.fs, pafs.LocalFileSystem):
            tmp = posixpath.join(parent,
                                 f"{TEMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
            try:
                with loc.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, loc.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)  # a failed write or move leaves no hidden temp file behind
                raise
        else:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None


# --------------------------------------------------------------------------------------------
# Conditional writes: the run lock and run.json need "create if absent" and "replace if
# unchanged". pyarrow's S3 filesystem has no conditional put, so S3 goes through botocore's
# put_object(IfNoneMatch="*" / IfMatch=etag) (AWS S3, MinIO and SeaweedFS honour both). Locally
# "create if absent" is O_CREAT|O_EXCL and "replace if unchanged" compares a content hash under
# an flock on the file's folder (processes of one host; not for NFS).


@lru_cache(maxsize=16)
def _botocore_client(key: tuple):
    import botocore.config
    import botocore.session
    from botocore import UNSIGNED

    endpoint, region, ak, sk, anonymous, timeout = key
    session = botocore.session.get_session()
    ak = ak or os.environ.get("AWS_ACCESS_KEY_ID", "")
    sk = sk or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    kwargs: dict = {"region_name": region or ("us-east-1" if endpoint else None)}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    signature = None
    if ak and sk:
        kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = ak, sk
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["aws_session_token"] = os.environ["AWS_SESSION_TOKEN"]
    elif anonymous:
        signature = UNSIGNED
    conf = botocore.config.Config(connect_timeout=timeout, read_timeout=max(30.0, timeout),
                                  retries={"max_attempts": 3, "mode": "standard"},
                                  signature_version=signature)
    return session.create_client("s3", config=conf, **kwargs)


def _bucket_key(loc: Location) -> tuple[str, str]:
    bucket, _, key = loc.path.partition("/")
    return bucket, key


def _s3_call(loc: Location, cfg: StorageConfig | None, op: str, **kw):
    """One botocore call; returns None on a failed precondition (412) or a missing key (404)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(loc)
    client = _botocore_client(_cfg_key(cfg))
    try:
        return getattr(client, op)(Bucket=bucket, Key=key, **kw)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        if status in (412, 409) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return None
        if status == 404 or code in ("NoSuchKey", "NotFound"):
            return None
        if status in (401, 403):
            raise StorageError(f"{loc.uri}: {_DENIED}") from None
        raise StorageError(f"{loc.uri}: {code or status}: {exc}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{loc.uri}: {_UNREACHABLE} ({exc})") from None


@contextlib.contextmanager
def _local_mutex(path: str):
    """An exclusive flock on the folder holding ``path`` (leaves no file behind)."""
    import fcntl

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def create_exclusive(loc: Location, data: bytes, cfg: StorageConfig | None = None) -> bool:
    """Write ``loc`` only if nothing is there; False (nothing written) when it already exists."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        tmp = f"{loc.path}.{TEMP_PREFIX}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:  # complete before it becomes visible under its name
            f.write(data)
        try:
            os.link(tmp, loc.path)  # atomic, and fails when the name exists (like O_EXCL)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: plain O_EXCL
            try:
                fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            os.remove(tmp)
    if not is_s3(loc.uri):
        raise StorageError(f"{loc.uri}: conditional writes need a local path or s3://")
    return _s3_call(loc, cfg, "put_object", Body=data, IfNoneMatch="*") is not None


def read_versioned(loc: Location, cfg: StorageConfig | None = None
                   ) -> tuple[bytes, str] | None:
    """``(content, version)`` of ``loc``, or None when absent; pass the version to
    :func:`replace_if` to write only if nobody wrote in between."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        try:
            with open(loc.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        import hashlib

        return data, hashlib.sha256(data).hexdigest()
    r = _s3_call(loc, cfg, "get_object")
    if r is None:
        return None
    return r["Body"].read(), r["ETag"]


def replace_if(loc: Location, data: bytes, version: str,
               cfg: StorageConfig | None = None) -> bool:
    """Replace ``loc`` with ``data`` only if it still has ``version``; False otherwise."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        with _local_mutex(loc.path):
            now = read_versioned(loc)
            if now is None or now[1] != version:
                return False
            write_bytes(loc, data)
            return True
    return _s3_call(loc, cfg, "put_object", Body=data, IfMatch=version) is not None


def delete_file(loc: Location, cfg: StorageConfig | None = None) -> None:
    """Remove one object; missing is fine."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        with _local_mutex(loc.path), contextlib.suppress(FileNotFoundError):
            os.remove(loc.path)
        return
    _s3_call(loc, cfg, "delete_object")


def read_json(loc: Location) -> dict:
    return json.loads(read_bytes(loc))


def write_json(loc: Location, obj) -> None:
    write_bytes(loc, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def delete(loc: Location) -> None:
    """Remove a file or a whole folder; missing is fine."""
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.Directory:
            loc.fs.delete_dir(loc.path)
        elif info.type == pafs.FileType.File:
            loc.fs.delete_file(loc.path)
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None


def write_table(table: pa.Table, loc: Location, name: str = "part-00000.parquet",
                metadata: dict[str, str] | None = None, schema: pa.Schema | None = None) -> Location:
    """Write one Parquet file into the table folder ``loc`` atomically.

    ``schema`` (when given) is enforced: the table is cast to it and a mismatch is an error.
    ``metadata`` goes into the file's key-value metadata (model names, versions ...).
    """
    if schema is not None:
        table = conform(table, schema)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    target = loc.join(name)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(target, buf.getvalue())
    return target


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table`` to ``schema`` (column order included); missing columns are errors."""
    names = set(table.column_names)
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise ValueError(f"table lacks columns {missing} required by its schema")
    cols = [table.column(f.name).cast(f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema.remove_metadata()).replace_schema_metadata(
        schema.metadata)


def parquet_files(loc: Location) -> list[str]:
    """Visible Parquet files of a table folder (hidden/temporary names excluded), sorted."""
    out = []
    for info in list_files(loc, recursive=True):
        rel = posixpath.relpath(info.path, loc.path)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if info.path.endswith(".parquet"):
            out.append(info.path)
    return sorted(out)


def read_schema(loc: Location) -> pa.Schema | None:
    """The schema, with its key-value metadata, of a table folder's first visible Parquet file
    (every file of a table shares it); None when the folder holds no table."""
    files = parquet_files(loc)
    if not files:
        return None
    try:
        with loc.fs.open_input_file(files[0]) as f:
            return pq.read_schema(f)
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None


def read_table(loc: Location, columns: Iterable[str] | None = None,
               schema: pa.Schema | None = None) -> pa.Table:
    """Read every visible Parquet file of a table folder into one table."""
    files = parquet_files(loc)
    if not files:
        if schema is not None:
            return schema.empty_table()
        raise StorageError(f"{loc.uri}: no table here (no Parquet files)")
    try:
        ds = pads.dataset(files, filesystem=loc.fs, format="parquet", schema=schema)
        return ds.to_table(columns=list(columns) if columns is not None else None)
    except (OSError, pa.ArrowException) as exc:
        raise _wrap(loc.uri, exc) from None
