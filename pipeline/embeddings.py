"""The small registry of embedding backbones the extract stage can run next to the attribute model.

``extract.embedding`` names one of:

* ``resnet50``: torchvision's ResNet-50 with the classifier removed, 2048-d pooled features (the
  usual baseline in earlier face-clustering studies). Weights: ``"none"``, ``"imagenet"`` (torch
  cache only) or a path / ``s3://`` URI of a state dict.
* ``attribute_backbone``: the pooled 1280-d features of the trained attribute model itself. It
  adds no second network: one forward pass gives both the embedding and the attribute logits.
* ``facenet``: facenet-pytorch's InceptionResnetV1 (512-d; the 128-d figure belongs to the older
  TensorFlow FaceNet). Only when the optional ``facenet`` extra (facenet-pytorch) is installed; its
  weights are ``"vggface2"`` / ``"casia-webface"`` from the torch cache (downloaded by
  facenet-pytorch's own ``load_weights`` when ``weights.download`` is on; it publishes no hash), a
  state-dict path, or ``"none"``.
* ``dlib``: dlib's face-recognition ResNet (128-d) after HOG detection and 5-point alignment
  (:mod:`pipeline.dlib_face`), weights from the installed ``face-recognition-models`` package. It
  is not a torch module: extract runs it in its own CPU actor pool on the original decoded image
  (``separate_pool``), and ``extract.embedding_weights`` must stay ``"none"``.

Every backbone is returned as an :class:`EmbeddingModel`: the module, its output size, its input
normalisation and a name/version string written into the features files' metadata.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import StorageConfig
from pipeline.models import (IMAGENET_MEAN, IMAGENET_STD, WeightsError, apply_state_dict,
                             imagenet_state_dict, load_state_dict)

EMBEDDINGS: tuple[str, ...] = ("resnet50", "attribute_backbone", "facenet", "dlib")

# facenet-pytorch's own input standardisation, (x*255 - 127.5) / 128, written as mean/std on [0,1].
_FACENET_MEAN = (127.5 / 255,) * 3
_FACENET_STD = (128.0 / 255,) * 3
FACENET_FILES = {"vggface2": "20180402-114759-vggface2.pt",
                  "casia-webface": "20180408-102900-casia-webface.pt"}


@dataclass
class EmbeddingModel:
    """A backbone ready for inference (eval mode, CPU until moved)."""

    name: str  # registry name (extract.embedding)
    module: nn.Module | None  # None for attribute_backbone: the attribute model computes it
    dim: int  # length of one embedding vector
    mean: tuple[float, float, float]  # per-channel input mean on [0, 1] pixels
    std: tuple[float, float, float]  # per-channel input std on [0, 1] pixels
    weights: str  # the weights spec it was built with
    version: str  # what produced the weights (torchvision version, file hash ...)
    separate_pool: bool = False  # runs in its own CPU actor pool on the original image (dlib)
    origin: str = ""  # where the weights came from, in words (for the report)


def _spec_tag(spec: str, storage_cfg: StorageConfig | None, seed: int) -> str:
    """A short version tag for a weights spec: the spec itself, plus a hash for files."""
    if spec == "none":
        return f"none(seed={seed})"
    if spec in ("imagenet", *FACENET_FILES):
        return spec
    from pipeline import storage

    data = storage.read_bytes(storage.filesystem(spec, storage_cfg))
    return f"sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def _seeded(factory, seed: int) -> nn.Module:
    """Build a module with a fixed torch seed: "none" weights must be the same random network in
    every actor and on every rerun, or embeddings from two actors would not be comparable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _resnet50(weights: str, storage_cfg: StorageConfig | None, seed: int,
              download: bool = False) -> EmbeddingModel:
    import torchvision
    from torchvision.models import ResNet50_Weights, resnet50

    model = _seeded(lambda: resnet50(weights=None), seed)
    model.fc = nn.Identity()  # keep the 2048-d pooled features, drop the ImageNet classifier
    if weights != "none":
        state = (imagenet_state_dict(ResNet50_Weights.IMAGENET1K_V2, download)
                 if weights == "imagenet"
                 else load_state_dict(weights, storage_cfg))
        # a full classification checkpoint carries fc.*: it has no place in an embedding model
        apply_state_dict(model, state, weights, ignore=("fc.",))
    model.eval()
    return EmbeddingModel("resnet50", model, 2048, IMAGENET_MEAN, IMAGENET_STD, weights,
                          f"torchvision-{torchvision.__version__}/{_spec_tag(weights, storage_cfg, seed)}",
                          origin=_origin(weights, ResNet50_Weights.IMAGENET1K_V2.url))


def _origin(weights: str, url: str = "") -> str:
    if weights == "none":
        return "random initialisation (seeded from run.seed)"
    if weights == "imagenet":
        return f"torchvision ImageNet weights, {url} (torch cache)"
    return f"state dict {weights}"


# The message a missing optional package gives; tests match on its start.
MISSING_FACENET = ('extract.embedding = "facenet" needs the optional facenet extra '
                   '(the facenet-pytorch package), which is not installed')


def _facenet(weights: str, storage_cfg: StorageConfig | None, seed: int,
             download: bool = False) -> EmbeddingModel:
    try:
        import facenet_pytorch
        from facenet_pytorch import InceptionResnetV1
    except ImportError:
        raise WeightsError(
            f"{MISSING_FACENET}; install it with `pip install 'faceaudit[facenet]'` (its current "
            f"release pins an older torch: `pip install --no-deps facenet-pytorch` keeps this "
            f"one), or choose \"dlib\", \"resnet50\" or \"attribute_backbone\"") from None
    if weights == "imagenet":
        raise WeightsError('facenet has no "imagenet" weights; use "vggface2" or "casia-webface" '
                           '(from the torch cache), "none" or a path / s3:// URI of a state dict')
    model = _seeded(lambda: InceptionResnetV1(pretrained=None, classify=False), seed)
    if weights in FACENET_FILES:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", FACENET_FILES[weights])
        if not os.path.exists(path) and download:
            # facenet-pytorch's own mechanism: download_url_to_file into the same torch cache
            from facenet_pytorch.models.inception_resnet_v1 import load_weights

            load_weights(InceptionResnetV1(pretrained=None, classify=False), weights)
        if not os.path.exists(path):
            raise WeightsError(f'facenet weights "{weights}" need {path}, which is not in the torch '
                               f'cache, and downloads are off; set weights.download = true, copy '
                               f'it there, or use "none" or a path / s3:// URI of a state dict')
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif weights != "none":
        state = load_state_dict(weights, storage_cfg)
    if weights != "none":
        # the VGGFace2 checkpoint carries its identity classifier (logits.*); it is not used
        apply_state_dict(model, state, weights, ignore=("logits.",))
    model.eval()
    return EmbeddingModel("facenet", model, 512, _FACENET_MEAN, _FACENET_STD, weights,
                          f"facenet-pytorch-{getattr(facenet_pytorch, '__version__', '?')}/"
                          f"{_spec_tag(weights, storage_cfg, seed)}",
                          origin=(f"facenet-pytorch {weights} release file (torch cache)"
                                  if weights in FACENET_FILES else _origin(weights)))


def _dlib_embedding(weights: str) -> EmbeddingModel:
    from pipeline import dlib_face

    if weights not in ("none", ""):
        raise WeightsError(f'extract.embedding_weights = {weights!r} has no meaning for "dlib", '
                           f'whose weights are the installed face-recognition-models files; '
                           f'leave it "none"')
    try:
        folder = dlib_face.model_dir()
        version = dlib_face.weights_version()
    except dlib_face.DlibMissing as exc:
        raise WeightsError(str(exc)) from None
    return EmbeddingModel("dlib", None, dlib_face.DIM, (0.0,) * 3, (1.0,) * 3,
                          "face-recognition-models", version,
                          separate_pool=True,
                          origin=f"dlib's {dlib_face.DESCRIPTOR_FILE} and "
                                 f"{dlib_face.LANDMARKS_FILE} from the face-recognition-models "
                                 f"package ({folder})")


def build_embedding(name: str, weights: str = "none", storage_cfg: StorageConfig | None = None,
                    attribute_info=None, seed: int = 0, download: bool = False) -> EmbeddingModel:
    """The embedding backbone ``name`` with ``weights`` (see the module docstring).

    ``attribute_info`` (the trained model's :class:`~pipeline.models.AttributeModelInfo`) is
    needed for ``attribute_backbone``, whose features and normalisation are the attribute model's.
    ``seed`` fixes the random initialisation of ``"none"`` weights (derive it from run.seed).
    ``download`` lets standard weights (``"imagenet"``, ``"vggface2"`` ...) be fetched into the
    torch cache when missing (``weights.download``).
    """
    if name == "resnet50":
        return _resnet50(weights, storage_cfg, seed, download)
    if name == "facenet":
        return _facenet(weights, storage_cfg, seed, download)
    if name == "dlib":
        return _dlib_embedding(weights)
    if name == "attribute_backbone":
        if attribute_info is None:
            raise ValueError("attribute_backbone needs the trained attribute model's info")
        if weights not in ("none", ""):
            raise WeightsError(f'extract.embedding_weights = {weights!r} has no meaning for '
                               f'"attribute_backbone", whose weights are the trained attribute '
                               f'model\'s; leave it "none"')
        return EmbeddingModel("attribute_backbone", None, 1280, tuple(attribute_info.mean),
                              tuple(attribute_info.std), "trained",
                              f"attribute-model/{attribute_info.version or 'unversioned'}",
                              origin="the trained attribute model's pooled features")
    raise ValueError(f"unknown embedding {name!r}; choose one of {list(EMBEDDINGS)}")
