"""Backend "ray" against a real local Ray cluster: one per module, shut down at the end.

Ray starts in a few seconds on this machine, so every test shares ``cluster`` (this process is
its driver); tests that need a driver of their own run one as a subprocess joining it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtests.chaos import FAIL_FAST_LIMIT, ProbedPool, _key, make_policy, play
from rollout import EnvPool, FleetError, PoolConfig

try:
    import ray
except ImportError:
    if os.environ.get("CI") == "true":  # the test extra installs Ray: CI must run these
        raise
    pytest.skip("Ray is not installed (pip install -e '.[test]')", allow_module_level=True)

from rollout.fleet.ray import NAMESPACE, RayFleet  # noqa: E402 - after the import check

ROOT = Path(__file__).resolve().parents[2]
ROLLOUT = str(Path(sys.executable).with_name("rollout"))


def _pool_line(driver: subprocess.Popen[str]) -> list[str]:
    """The driver's ``POOL <id> <pids>`` line, past anything Ray itself printed first; [] if it exited without one."""
    for raw in driver.stdout:  # type: ignore[union-attr]
        if raw.startswith("POOL "):
            return raw.split()[1:]
    return []


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster (one head node with room for a few dozen light server actors), this process its driver."""
    from ray.cluster_utils import Cluster

    local = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "include_dashboard": False})
    try:
        ray.init(address=local.address, log_to_driver=False, configure_logging=False, namespace="envfleet-tests")
        yield local
    finally:
        ray.shutdown()
        local.shutdown()


@pytest.fixture
def cluster(ray_cluster: Any) -> str:
    """The GCS address of the module's cluster."""
    return str(ray_cluster.address)


def envfleet_actors(pool_id: str = "") -> list[str]:
    """Names of the live envfleet actors (of one pool), from the cluster's GCS."""
    prefix = f"envfleet-{pool_id}"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(prefix))


def live(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, from /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pids: list[int]) -> list[int]:
    """Every live descendant of ``pids``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- same results


async def test_kuhn_poker_trajectories_equal_the_local_backends(cluster: str) -> None:
    async def trajectories(backend: str) -> dict[int, list[Any]]:
        seen: dict[int, list[Any]] = {}

        def per_episode(seed: int) -> Any:
            steps = seen.setdefault(seed, [])
            rng = random.Random(seed)

            def act(observation: Any) -> int:
                steps.append((observation.text, tuple(observation.legal_actions), observation.current_player_id,
                              tuple(observation.rewards)))
                return rng.choice(observation.legal_actions)

            return act

        async with EnvPool(n=8, game="kuhn_poker", backend=backend, servers=4) as pool:
            records = [r async for r in pool.run(per_episode, episodes=40, seed=3, per_episode=True)]
            if backend == "ray":
                assert len(set(pool.servers)) == 4 and all(url.startswith("http://") for url in pool.servers)
        for record in records:
            seen[record.seed].append((record.reward, record.length, tuple(record.info["returns"])))
        return seen

    ray_runs, local_runs = await trajectories("ray"), await trajectories("local")
    assert len(ray_runs) == 40
    assert ray_runs == local_runs


# --------------------------------------------------------------------------- placement, names, leaks


async def test_actors_are_named_in_the_envfleet_namespace_and_leave_nothing_after_close(cluster: str) -> None:
    pool = EnvPool(n=4, game="catch", backend="ray", servers=2)
    async with pool:
        backend = pool.backend
        assert isinstance(backend, RayFleet)
        names = envfleet_actors(backend.pool_id)
        assert names == [f"envfleet-{backend.pool_id}-0", f"envfleet-{backend.pool_id}-1"]
        pids = [backend.pid(url) for url in pool.servers]
        assert all(live(pid) for pid in pids)
        for url in pool.servers:  # on the driver's own machine: loopback only (other nodes bind their IP); token-protected
            assert url.startswith("http://127.0.0.1:")
            cmdline = Path(f"/proc/{backend.pid(url)}/cmdline").read_bytes()
            environ = Path(f"/proc/{backend.pid(url)}/environ").read_bytes()
            assert backend.token.encode() not in cmdline and backend.token.encode() not in environ
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{pool.servers[0]}/health") as response:
                assert response.status == 401  # the URL alone does not open the server
    assert envfleet_actors(backend.pool_id) == []
    wait_until(lambda: not any(live(pid) for pid in pids), 5.0, "the servers exit with their actors")


async def test_pool_start_failure_kills_the_actors_it_started(cluster: str) -> None:
    pool = EnvPool(n=2, env="no_such_env", backend="ray", servers=2, start_timeout=30)
    with pytest.raises(FleetError, match="failed to start its server"):
        await pool.start()
    assert pool.backend is not None
    assert envfleet_actors(pool.backend.pool_id) == []  # type: ignore[attr-defined]


async def test_actors_go_into_the_placement_group_given(cluster: str) -> None:
    group = ray.util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    await group.ready()
    try:
        async with EnvPool(n=2, game="catch", backend="ray", servers=2, ray_placement_group=group) as pool:
            backend: Any = pool.backend
            rows = [await backend.actor(url).describe.remote() for url in pool.servers]
            assert [row["placement_group"] for row in rows] == [group.id.hex()] * 2
        full = "not ready within 3 s: .* in placement group .* no bundle with room"  # it holds two servers, not three
        with pytest.raises(FleetError, match=full):
            await EnvPool(n=3, game="catch", backend="ray", servers=3, ray_placement_group=group, start_timeout=3).start()
    finally:
        ray.util.remove_placement_group(group)


# --------------------------------------------------------------------------- faults


async def test_killed_server_process_fails_calls_fast_and_is_replaced(cluster: str) -> None:
    async with EnvPool(n=2, game="catch", backend="ray", servers=2) as pool:
        backend: Any = pool.backend
        await pool.reset(seeds=[1, 2])
        victim = pool.envs[0].server
        os.kill(backend.pid(victim), signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(Exception) as caught:
            await pool.envs[0].step(0)
        assert type(caught.value).__name__ == "EnvCrashed" and time.monotonic() - began < FAIL_FAST_LIMIT
        await pool.envs[0].wait_ready(60)
        assert pool.envs[0].server != victim
        assert (await pool.envs[0].reset(7)).observation is not None
        assert len(envfleet_actors(backend.pool_id)) == 2  # the old actor went with its server


@pytest.mark.slow
async def test_an_actor_killed_every_second_loses_duplicates_and_changes_nothing(cluster: str) -> None:
    episodes = 5000
    pool = ProbedPool(game="catch", backend="ray", servers=4, config=PoolConfig(n=64, max_episode_retries=20))
    kills: list[tuple[str, float]] = []
    pids: set[int] = set()

    async def kill_every_second() -> None:
        rng = random.Random(0)
        while True:
            await asyncio.sleep(1.0)
            backend: Any = pool.backend
            serving = [url for url in pool.servers if url in backend.urls]
            url = rng.choice(serving)
            pids.add(backend.pid(url))
            kills.append((url, time.monotonic()))
            await asyncio.to_thread(ray.kill, backend.actor(url))

    async with pool:
        backend: Any = pool.backend
        pids.update(backend.pid(url) for url in pool.servers)
        policy = make_policy(0.0)
        reference, _ = await play(pool, policy, episodes, 11)
        killer = asyncio.create_task(kill_every_second())
        try:
            records, _ = await play(pool, make_policy(0.008), episodes, 11)  # >= 703 steps per env x 8 ms: several kills land
        finally:
            killer.cancel()
            await asyncio.gather(killer, return_exceptions=True)
        await asyncio.gather(*(env.wait_ready(60) for env in pool.envs))
        pids.update(backend.pid(url) for url in pool.servers)
        pool_id = backend.pool_id

    assert len(kills) >= 3
    assert sorted(r.episode for r in records) == list(range(episodes))  # 0 lost, 0 duplicated
    expected = {r.episode: _key(r) for r in reference}
    assert [r.episode for r in records if _key(r) != expected[r.episode]] == []
    in_flight = [(at, exc) for at, exc in pool.crashes if exc.request is not None]
    assert in_flight, "no call was in flight on a killed actor"
    for at, exc in in_flight:
        killed_at = max(t for url, t in kills if url == exc.server and t <= at)
        assert at - killed_at < FAIL_FAST_LIMIT
    assert len(pool.replacements_log) >= len(kills)
    assert envfleet_actors(pool_id) == []
    wait_until(lambda: not any(live(pid) for pid in pids), 5.0, "every server, killed or not, is gone")


@pytest.mark.slow
async def test_a_node_whose_processes_die_fails_its_calls_fast_and_its_server_moves_to_a_new_node(ray_cluster: Any) -> None:
    doomed = ray_cluster.add_node(num_cpus=1, resources={"edge": 1})  # only nodes with "edge" take the pool's server
    pool = ProbedPool(game="catch", backend="ray", servers=1, ray_resources={"edge": 1.0}, start_timeout=60,
                      config=PoolConfig(n=8, max_episode_retries=5))
    try:
        async with pool:
            backend: Any = pool.backend
            first = await _ray_call_node(backend.actor(pool.servers[0]))
            assert first == doomed.node_id
            run = asyncio.create_task(play(pool, make_policy(0.002), 600, 5))
            await asyncio.sleep(1.0)
            lost_at = time.monotonic()
            doomed_pids = [process.pid for _, process in doomed.live_processes()]
            for pid in doomed_pids + descendants(doomed_pids):  # the node is gone: all its processes die at once
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(2.0)  # the crashes are seen meanwhile; then another node with room joins
            new = ray_cluster.add_node(num_cpus=1, resources={"edge": 1})
            records, _ = await run
            assert await _ray_call_node(backend.actor(pool.servers[0])) == new.node_id
    finally:
        for node in list(ray_cluster.worker_nodes):
            ray_cluster.remove_node(node)
    assert sorted(r.episode for r in records) == list(range(600))
    in_flight = [at for at, exc in pool.crashes if exc.request is not None]
    assert in_flight and max(in_flight) - lost_at < FAIL_FAST_LIMIT


async def _ray_call_node(actor: Any) -> str:
    """The id of the node an actor runs on."""
    return str((await actor.describe.remote())["node_id"])


# --------------------------------------------------------------------------- a driver that dies


DRIVER = """
import asyncio, sys
from rollout import EnvPool

async def main():
    async with EnvPool(n=2, game="catch", backend="ray", servers=2, ray_address=sys.argv[1], ray_detached=sys.argv[2] == "1") as pool:
        print("POOL", pool.backend.pool_id, *(pool.backend.pid(u) for u in pool.servers), flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("detached", [False, True], ids=["owned", "detached"])
def test_reap_removes_what_a_sigkilled_driver_left(cluster: str, detached: bool) -> None:
    with subprocess.Popen([sys.executable, "-c", DRIVER, cluster, "1" if detached else "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as driver:
        try:
            line = _pool_line(driver)
            assert line, driver.stderr.read()  # type: ignore[union-attr]
            pool_id, pids = line[0], [int(p) for p in line[1:]]
            assert len(envfleet_actors(pool_id)) == 2 and all(live(p) for p in pids)
            listed = subprocess.run([ROLLOUT, "fleet", "ls", "--backend", "ray", "--ray-address", cluster, "--json"],
                                    capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0, listed.stderr
            mine = [row for row in json.loads(listed.stdout) if row["pool"] == pool_id]
            assert len(mine) == 2 and not any(row["orphaned"] for row in mine)  # its driver is alive
        finally:
            driver.kill()
    if detached:  # they outlive the driver, as asked, until reaped
        time.sleep(1.0)
        assert len(envfleet_actors(pool_id)) == 2
    else:  # owned by the driver's job: Ray removes them with it, before any reap
        wait_until(lambda: envfleet_actors(pool_id) == [], 20.0, f"Ray removes the actors of pool {pool_id} with its driver")
    reaped = subprocess.run([ROLLOUT, "fleet", "reap", "--backend", "ray", "--ray-address", cluster],
                            capture_output=True, text=True, timeout=60)
    assert reaped.returncode == 0, reaped.stderr
    wait_until(lambda: envfleet_actors(pool_id) == [], 20.0, f"no actor of pool {pool_id} is left")
    wait_until(lambda: not any(live(p) for p in pids), 10.0, "no envserver process is left")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_pool_kills_its_actors_on_sigint_and_sigterm(cluster: str, sig: signal.Signals) -> None:
    # detached actors: Ray would not remove them with the driver, so only the pool's own clean-up can
    with subprocess.Popen([sys.executable, "-c", DRIVER, cluster, "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT) as driver:
        try:
            line = _pool_line(driver)
            assert line, driver.stderr.read()  # type: ignore[union-attr]
            pool_id, pids = line[0], [int(p) for p in line[1:]]
            driver.send_signal(sig)
            driver.wait(30)
        finally:
            driver.kill()
    assert envfleet_actors(pool_id) == []
    wait_until(lambda: not any(live(p) for p in pids), 5.0, "the servers exit with their actors")


# --------------------------------------------------------------------------- bad input


async def test_unreachable_ray_address_is_a_clear_fleet_error(cluster: str) -> None:
    began = time.monotonic()
    with pytest.raises(FleetError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        await EnvPool(n=1, backend="ray", servers=1, ray_address="127.0.0.1:1", start_timeout=5).start()
    with pytest.raises(FleetError, match="not host:port"):
        await EnvPool(n=1, backend="ray", servers=1, ray_address="ray://", start_timeout=5).start()
    assert time.monotonic() - began < 5


async def test_resources_no_node_has_are_a_fleet_error_within_the_start_timeout(cluster: str) -> None:
    pool = EnvPool(n=1, backend="ray", servers=1, ray_resources={"tpu_pod": 1.0}, start_timeout=3)
    began = time.monotonic()
    with pytest.raises(FleetError, match=r"no node of the cluster has the resources it asks for \(CPU=1, tpu_pod=1\)"):
        await pool.start()
    assert time.monotonic() - began < 3 + 2
    assert envfleet_actors(pool.backend.pool_id) == []  # type: ignore[union-attr]


async def test_more_cpus_than_are_free_is_a_fleet_error_naming_what_is_free(cluster: str) -> None:
    with pytest.raises(FleetError, match="asks for CPU=15 and the cluster has CPU=.* free"):
        await EnvPool(n=2, backend="ray", servers=2, ray_cpus=15, start_timeout=3).start()


@pytest.mark.parametrize(("fields", "message"), [
    ({"ray_cpus": -1.0}, "ray_cpus must be a non-negative number, not -1.0"),
    ({"ray_cpus": float("nan")}, "ray_cpus must be a non-negative number, not nan"),
    ({"ray_resources": {"CPU": 2.0}}, "'CPU' is not a custom resource name"),
    ({"ray_resources": {"edge": "lots"}}, r"ray_resources\['edge'\] must be a non-negative number, not 'lots'"),
    ({"ray_resources": {"edge": 0.000001}}, "precision"),  # Ray's own check, passed on
], ids=["negative-cpus", "nan-cpus", "cpu-as-custom-resource", "non-numeric-resource", "too-fine"])
async def test_bad_actor_options_are_a_fleet_error_and_start_nothing(cluster: str, fields: dict[str, Any], message: str) -> None:
    pool = EnvPool(n=1, backend="ray", servers=2, start_timeout=10, **fields)
    with pytest.raises(FleetError, match=message):
        await pool.start()
    assert envfleet_actors(pool.backend.pool_id) == []  # type: ignore[union-attr]


BLOCK_RAY = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
"""


def test_without_ray_the_backend_names_the_extra_and_import_rollout_stays_light(tmp_path: Path) -> None:
    installed = subprocess.run([sys.executable, "-c", "import sys, rollout, rollout.fleet; sys.exit('ray' in sys.modules)"],
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, "import rollout imported ray although no pool asked for it"
    (tmp_path / "sitecustomize.py").write_text(BLOCK_RAY)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = textwrap.dedent("""
        import asyncio, sys
        import rollout
        assert "ray" not in sys.modules
        from rollout import EnvPool, FleetError
        try:
            asyncio.run(EnvPool(n=1, backend="ray", servers=1).start())
        except FleetError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'envfleet[ray]'" in out.stdout
    cli = subprocess.run([ROLLOUT, "bench", "--backend", "ray", "--servers", "1", "--seconds", "1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert cli.returncode == 1 and "rollout: error: the ray backend needs Ray" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_rollout_bench_runs_on_the_cluster(cluster: str) -> None:
    out = subprocess.run([ROLLOUT, "bench", "--backend", "ray", "--ray-address", cluster, "--servers", "2", "--n", "16",
                          "--seconds", "1", "--mode", "per-env", "--json", "-"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backend"] == "ray" and report["results"][0]["steps"] > 0
