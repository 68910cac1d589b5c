"""infra/local_head.sh and local_worker.sh keep their state in a directory private to the user.

Another local user who creates the head's directory (or plants a token, env.sh or pid file in it)
must never get control of the head: such a directory or file is refused with a message, never
reused (issue #12, item 7). These checks run before any Ray process starts; ``RAY=/bin/false``
makes sure none could (a check that wrongly passed would end in "did not start", not the
refusal the test asks for). The real start is exercised by tests/test_readme_shell.py and
tests/test_ray_cluster.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[1] / "infra"


@pytest.fixture
def tmp_path():
    """A short temporary folder: the scripts refuse a --dir over 37 characters (Ray's sockets)."""
    d = Path(tempfile.mkdtemp(prefix="fa", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("RAY_") and k not in ("FACEAUDIT_RAY_DIR", "XDG_RUNTIME_DIR")}
    base.update({"RAY": "/bin/false", "FACEAUDIT_RAY_START_ATTEMPTS": "1"}, **(env or {}))
    return subprocess.run([str(INFRA / script), *args], env=base, capture_output=True, text=True,
                          timeout=60)


def _private(tmp_path: Path) -> Path:
    d = tmp_path / "head"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


def _foreign_dir(tmp_path: Path) -> Path:
    """A directory owned by another user (root can make one; anyone else finds / owned by root)."""
    if os.getuid() != 0:
        return Path("/")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    return d


def test_default_dir_is_per_user(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    out = _run("local_head.sh", "env-file", env={"XDG_RUNTIME_DIR": str(xdg)})
    assert out.returncode == 1 and f"no head started from {xdg}/faceaudit-ray" in out.stderr
    out = _run("local_head.sh", "env-file")  # no XDG_RUNTIME_DIR: a per-uid folder in /tmp
    assert f"/tmp/faceaudit-ray-{os.getuid()}" in out.stdout + out.stderr


def test_start_creates_a_mode_700_directory(tmp_path):
    d = tmp_path / "new" / "head"
    out = _run("local_head.sh", "start", "--dir", str(d))
    assert out.returncode == 1 and "did not start" in out.stderr  # RAY=/bin/false
    assert (d.stat().st_mode & 0o777) == 0o700 and d.stat().st_uid == os.getuid()
    for f in ("auth_token", "env.sh", "head.log"):
        assert (d / f).stat().st_mode & 0o077 == 0, f"{f} is readable by others"


def test_a_directory_of_another_user_is_refused(tmp_path):
    d = _foreign_dir(tmp_path)
    for script, args in [("local_head.sh", ("start", "--dir", str(d))),
                         ("local_head.sh", ("stop", "--dir", str(d))),
                         ("local_worker.sh", ("start", "--head-dir", str(tmp_path), "--dir", str(d)))]:
        if script == "local_worker.sh":
            h = _private(tmp_path)
            (h / "env.sh").write_text("export RAY_ADDRESS=127.0.0.1:1\n")
            os.chmod(h / "env.sh", 0o600)
            (h / "head.pid").write_text(str(os.getpid()))  # "alive": this test process
            os.chmod(h / "head.pid", 0o600)
            args = ("start", "--head-dir", str(h), "--dir", str(d))
        out = _run(script, *args)
        assert out.returncode == 1, (script, args, out.stdout)
        assert f"{d} belongs to uid" in out.stderr and "not to you" in out.stderr, out.stderr


def test_a_directory_others_can_enter_is_refused(tmp_path):
    d = _private(tmp_path)
    os.chmod(d, 0o755)
    out = _run("local_head.sh", "start", "--dir", str(d))
    assert out.returncode == 1 and f"{d} has mode 755" in out.stderr
    assert not (d / "auth_token").exists()


def test_a_symlinked_directory_is_refused(tmp_path):
    target = _private(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(target)
    out = _run("local_head.sh", "start", "--dir", str(link))
    assert out.returncode == 1 and "is a symbolic link" in out.stderr


@pytest.mark.parametrize("name", ["auth_token", "env.sh", "head.pid"])
def test_a_planted_file_is_never_reused(tmp_path, name):
    d = _private(tmp_path)
    (d / name).write_text("12345")
    os.chmod(d / name, 0o644)
    out = _run("local_head.sh", "start", "--dir", str(d))
    assert out.returncode == 1 and f"{d / name} has mode 644" in out.stderr
    assert (d / name).read_text() == "12345"


def test_a_token_owned_by_someone_else_is_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("only root can create a file owned by another user")
    d = _private(tmp_path)
    (d / "auth_token").write_text("known-to-them")
    os.chmod(d / "auth_token", 0o600)
    os.chown(d / "auth_token", 65534, 65534)
    out = _run("local_head.sh", "start", "--dir", str(d))
    assert out.returncode == 1 and "auth_token belongs to uid 65534" in out.stderr


def test_stop_does_not_trust_a_planted_pid_file(tmp_path):
    d = _private(tmp_path)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        (d / "head.pid").write_text(str(victim.pid))
        os.chmod(d / "head.pid", 0o666)
        out = _run("local_head.sh", "stop", "--dir", str(d))
        assert out.returncode == 1 and "head.pid has mode 666" in out.stderr
        assert victim.poll() is None, "stop killed the process a planted pid file named"
    finally:
        victim.kill()
        victim.wait()


def test_worker_refuses_a_head_env_sh_others_can_write(tmp_path):
    h = _private(tmp_path)
    (h / "env.sh").write_text("touch /tmp/owned\n")
    os.chmod(h / "env.sh", 0o622)
    out = _run("local_worker.sh", "start", "--head-dir", str(h), "--dir", str(tmp_path / "w"))
    assert out.returncode == 1 and f"{h / 'env.sh'} has mode 622" in out.stderr
    assert not (tmp_path / "w").exists()


def test_env_file_prints_a_checked_path(tmp_path):
    d = _private(tmp_path)
    (d / "env.sh").write_text("export RAY_ADDRESS=127.0.0.1:1\n")
    os.chmod(d / "env.sh", 0o600)
    out = _run("local_head.sh", "env-file", "--dir", str(d))
    assert out.returncode == 0 and out.stdout.strip() == str(d / "env.sh")
    assert "is not running" in out.stderr
    os.chmod(d / "env.sh", 0o640)
    out = _run("local_head.sh", "env-file", "--dir", str(d))
    assert out.returncode == 1 and out.stdout == ""


def test_a_directory_too_long_for_rays_sockets_is_refused_before_anything_starts(tmp_path):
    d = tmp_path / ("x" * 40)
    out = _run("local_head.sh", "start", "--dir", str(d))
    assert out.returncode == 1 and "Ray's unix sockets under it would exceed 107 bytes" in out.stderr
    assert not d.exists()
    out = _run("local_worker.sh", "start", "--head-dir", "/nonexistent", "--dir", str(d))
    assert out.returncode == 1
