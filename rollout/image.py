"""Build the envfleet server image without an image registry.

Three steps, each skipped when its output is current:

1. the base image: by default ``envfleet-base:bookworm``, made offline by
   ``deploy/build-base-image.sh`` (debootstrap + ``docker import``);
2. the wheelhouse ``deploy/wheels/``: cp311 manylinux wheels of envfleet's
   dependencies (``deps/``, downloaded by pip on the host) and the envfleet
   wheel itself (``app/``, built from this source tree);
3. ``docker build`` of ``deploy/Dockerfile`` on that base, with no network
   for the build steps.

Needs a source checkout (the ``deploy/`` directory next to ``rollout/``), the
``docker`` CLI and, for the default base, root and ``debootstrap``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

from rollout.errors import FleetError

__all__ = ["DEFAULT_BASE", "build_image"]

DEFAULT_BASE = "envfleet-base:bookworm"
REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
WHEELS = DEPLOY / "wheels"
PYTHON_VERSION = "3.11"  # the python3 of both supported bases (bookworm, python:3.11-slim)
IMAGE_LABEL = "envfleet.image"
GLIBC_MINOR = 36  # bookworm's glibc 2.36; python:3.11-slim's is newer, so these wheels fit both

Progress = Callable[[str], object]


def build_image(
    base: str | None = None, tag: str = "envfleet:latest", progress: Progress = print
) -> None:
    """Build the envfleet image ``tag`` on ``base`` (default: the offline-built Debian base)."""
    started = time.monotonic()
    if not (DEPLOY / "Dockerfile").is_file():
        raise FleetError(f"building the image needs an envfleet source checkout; {DEPLOY} is missing")
    docker = shutil.which("docker")
    if docker is None:
        raise FleetError("the docker CLI is not installed")
    if base is None:
        base = DEFAULT_BASE
        if not _image_exists(docker, base):
            _build_base(base, progress)
    elif not _image_exists(docker, base):
        progress(f"base image {base} is not present locally; docker build will pull it")
    _wheelhouse_deps(progress)
    _wheelhouse_app(progress)
    _docker_build(docker, base, tag, progress)
    progress(f"image {tag} ready in {time.monotonic() - started:.1f} s")


def _image_exists(docker: str, image: str) -> bool:
    done = subprocess.run([docker, "image", "inspect", image], capture_output=True)
    return done.returncode == 0


def _run(cmd: Sequence[str], progress: Progress, what: str, env: dict[str, str] | None = None) -> None:
    """Run ``cmd``, passing each output line to ``progress``; raise FleetError on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
    except OSError as exc:
        raise FleetError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            progress(f"  {line}")
            tail = [*tail[-19:], line]
    if proc.returncode != 0:
        raise FleetError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail[-3:]))


def _build_base(base: str, progress: Progress) -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise FleetError(
            f"base image {base} is missing and building it needs root and debootstrap; "
            "install debootstrap and rerun as root, or pass --base python:3.11-slim "
            "if your Docker can pull from a registry"
        )
    progress(f"building base image {base} with debootstrap (about a minute)")
    _run(["bash", str(DEPLOY / "build-base-image.sh"), base], progress, "base image build")


def _requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def _stamp_ok(directory: Path, digest: str) -> bool:
    stamp = directory / ".stamp"
    return stamp.is_file() and stamp.read_text() == digest


def _replace_dir(directory: Path, new: Path, digest: str) -> None:
    (new / ".stamp").write_text(digest)
    if directory.exists():
        shutil.rmtree(directory)
    new.rename(directory)


def _wheelhouse_deps(progress: Progress) -> None:
    """Download the dependencies' wheels for the image's platform, unless current."""
    requirements = _requirements()
    machine = platform.machine()
    # pip takes --platform literally (no implied older manylinux), so list them all.
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 4, -1)]
    platforms += [f"manylinux{legacy}_{machine}" for legacy in ("2014", "2010", "1")] + ["any"]
    digest = hashlib.sha256("\n".join([*requirements, *platforms]).encode()).hexdigest()
    target = WHEELS / "deps"
    if _stamp_ok(target, digest):
        progress(f"wheelhouse {target.relative_to(REPO)} is current")
        return
    started = time.monotonic()
    WHEELS.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=".deps-", dir=WHEELS))
    try:
        (new / "requirements.txt").write_text("\n".join(requirements) + "\n")
        platform_args = [arg for p in platforms for arg in ("--platform", p)]
        _run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
             "--abi", "cp" + PYTHON_VERSION.replace(".", ""), *platform_args,
             "-d", str(new), "-r", str(new / "requirements.txt")],
            progress, "pip download of the dependencies",
        )
        _replace_dir(target, new, digest)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    count = len(list(target.glob("*.whl")))
    progress(f"downloaded {count} wheels in {time.monotonic() - started:.1f} s")


def _source_digest() -> str:
    h = hashlib.sha256()
    files = [REPO / "pyproject.toml"]
    for package in ("envserver", "rollout"):
        files += sorted(p for p in (REPO / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _wheelhouse_app(progress: Progress) -> None:
    """Build the envfleet wheel from this tree, unless the tree is unchanged since the last one."""
    digest = _source_digest()
    target = WHEELS / "app"
    if _stamp_ok(target, digest):
        progress("envfleet wheel is current")
        return
    started = time.monotonic()
    WHEELS.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=".app-", dir=WHEELS))
    # A fixed timestamp makes the wheel's bytes depend on the sources only.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    try:
        _run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
             "--no-deps", "-w", str(new), str(REPO)],
            progress, "build of the envfleet wheel", env=env,
        )
        _replace_dir(target, new, digest)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(REPO / "build", ignore_errors=True)
    progress(f"built the envfleet wheel in {time.monotonic() - started:.1f} s")


def _docker_build(docker: str, base: str, tag: str, progress: Progress) -> None:
    started = time.monotonic()
    progress(f"docker build {tag} on {base}")
    # The legacy builder: it uses a local base image as is, and BuildKit's
    # Dockerfile frontend is not needed (no `# syntax=` line).
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    _run(
        [docker, "build", "--network", "none", "--build-arg", f"BASE_IMAGE={base}",
         "--label", f"{IMAGE_LABEL}=server", "-t", tag, "-f", str(DEPLOY / "Dockerfile"), str(DEPLOY)],
        progress, f"docker build of {tag}", env=env,
    )
    # Earlier builds of the image, untagged by this one, each hold a copy of the
    # venv; the build stage's layers stay as the cache of the next build.
    subprocess.run(
        [docker, "image", "prune", "--force", "--filter", f"label={IMAGE_LABEL}=server"],
        capture_output=True,
    )
    progress(f"docker build done in {time.monotonic() - started:.1f} s")
