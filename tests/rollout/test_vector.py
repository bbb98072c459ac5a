"""VectorPool over the local backend: numpy batches, auto-reset, seeds, send/recv, bad input, a server dying."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from rollout import EnvError, EnvPool, EpisodeOver, InvalidAction
from rollout.vector import VectorPool, vectorized
from rollout.vector_episodes import play_episodes


def random_legal(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """One uniformly random legal action per row (0 where nothing is legal)."""
    return np.argmax(rng.random(mask.shape) * mask, axis=1)


async def play(vector: VectorPool, steps: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    obs, info = await vector.reset(seed=seed)
    trace = [(obs,)]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = await vector.step(random_legal(rng, info["action_mask"]))
        trace.append((obs, reward, terminated, truncated))
    return trace


async def test_step_returns_stacked_numpy_arrays_and_episode_statistics() -> None:
    async with EnvPool(n=6, game="catch", servers=2) as pool:
        vector = pool.vector()
        obs, info = await vector.reset(seed=0)
        assert obs.shape == (6, 10, 5) and obs.dtype == np.float32
        assert info["env_id"].tolist() == list(range(6)) and info["action_mask"].dtype == np.bool_
        totals = np.zeros(6)
        for step in range(9):
            obs, reward, terminated, truncated, info = await vector.step(np.ones(6, np.int64))
            assert reward.dtype == np.float64 and terminated.dtype == np.bool_ and truncated.dtype == np.bool_
            totals += reward
        assert terminated.all() and not truncated.any()
        assert info["_episode_return"].all() and info["episode_return"].tolist() == totals.tolist()
        assert info["episode_length"].tolist() == [9] * 6
        assert not info["action_mask"].any()  # nothing legal in a finished game
        # next_step: this step resets (the actions are ignored, even illegal ones)
        obs, reward, terminated, truncated, info = await vector.step(np.full(6, 2))
        assert reward.tolist() == [0.0] * 6 and not terminated.any() and "episode_return" not in info
        assert obs[:, 0].sum() == 6 and info["action_mask"].all()  # fresh boards: the ball in the top row


async def test_a_run_replays_exactly_whatever_the_pool_shape() -> None:
    async with EnvPool(n=5, game="catch", servers=2) as pool:
        first = await play(pool.vector(), 25, seed=3)
    async with EnvPool(n=5, game="catch", servers=1) as pool:
        again = await play(pool.vector(), 25, seed=3)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
    async with EnvPool(n=5, game="catch", servers=1) as pool:
        other = await play(pool.vector(), 25, seed=4)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


async def test_same_step_gives_the_final_observation_in_info() -> None:
    async with EnvPool(n=4, game="catch", servers=1) as pool:
        vector = pool.vector("same_step")
        await vector.reset(seed=1)
        for _ in range(9):
            obs, reward, terminated, truncated, info = await vector.step(np.zeros(4, np.int64))
        assert terminated.all() and info["_final_obs"].all()
        assert info["final_obs"][:, :9].sum() == 0 and obs[:, 0].sum() == 4  # final boards apart, fresh ones returned
        assert info["episode_length"].tolist() == [9] * 4
        obs, reward, terminated, truncated, info = await vector.step(np.zeros(4, np.int64))
        assert not terminated.any() and "final_obs" not in info


async def test_send_recv_returns_the_first_batch_size_ready_envs() -> None:
    async with EnvPool(n=8, game="catch", servers=2) as pool:
        vector = pool.vector(batch_size=3)
        with pytest.raises(EnvError, match="nothing to wait for"):
            await vector.recv()
        await vector.reset(seed=0)
        vector.send(np.ones(8, np.int64))
        seen: list[int] = []
        while len(seen) < 8:
            obs, reward, terminated, truncated, info = await vector.recv()
            assert len(info["env_id"]) == obs.shape[0] <= 3
            seen += info["env_id"].tolist()
        assert sorted(seen) == list(range(8))
        vector.send(np.ones(2, np.int64), env_ids=[5, 2])
        with pytest.raises(ValueError, match="already in flight"):
            vector.send(np.ones(1, np.int64), env_ids=[2])
        with pytest.raises(ValueError, match="recv"):
            await vector.step(np.ones(8, np.int64))
        obs, reward, terminated, truncated, info = await vector.recv()
        assert sorted(info["env_id"].tolist()) == [2, 5]
        with pytest.raises(EnvError, match="nothing to wait for"):
            await vector.recv()


async def test_bad_actions_are_refused_before_sending_and_the_batch_stays_usable() -> None:
    async with EnvPool(n=4, game="tic_tac_toe", servers=1) as pool:
        vector = pool.vector()
        with pytest.raises(EpisodeOver, match="reset"):
            vector.send(np.zeros(4, np.int64))
        obs, info = await vector.reset(seed=0)
        sent = pool.clients[0].requests_sent
        with pytest.raises(ValueError, match="expected 4 actions"):
            await vector.step(np.zeros(3, np.int64))
        with pytest.raises(ValueError, match="shape"):
            await vector.step(np.zeros((4, 1), np.int64))
        with pytest.raises(TypeError, match="integers"):
            await vector.step(np.zeros(4, np.float32))
        with pytest.raises(InvalidAction, match="env 0: 9"):
            await vector.step(np.array([9, 0, 0, 0]))
        with pytest.raises(InvalidAction, match="env 1: -1"):
            await vector.step(np.array([0, -1, 0, 0]))
        _, _, _, _, info = await vector.step([4, 4, 4, 4])  # a list of ints is fine too
        taken = ~info["action_mask"][:, 4]
        assert taken.all()  # the centre is taken now, by the agent
        legal = np.argmax(info["action_mask"], axis=1)
        with pytest.raises(InvalidAction, match="env 2: 4"):
            await vector.step(np.where(np.arange(4) == 2, 4, legal))
        assert pool.clients[0].requests_sent - sent == 1  # only the one good step went out
        obs, reward, terminated, truncated, info = await vector.step(legal)
        assert "error" not in info


async def test_disabled_mode_refuses_finished_envs_until_reset() -> None:
    async with EnvPool(n=2, game="catch", servers=1) as pool:
        vector = pool.vector("disabled")
        await vector.reset(seed=0)
        for _ in range(9):
            await vector.step(np.ones(2, np.int64))
        with pytest.raises(EpisodeOver, match="autoreset is disabled"):
            await vector.step(np.ones(2, np.int64))
        obs, info = await vector.reset()  # the next episode of each env's seed sequence
        await vector.step(np.ones(2, np.int64))


async def test_a_dead_server_ends_its_envs_episodes_with_envcrashed_and_they_resume_on_the_replacement(alive) -> None:
    async with EnvPool(n=8, game="catch", servers=2) as pool:
        vector = pool.vector()
        obs, info = await vector.reset(seed=0)
        victim = pool.servers[0]
        on_victim = np.array([env.server == victim for env in pool.envs])
        pid = pool.backend.pid(victim)  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        obs, reward, terminated, truncated, info = await vector.step(np.ones(8, np.int64))
        assert time.monotonic() - started < 1.0
        assert truncated[on_victim].all() and not truncated[~on_victim].any()
        assert info["_error"].tolist() == on_victim.tolist()
        assert all("EnvCrashed" in message for message in info["error"][on_victim])
        # the next step starts those envs' next episodes on the replacement server
        obs, reward, terminated, truncated, info = await vector.step(np.ones(8, np.int64))
        assert pool.servers[0] != victim and not alive(pid)
        assert "error" not in info and obs[on_victim][:, 0].sum() == on_victim.sum()  # fresh boards
        for _ in range(12):
            obs, reward, terminated, truncated, info = await vector.step(np.ones(8, np.int64))
            assert "error" not in info


async def test_vector_rejects_bad_configuration() -> None:
    async with EnvPool(n=2, game="catch", servers=1) as pool:
        with pytest.raises(ValueError, match="autoreset"):
            pool.vector("sometimes")
        with pytest.raises(ValueError, match="batch_size"):
            pool.vector(batch_size=3)
        vector = pool.vector()
        with pytest.raises(ValueError, match="env ids"):
            await vector.reset(env_ids=[0, 2])
        with pytest.raises(ValueError, match="duplicates"):
            await vector.reset(env_ids=[1, 1])


# ---------------------------------------------------------------------------- eval and bench on the vector path


def first_legal(observation):  # type: ignore[no-untyped-def]
    return observation.legal_actions[0]


@vectorized
def first_legal_batch(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.argmax(mask, axis=1)


async def test_play_episodes_gives_the_same_episodes_as_pool_run() -> None:
    async with EnvPool(n=5, game="tic_tac_toe", servers=2) as pool:
        expected = {r.episode: r async for r in pool.run(first_legal, episodes=23, seed=7)}
        got = {r.episode: r async for r in play_episodes(pool.vector("disabled"), first_legal_batch, 23, 7, skip={3, 4})}
    assert sorted(got) == [i for i in range(23) if i not in (3, 4)]
    for episode, record in got.items():
        assert (record.seed, record.reward, record.length) == (expected[episode].seed, expected[episode].reward, expected[episode].length)
        assert record.info["server"].startswith("http://127.0.0.1:")


async def test_play_episodes_needs_a_non_resetting_vector_and_names_the_episode_of_a_bad_action() -> None:
    async with EnvPool(n=2, game="catch", servers=1) as pool:
        with pytest.raises(ValueError, match="disabled"):
            [r async for r in play_episodes(pool.vector(), first_legal_batch, 4, 0)]

        def illegal(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return np.full(len(obs), 7)

        with pytest.raises(InvalidAction) as info:
            [r async for r in play_episodes(pool.vector("disabled"), illegal, 4, 0)]
        assert info.value.episode in (0, 1)  # type: ignore[attr-defined]


async def test_evaluate_plays_a_vectorized_policy_through_the_vector_path(tmp_path) -> None:
    from rollout import evaluate

    summary = await evaluate(first_legal_batch, 40, out=str(tmp_path / "run.jsonl"), game="catch", n=8, servers=1, progress=None)
    assert summary.episodes == 40 and summary.played == 40
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert len(lines) == 41  # header + one line per episode
    again = await evaluate(first_legal_batch, 50, out=str(tmp_path / "run.jsonl"), game="catch", n=8, servers=1, progress=None)
    assert again.resumed == 40 and again.played == 10


async def test_bench_vector_mode_counts_steps_and_episodes() -> None:
    from rollout.commands.bench import measure

    async with EnvPool(n=16, game="catch", servers=1) as pool:
        result = await measure(pool, "vector", 0.5, warmup=0.1)
    assert result.mode == "vector" and result.steps >= 16 * 10 and result.episodes >= 16 and result.errors == 0


@pytest.mark.slow
def test_vector_throughput_loadtest_runs_every_case_and_writes_its_report(tmp_path) -> None:
    import json

    import vector_throughput  # loadtests/ is on pytest's pythonpath

    out = tmp_path / "vector.json"
    vector_throughput.main(["--seconds", "0.3", "--warmup", "0.1", "--skip-async-256", "--out", str(out)])
    report = json.loads(out.read_text())
    cases = {(c["name"], c["n"]): c for c in report["cases"]}
    for name, n in [("(a) in-process limit (tensor+mask)", 256), ("(b) pool.vector step()", 1024), ("(c) per-env await env.step", 256),
                    ("(d) gymnasium AsyncVectorEnv", 8), ("(e) envfleet gymnasium adapter CartPole", 256)]:
        assert cases[(name, n)]["steps"] > 0 and cases[(name, n)]["error"] is None, cases[(name, n)]
    assert report["ratios"]["b_best / a"] is not None and set(report["targets"]) == {"(b) >= 0.75 x (a)", "(c) >= 0.35 x (a')", "(b) >= 5 x (d)"}
    assert len(report["load_average"]) == 3


def test_cli_bench_vector_mode_and_eval_of_a_vectorized_policy(tmp_path) -> None:
    import json
    import subprocess
    import sys

    def rollout_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rollout.cli", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    bench = rollout_cli("bench", "--n", "8", "--servers", "1", "--seconds", "0.5", "--mode", "vector", "--json")
    assert bench.returncode == 0, bench.stderr
    (row,) = json.loads(bench.stdout)["results"]
    assert row["mode"] == "vector" and row["steps"] > 0 and row["episodes"] > 0
    (tmp_path / "batched_policy.py").write_text(
        "import numpy as np\nfrom rollout.vector import vectorized\n\n"
        "@vectorized\ndef stay(obs, mask):\n    return np.full(len(obs), 1)\n"
    )
    evaluated = rollout_cli("eval", "--policy", "batched_policy:stay", "--episodes", "30", "--n", "8", "--servers", "1",
                            "--out", str(tmp_path / "run.jsonl"), "--summary-json", "-")
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads(evaluated.stdout)
    assert summary["episodes"] == 30 and summary["policy"] == "batched_policy:stay"
