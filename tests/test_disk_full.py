"""A disk that fills up or is read-only, for real: train.py on a small tmpfs mounted for the test (root only;
skipped where mounting is not allowed). One `error:` line naming the path, nothing temporary left behind, and
resume=true finishing the run once there is space."""

import os
import subprocess
import sys

import pytest
from conftest import FAST_DEMO, ROOT, cli_env

pytestmark = pytest.mark.slow


@pytest.fixture
def mount_point(tmp_path):
    point = tmp_path / "disk"
    point.mkdir()
    mounted = []

    def mount(*options: str) -> str:
        if os.geteuid() != 0:
            pytest.skip("mounting a test filesystem needs root")
        action = ["-o", ",".join(("remount", *options))] if mounted else ["-t", "tmpfs", "-o", ",".join(options)]
        proc = subprocess.run(["mount", *action, "tmpfs", str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(True)
        return str(point)

    yield mount
    if mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def train(cache, outputs, *extra):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.cache_dir={cache}", *FAST_DEMO, "variant=s2", *extra],
        cwd=ROOT,
        env=cli_env(outputs),
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write "), last
    return last


def test_a_full_disk_ends_in_one_line_leaves_no_temporary_file_and_resumes(mount_point, tmp_path, cli_cache):
    disk = mount_point("size=3m")
    proc = train(cli_cache, f"{disk}/outputs")
    line = one_error_line(proc)
    assert disk in line and "No space left on device" in line
    left = [p for p in (tmp_path / "disk").rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name]
    assert not left, left
    mount_point("size=300m")  # space again
    proc = train(cli_cache, f"{disk}/outputs", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "disk" / "outputs" / "train").glob("*/runs/*"))
    assert (run / "summary.json").is_file() and (run / "test" / "metrics.json").is_file()


def test_a_read_only_output_directory_ends_in_one_line(mount_point, cli_cache):
    disk = mount_point("size=1m", "ro")
    line = one_error_line(train(cli_cache, f"{disk}/outputs"))
    assert disk in line and "Read-only file system" in line
