"""Build the envfleet server image without an image registry.

Three steps, each skipped when its output is current:

1. the base image: by default ``envfleet-base:bookworm``, made offline by
   ``deploy/build-base-image.sh`` (debootstrap + ``docker import``);
2. the wheelhouse ``deploy/wheels/``: cp311 manylinux wheels of envfleet's
   dependencies (``deps/``, downloaded by pip on the host), the envfleet
   wheel itself (``app/``, built from this source tree) and the packages given
   with ``--with`` plus their dependencies (``extra/``, resolved on the host:
   a path that is not a package, or dependencies pip cannot find as wheels for
   the image, stop the build before Docker runs);
3. ``docker build`` of ``deploy/Dockerfile`` on that base, with no network
   for the build steps.

Needs a source checkout (the ``deploy/`` directory next to ``rollout/``), the
``docker`` CLI and, for the default base, root and ``debootstrap``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rollout.errors import FleetError

__all__ = ["DEFAULT_BASE", "build_image"]

DEFAULT_BASE = "envfleet-base:bookworm"
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
WHEELS = DEPLOY / "wheels"
PYTHON_VERSION = "3.11"  # the python3 of both supported bases (bookworm, python:3.11-slim)
IMAGE_LABEL = "envfleet.image"
GLIBC_MINOR = 36  # bookworm's glibc 2.36; python:3.11-slim's is newer, so these wheels fit both

Progress = Callable[[str], object]


def build_image(
    base: str | None = None,
    tag: str = "envfleet:latest",
    progress: Progress = print,
    with_packages: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Build the envfleet image ``tag`` on ``base`` (default: the offline-built Debian base).

    ``with_packages``: package directories or wheels to install in the image too, with
    their dependencies (resolved here, on the host; the image build stays offline).
    """
    started = time.monotonic()
    extras = [_package_path(path) for path in with_packages]
    if not (DEPLOY / "Dockerfile").is_file():
        raise FleetError(f"building the image needs an envfleet source checkout; {DEPLOY} is missing")
    docker = shutil.which("docker")
    if docker is None:
        raise FleetError("the docker CLI is not installed")
    _wheelhouse_deps(progress)
    _wheelhouse_app(progress)
    _wheelhouse_extra(extras, _platforms(), progress)  # bad packages fail here, before any Docker build
    if base is None:
        base = DEFAULT_BASE
        if not _image_exists(docker, base):
            _build_base(base, progress)
    elif not _image_exists(docker, base):
        progress(f"base image {base} is not present locally; docker build will pull it")
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
    platforms = _platforms()
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
        _run([*_pip_download(platforms), "-d", str(new), "-r", str(new / "requirements.txt")],
             progress, "pip download of the dependencies")
        _replace_dir(target, new, digest)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    count = len(list(target.glob("*.whl")))
    progress(f"downloaded {count} wheels in {time.monotonic() - started:.1f} s")


def _platforms() -> list[str]:
    """The wheel platform tags the image accepts, newest first."""
    machine = platform.machine()
    # pip takes --platform literally (no implied older manylinux), so list them all.
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 4, -1)]
    return platforms + [f"manylinux{legacy}_{machine}" for legacy in ("2014", "2010", "1")] + ["any"]


def _pip_download(platforms: list[str]) -> list[str]:
    """``pip download`` of wheels for the image's Python and platforms (the arguments up to ``-d``)."""
    platform_args = [arg for p in platforms for arg in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), *platform_args]


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


def _package_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a package directory or a wheel, else a clear ``FleetError``."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        if not any((resolved / name).is_file() for name in ("pyproject.toml", "setup.py", "setup.cfg")):
            raise FleetError(f"--with {path}: not a Python package (no pyproject.toml, setup.py or setup.cfg in the directory)")
        return resolved
    if resolved.is_file():
        if resolved.suffix != ".whl":
            raise FleetError(f"--with {path}: not a package directory or a wheel (.whl)")
        try:
            with zipfile.ZipFile(resolved) as wheel:
                if not any(n.endswith(".dist-info/METADATA") for n in wheel.namelist()):
                    raise FleetError(f"--with {path}: not a wheel (no .dist-info/METADATA inside)")
        except zipfile.BadZipFile:
            raise FleetError(f"--with {path}: not a wheel (not a zip archive)") from None
        return resolved
    raise FleetError(f"--with {path}: no such file or directory")


def _wheel_pins(directory: Path) -> list[str]:
    """``name==version`` of every wheel in ``directory`` (from the file names)."""
    pins = []
    for wheel in sorted(directory.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        pins.append(f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}")
    return pins


def _wheelhouse_extra(packages: list[Path], platforms: list[str], progress: Progress) -> None:
    """Build wheels of ``packages`` and download their dependencies into ``wheels/extra/``.

    Dependencies envfleet already ships are pinned to its versions and not copied again.
    Always leaves ``requirements.txt`` (empty without packages), which the Dockerfile reads.
    """
    target = WHEELS / "extra"
    h = hashlib.sha256("\n".join(platforms).encode())
    for package in packages:
        files = [package] if package.is_file() else sorted(
            p for p in package.rglob("*")
            if p.is_file() and not {"__pycache__", "build", ".git", ".venv"} & set(p.parts) and ".egg-info" not in str(p)
        )
        for path in files:
            h.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update((WHEELS / "deps" / ".stamp").read_bytes() + (WHEELS / "app" / ".stamp").read_bytes())
    digest = h.hexdigest()
    if _stamp_ok(target, digest):
        progress("extra packages are current" if packages else "no extra packages")
        return
    started = time.monotonic()
    new = Path(tempfile.mkdtemp(prefix=".extra-", dir=WHEELS))
    try:
        built = new / "given"
        built.mkdir()
        for package in packages:
            if package.is_file():
                shutil.copy2(package, built / package.name)
                continue
            _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                  "-w", str(built), str(package)], progress, f"build of a wheel of {package}")
        given = sorted(built.glob("*.whl"))
        for wheel in given:
            wheel.rename(new / wheel.name)
        built.rmdir()
        if given:
            constraints = new / "constraints.txt"
            constraints.write_text("\n".join(_wheel_pins(WHEELS / "deps") + _wheel_pins(WHEELS / "app")) + "\n")
            try:
                _run([*_pip_download(platforms), "-d", str(new), "--find-links", str(WHEELS / "deps"),
                      "--find-links", str(WHEELS / "app"), "--find-links", str(new), "-c", str(constraints),
                      *(str(w) for w in given)], progress, "resolving the dependencies")
            except FleetError as exc:
                names = ", ".join(w.name for w in given)
                raise FleetError(
                    f"--with: the dependencies of {names} cannot be resolved as cp{PYTHON_VERSION.replace('.', '')} "
                    f"manylinux wheels for the image ({exc}); pass wheels of the missing ones with --with"
                ) from None
            constraints.unlink()
            shipped = {w.name for w in (WHEELS / "deps").glob("*.whl")} | {w.name for w in (WHEELS / "app").glob("*.whl")}
            for wheel in new.glob("*.whl"):
                if wheel.name in shipped:
                    wheel.unlink()
        (new / "requirements.txt").write_text("".join(f"/wheels/extra/{w.name}\n" for w in given))
        _replace_dir(target, new, digest)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    if packages:
        count = len(list(target.glob("*.whl")))
        progress(f"extra wheelhouse: {count} wheels for {len(packages)} package(s) in {time.monotonic() - started:.1f} s")
