"""The one reader of saved classifier files (``classifiers/model_files/*.skops``, listed by the
``classifiers/models`` index).

A model file lives under ``output.root``, which may be a shared S3 prefix: anyone who can write
there can plant a file. skops rebuilds only the types it is told to trust, so the trust list is a
security boundary. Every reader of a model file (classify's own checks, explain) goes through
:func:`load`, which

* refuses a ``path`` that is absolute, contains ``..`` or (locally) resolves, through a symlink,
  to a file outside the output root;
* rebuilds only skops' built-in safe types plus the exact names in :data:`TRUSTED_TYPES`; a file
  needing any other type (``numpy.savetxt``, ``builtins.exec`` ...) is refused with the
  untrusted types named, before anything in it is constructed.

Types are matched exactly, never by prefix: ``numpy.`` covers ``numpy.savetxt`` and
``sklearn.`` covers helpers that read or write files.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Any

from pipeline import storage
from pipeline.config import Config

# Types skops may rebuild beyond its built-in safe set (what classify's three models need);
# anything else named by a file is refused.
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)


class UntrustedModelError(ValueError):
    """A model file that names types outside the allow-list, or a path outside the output root."""


def resolve(root: storage.Location, path: str) -> storage.Location:
    """``path`` (relative, posix) under ``root``; refuses any path that leaves the root."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/") or "://" in path:
        raise UntrustedModelError(f"model path {path!r} must be a relative path inside "
                                  f"{root.uri}; refusing it")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise UntrustedModelError(f"model path {path!r} is not a plain path inside {root.uri} "
                                  "(empty, '.' or '..' parts); refusing it")
    loc = root.join(*parts)
    if not storage.is_s3(root.uri):
        real_root = os.path.realpath(root.path)
        real = os.path.realpath(loc.path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise UntrustedModelError(f"model path {path!r} resolves to {real}, outside "
                                      f"{real_root} (a symlink); refusing it")
    return loc


def check(blob: bytes, name: str) -> list[str]:
    """The types ``blob`` needs trusted; raises when any is outside :data:`TRUSTED_TYPES`."""
    import skops.io as sio

    untrusted = sio.get_untrusted_types(data=blob)
    unexpected = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if unexpected:
        raise UntrustedModelError(f"{name}: refusing to load a model file that needs the "
                                  f"untrusted types {unexpected} (allowed beyond skops' safe "
                                  f"set: pipeline.modelfiles.TRUSTED_TYPES)")
    return list(untrusted)


def loads(blob: bytes, name: str = "model file") -> Any:
    """Rebuild an estimator from skops bytes, trusting only :data:`TRUSTED_TYPES`."""
    import skops.io as sio

    return sio.loads(blob, trusted=check(blob, name))


def load(cfg: Config, path: str, out_root: str | None = None) -> tuple[Any, str]:
    """Load the model file ``path`` (relative to the output root); returns
    ``(estimator, sha256 hex of the file)``."""
    root = storage.filesystem(out_root or cfg.output.root, cfg.storage)
    loc = resolve(root, path)
    blob = storage.read_bytes(loc)
    return loads(blob, loc.uri), hashlib.sha256(blob).hexdigest()
