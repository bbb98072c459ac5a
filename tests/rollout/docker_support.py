"""What the Docker, swarm and image tests share: the image to use and why Docker can't be used here."""

from __future__ import annotations

import os

import aiodocker
import aiohttp

from tests.conftest import skip_or_fail

IMAGE = os.environ.get("ENVFLEET_TEST_IMAGE", "envfleet:latest")


async def docker_unavailable() -> str | None:
    """Why the Docker tests cannot run here, or None if they can."""
    try:
        async with aiodocker.Docker() as docker:
            await docker.version()
            try:
                await docker.images.inspect(IMAGE)
            except aiodocker.DockerError:
                return f"image {IMAGE} is missing (build it with `rollout image build`)"
    except (AssertionError, ValueError, aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        return f"no Docker daemon reachable ({type(exc).__name__}: {exc})"
    return None


async def require_docker(what: str = "Docker") -> None:
    """Skip the test (fail it under CI=true) when Docker or the image is not usable here."""
    reason = await docker_unavailable()
    if reason is not None:
        skip_or_fail(f"the {what} tests cannot run: {reason}")
