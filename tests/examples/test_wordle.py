"""examples/wordle as a user would run it: installed, served through its entry point, evaluated with a module:function policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..plugin_support import install_to

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wordle"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """envfleet-wordle installed into a directory of its own."""
    return install_to(EXAMPLE, tmp_path_factory.mktemp("wordle-site"))


def with_site(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site)}


def run(site: Path, *argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=with_site(site), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_packages_own_tests_pass_against_the_installed_package(site: Path, tmp_path: Path) -> None:
    done = run(site, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", EXAMPLE, EXAMPLE / "tests", cwd=tmp_path)
    assert "5 passed" in done.stdout
    where = run(site, sys.executable, "-c", "import wordle_env; print(wordle_env.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(site))  # the installed copy, words.txt included as package data


async def test_served_through_its_entry_point(site: Path, spawn_server, http) -> None:
    server = spawn_server("--env", "wordle", env={"PYTHONPATH": str(site)})
    async with http.get(server.url + "/metadata") as reply:
        assert (await reply.json())["observation_type"] == "wordle_env.env:WordleObservation"
    async with http.post(server.url + "/reset", json={"seed": 5}) as reply:
        observation = (await reply.json())["observation"]
    assert "6 guesses left" in observation["board"] and observation["rows"] == []
    async with http.post(server.url + "/step", json={"action": {"guess": "zzzzz"}}) as reply:
        body = await reply.json()
    assert body["reward"] == 0.0 and body["observation"]["valid"] is False
    async with http.post(server.url + "/step", json={"action": {"guess": 5}}) as reply:
        assert reply.status == 422 and (await reply.json())["code"] == "VALIDATION_ERROR"


def test_rollout_eval_with_a_module_function_policy_on_the_local_backend(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "wordle.jsonl"
    done = run(
        site, BIN / "rollout", "eval", "--env", "wordle", "--policy", "wordle_env.policies:first_consistent",
        "--episodes", "60", "--n", "16", "--servers", "1", "--out", out, "--summary-json", tmp_path / "summary.json", cwd=tmp_path,
    )
    assert "60 episodes of wordle, policy wordle_env.policies:first_consistent" in done.stdout
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["episodes"] == 60 and 0.8 < summary["mean_return"] <= 1.1, summary  # solves almost every game
    crane_out = tmp_path / "crane.jsonl"
    run(
        site, BIN / "rollout", "eval", "--env", "wordle", "--policy", "wordle_env.policies:always_crane",
        "--episodes", "20", "--n", "4", "--servers", "1", "--out", crane_out, cwd=tmp_path,
    )
    episodes = [json.loads(line) for line in crane_out.read_text().splitlines()[1:]]
    assert len(episodes) == 20
    for episode in episodes:  # only the first 'crane' can earn anything: 0.02 per green, 1.0 if it is the word
        assert episode["return"] == 1.0 or (episode["return"] <= 0.1 + 1e-9 and episode["length"] == 6), episode


@pytest.mark.docker
def test_rollout_eval_on_the_docker_backend_with_an_image_built_with_it(site: Path, tmp_path: Path) -> None:
    """`rollout image build --with examples/wordle`, then the same eval in hardened containers of that image."""
    import asyncio
    import json

    from tests.conftest import skip_or_fail

    from ..plugin_support import image_build_takes_packages, remove_image
    from ..rollout.docker_support import docker_unavailable

    reason = asyncio.run(docker_unavailable())
    if reason:
        skip_or_fail(reason)
    if not image_build_takes_packages():
        skip_or_fail("rollout image build has no --with here (it comes with the openenv branch)")
    tag = f"envfleet-test-wordle:{os.getpid()}"
    try:
        run(site, BIN / "rollout", "image", "build", "--with", EXAMPLE, "--tag", tag, cwd=tmp_path)
        summary_path = tmp_path / "summary.json"
        run(
            site, BIN / "rollout", "eval", "--env", "wordle", "--backend", "docker", "--image", tag, "--servers", "1", "--n", "8",
            "--policy", "wordle_env.policies:first_consistent", "--episodes", "30", "--out", tmp_path / "docker.jsonl",
            "--summary-json", summary_path, cwd=tmp_path,
        )
        summary = json.loads(summary_path.read_text())
        assert summary["episodes"] == 30 and 0.8 < summary["mean_return"] <= 1.1, summary
    finally:
        remove_image(tag)
