"""Fetch the wheels benchmarks/gpu_check.py needs on a lent device, and check that they travel.

    python benchmarks/gpu_check_wheels.py              # into .whl/ (ignored by git; the device call carries it)
    python benchmarks/gpu_check_wheels.py --dir DIR    # elsewhere (the CI size check)

Each requirement of benchmarks/gpu_check_wheels.txt is downloaded as a wheel for the device's Python 3.12 on
manylinux x86_64; one released only as source (antlr4-python3-runtime 4.9.3) is built here into a pure-Python
wheel, which runs anywhere. Prints each wheel's size, the working tree's (what travels with any device call) and
their sum against the device's 64 MiB; exits 1 when over, or when a wheel is neither for that platform nor pure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "benchmarks" / "gpu_check_wheels.txt"
LIMIT_MIB = 64
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def requirements(path: Path = LIST) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def wheel_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_").lower()


def fetch(requirement: str, into: Path) -> Path:
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    platform = [f"--platform={p}" for p in PLATFORMS]
    binary = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12", "--implementation=cp"]
    if subprocess.run([*binary, *platform, "-d", str(into), requirement], capture_output=True).returncode != 0:
        built = subprocess.run(
            [*pip, "wheel", "--no-deps", "-w", str(into), requirement], capture_output=True, text=True
        )
        if built.returncode != 0:
            raise SystemExit(f"error: {requirement}: no wheel for the device and none could be built: {built.stderr}")
    found = sorted(into.glob(f"{wheel_name(requirement)}-{requirement.split('==')[1]}-*.whl"))
    if not found:
        raise SystemExit(f"error: {requirement}: pip wrote no wheel into {into}")
    wheel = found[-1]
    if not (wheel.name.endswith("-none-any.whl") or "manylinux" in wheel.name and "x86_64" in wheel.name):
        raise SystemExit(f"error: {wheel.name} runs neither anywhere nor on manylinux x86_64")
    return wheel


def tree_bytes(root: Path = ROOT) -> int:
    """What a device call sends: tracked files and untracked files git does not ignore."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".whl")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    wheels = [fetch(r, args.dir) for r in requirements()]
    tree = tree_bytes()
    total = tree + sum(w.stat().st_size for w in wheels)
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    for wheel in wheels:
        print(f"{wheel.name}: {mib(wheel.stat().st_size)}")
    print(f"working tree: {mib(tree)}")
    print(f"total: {mib(total)} of {LIMIT_MIB} MiB{'' if total <= LIMIT_MIB * 2**20 else ' (OVER THE LIMIT)'}")
    return 0 if total <= LIMIT_MIB * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
