"""Networks and their weights: the attribute model and the embedding backbones.

Weights are named by a spec string (design.md, "Models and weights"):

* ``"none"``: random initialisation (tests, the demo);
* ``"imagenet"``: torchvision's ImageNet weights from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``); when missing they are downloaded there by torch.hub, with
  its hash check, only if the run allows it (``weights.download``), else an error names the file;
* a path or ``s3://`` URI of a state dict saved with ``torch.save(model.state_dict())``.

A missing or mismatched weight file is an error naming the alternatives, never a silent
fallback to random weights.

The trained attribute model is exported by the train stage as ``model.pt`` (a plain state dict,
loadable with ``torch.load(weights_only=True)``) plus ``model.json`` (architecture, attribute
names, image size, normalisation, metrics); :func:`load_attribute_model` reads that pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline import storage
from pipeline.config import StorageConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``uint8`` NCHW images -> float NCHW, scaled to [0, 1] and normalised per channel."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the spec and the alternatives."""


_ALTERNATIVES = ('use "none" for random initialisation, "imagenet" (torchvision\'s weights, in the '
                 'torch cache or downloaded with weights.download = true), or a path / s3:// URI '
                 'of a state dict')

# torch.hub's convention: a file name "<name>-<first hex digits of its sha256>.<ext>"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def cache_path(url: str) -> str:
    """Where torch's own download mechanism keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights_file(url: str, download: bool, what: str = "weights") -> str:
    """The local path of the standard weights file ``url``, downloaded first when allowed.

    The file lives in the torch cache (:func:`cache_path`). When it is missing and ``download``
    is on, torch.hub's ``download_url_to_file`` fetches it with its hash check (the sha256 prefix
    in torchvision's file names); when ``download`` is off the error names the file and the cache
    path. A cached file whose sha256 does not start with that prefix is refused as corrupted.
    """
    path = cache_path(url)
    fname = os.path.basename(url)
    m = _HASH_IN_NAME.search(fname)
    prefix = m.group(1) if m else None
    if not os.path.exists(path):
        if not download:
            raise WeightsError(
                f"{what} need {path} ({fname}), which is not in the torch cache, and downloads "
                f"are off; set weights.download = true (or run `python -m jobs.fetch_weights "
                f"--config ...` once with it on), copy the file there, or {_ALTERNATIVES}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            # torch.hub writes to a temp file and moves it into place only after the hash check
            torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=False)
        except RuntimeError as exc:
            if "hash" in str(exc).lower():
                raise WeightsError(f"downloaded {url} does not match its published hash ({exc}); "
                                   f"nothing was written to {path}; retry, or copy a good file "
                                   f"there") from None
            raise
        except OSError as exc:  # URLError, timeouts, refused connections
            raise WeightsError(f"could not download {what} from {url}: {exc}; check the network "
                               f"or copy {fname} to {path}") from None
    if prefix is not None:
        got = _sha256(path)
        if not got.startswith(prefix):
            raise WeightsError(f"{path} is corrupted: its sha256 starts {got[:len(prefix)]}, its "
                               f"name says {prefix}; delete it and fetch it again "
                               f"(weights.download = true) or copy a good file there")
    return path


def imagenet_state_dict(weights_enum, download: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's weights for ``weights_enum`` from the torch cache (fetched, hash-checked,
    only when ``download``); a missing or unreadable file is a :class:`WeightsError`."""
    path = fetch_weights_file(weights_enum.url, download, 'pretrained "imagenet"')
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file in the cache
        raise WeightsError(f"{path} cannot be read as a state dict ({type(exc).__name__}: "
                           f"{exc}); delete it and fetch it again") from None


def load_state_dict(spec: str, storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a path or URI (``weights_only``: no code is executed)."""
    loc = storage.filesystem(spec, storage_cfg)
    if not storage.exists(loc):
        raise WeightsError(f"weight file {spec!r} does not exist; {_ALTERNATIVES}")
    obj = torch.load(io.BytesIO(storage.read_bytes(loc)), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"weight file {spec!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], spec: str,
                     strict_prefix: str = "", ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``: every key must match by name and shape except those that
    start with ``ignore`` (a replaced head), else a :class:`WeightsError` naming ``spec``."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    missing = [k for k in own if k not in state and not k.startswith(ignore or ("\0",))]
    shape_bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    if missing or shape_bad or unexpected:
        raise WeightsError(
            f"weights {spec!r} do not match the model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shape_bad)} with another shape (e.g. {shape_bad[:3]}); {_ALTERNATIVES}")
    model.load_state_dict(state, strict=False)


ATTRIBUTE_ARCHS = ("mobilenet_v2", "small_cnn")
SMALL_CNN_CHANNELS = (32, 64, 128, 256)


def _small_cnn_features() -> nn.Sequential:
    """Four conv-BN-ReLU-maxpool blocks (32 ... 256 channels): learns from a few hundred faces on
    CPU, where MobileNetV2 from random init still predicts priors (docs/train.md)."""
    layers, c_in = [], 3
    for c_out in SMALL_CNN_CHANNELS:
        layers.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
        c_in = c_out
    return nn.Sequential(*layers)


class AttributeNet(nn.Module):
    """A backbone with one logit per attribute; ``embed`` gives the pooled features.

    ``arch``: ``mobilenet_v2`` (1280-d features) or ``small_cnn`` (256-d); both keep their
    parameters under ``features.*`` and ``head.*``.
    """

    def __init__(self, n_attributes: int, dropout: float = 0.2, arch: str = "mobilenet_v2"):
        super().__init__()
        if arch == "mobilenet_v2":
            from torchvision.models import mobilenet_v2

            base = mobilenet_v2(weights=None)
            self.features, dim = base.features, base.last_channel
        elif arch == "small_cnn":
            self.features, dim = _small_cnn_features(), SMALL_CNN_CHANNELS[-1]
        else:
            raise WeightsError(f"unknown attribute model architecture {arch!r}; known: "
                               f"{list(ATTRIBUTE_ARCHS)}")
        self.arch = arch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, n_attributes)
        self.embedding_dim = dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))


def build_attribute_model(n_attributes: int, pretrained: str = "none",
                          storage_cfg: StorageConfig | None = None,
                          download: bool = False,
                          arch: str = "mobilenet_v2") -> AttributeNet:
    """A fresh attribute model; ``pretrained`` initialises the backbone (the head is new).

    ``download`` lets ``"imagenet"`` fetch torchvision's file into the torch cache when missing.
    """
    model = AttributeNet(n_attributes, arch=arch)
    if pretrained == "none":
        return model
    if pretrained == "imagenet" and arch != "mobilenet_v2":
        raise WeightsError(f'pretrained "imagenet" exists for mobilenet_v2 only, not {arch!r}; '
                           f'use "none" or a path / s3:// URI of a state dict')
    if pretrained == "imagenet":
        from torchvision.models import MobileNet_V2_Weights

        state = imagenet_state_dict(MobileNet_V2_Weights.IMAGENET1K_V1, download)
        state = {k: v for k, v in state.items() if k.startswith("features.")}
    else:
        state = load_state_dict(pretrained, storage_cfg)
    apply_state_dict(model, state, pretrained, ignore=("head.",))
    return model


@dataclass
class AttributeModelInfo:
    """What ``model.json`` holds next to the exported state dict."""

    arch: str
    attributes: list[str]
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    thresholds: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    # What the model was trained on (dataset, data root, split rule, rows per split); {} if unknown.
    trained_on: dict[str, Any] = field(default_factory=dict)
    # The backbone's initial weights (train.pretrained: none / imagenet / a state dict); "" when
    # the model.json predates this field.
    pretrained: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AttributeModelInfo":
        return cls(**json.loads(text))


def export_attribute_model(model: nn.Module, info: AttributeModelInfo,
                           loc: storage.Location) -> None:
    """Write ``model.pt`` then ``model.json`` (the json's presence marks a complete export)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buf)
    storage.write_bytes(loc.join("model.pt"), buf.getvalue())
    storage.write_bytes(loc.join("model.json"), info.to_json().encode())


def load_attribute_model(loc: storage.Location) -> tuple[AttributeNet, AttributeModelInfo]:
    """Load an exported attribute model (eval mode, CPU)."""
    meta_loc = loc.join("model.json")
    if not storage.exists(meta_loc):
        raise WeightsError(f"no trained attribute model at {loc.uri} (model.json missing); run "
                           f"the train_attributes stage first")
    info = AttributeModelInfo.from_json(storage.read_bytes(meta_loc).decode())
    model = AttributeNet(len(info.attributes), arch=info.arch)
    state = torch.load(io.BytesIO(storage.read_bytes(loc.join("model.pt"))), map_location="cpu",
                       weights_only=True)
    apply_state_dict(model, state, loc.join("model.pt").uri)
    model.eval()
    return model, info
