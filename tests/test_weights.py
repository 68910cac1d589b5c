"""Standard weights: the download switch, torch.hub's hash check, corrupted files, missing extras.

The download path is exercised against a loopback HTTP server serving a tiny state dict; nothing
here reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
from pathlib import Path

import pytest
import torch

from pipeline import models, weights
from pipeline.config import load_config
from pipeline.embeddings import MISSING_FACENET, build_embedding
from pipeline.models import WeightsError, build_attribute_model, fetch_weights_file
from tests.conftest import free_port


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def weight_server(tmp_path):
    """Serves ``tmp_path/www`` on 127.0.0.1; yields (base url, folder, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):  # keep pytest's output clean; record the request instead
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www, seen
    server.shutdown()
    server.server_close()


def _tiny_state_dict() -> tuple[dict, bytes]:
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(2)}
    buf = io.BytesIO()
    torch.save(state, buf)
    return state, buf.getvalue()


def _publish(www: Path, data: bytes, stem: str = "tiny", digest: str | None = None) -> str:
    """Save ``data`` under torchvision's naming convention ``<stem>-<sha256[:8]>.pth``."""
    name = f"{stem}-{(digest or hashlib.sha256(data).hexdigest())[:8]}.pth"
    (www / name).write_bytes(data)
    return name


def test_downloads_off_names_the_file_and_cache_path(torch_home, weight_server):
    base, www, seen = weight_server
    name = _publish(www, _tiny_state_dict()[1])
    with pytest.raises(WeightsError) as err:
        fetch_weights_file(f"{base}/{name}", download=False)
    assert name in str(err.value) and str(torch_home / name) in str(err.value)
    assert "weights.download = true" in str(err.value)
    assert seen == []  # nothing was requested


def test_downloads_on_fetch_into_the_torch_cache_hash_checked(torch_home, weight_server):
    base, www, seen = weight_server
    state, data = _tiny_state_dict()
    name = _publish(www, data)
    path = fetch_weights_file(f"{base}/{name}", download=True)
    assert path == str(torch_home / name) and Path(path).read_bytes() == data
    assert seen == [f"/{name}"]
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    # a second call finds it in the cache and downloads nothing
    assert fetch_weights_file(f"{base}/{name}", download=True) == path and len(seen) == 1


def test_corrupted_download_is_refused_and_not_cached(torch_home, weight_server):
    base, www, _ = weight_server
    data = _tiny_state_dict()[1]
    # the file's name promises the hash of other bytes: a corrupted or tampered download
    name = _publish(www, data[:-10] + b"0" * 10, digest=hashlib.sha256(data).hexdigest())
    with pytest.raises(WeightsError, match="does not match its published hash"):
        fetch_weights_file(f"{base}/{name}", download=True)
    assert not (torch_home / name).exists()


def test_corrupted_cached_file_is_refused(torch_home, weight_server):
    base, www, _ = weight_server
    data = _tiny_state_dict()[1]
    name = _publish(www, data)
    torch_home.mkdir(parents=True)
    (torch_home / name).write_bytes(data[: len(data) // 2])  # a truncated copy in the cache
    with pytest.raises(WeightsError, match="is corrupted"):
        fetch_weights_file(f"{base}/{name}", download=True)


def test_unreachable_server_is_a_clear_error(torch_home):
    url = f"http://127.0.0.1:{free_port()}/tiny-0123abcd.pth"
    with pytest.raises(WeightsError, match="could not download"):
        fetch_weights_file(url, download=True)


def test_imagenet_with_downloads_off_names_torchvisions_file(torch_home):
    from torchvision.models import MobileNet_V2_Weights

    fname = MobileNet_V2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    with pytest.raises(WeightsError) as err:
        build_attribute_model(3, "imagenet", download=False)
    assert fname in str(err.value) and str(torch_home / fname) in str(err.value)


def test_missing_optional_package_names_the_extra():
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("facenet-pytorch is installed here; the missing-package path cannot run")
    with pytest.raises(WeightsError) as err:
        build_embedding("facenet", "vggface2")
    assert str(err.value).startswith(MISSING_FACENET)
    assert "faceaudit[facenet]" in str(err.value)


def test_fetch_job_lists_every_standard_weight_of_a_config():
    cfg = load_config(Path(__file__).parents[1] / "jobs" / "configs" / "celeba.toml")
    assert cfg.weights.download is True
    named = weights.named_weights(cfg)
    keys = {k for k, _, _ in named}
    assert "train.pretrained" in keys and "extract.embedding" in keys
    demo = load_config(Path(__file__).parents[1] / "jobs" / "configs" / "demo.toml")
    assert demo.weights.download is False
    # the demo names only the installed dlib files: fetching them downloads nothing
    rows = weights.fetch(demo)
    assert {r["weights"] for r in rows} == {"shape_predictor_5_face_landmarks.dat",
                                            "dlib_face_recognition_resnet_model_v1.dat"}
    assert all(len(r["sha256"]) == 64 and Path(r["path"]).exists() for r in rows)
    assert models.cache_path("http://x/y/a-1234abcd.pth").endswith("checkpoints/a-1234abcd.pth")
