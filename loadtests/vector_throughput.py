"""Columnar batches against the in-process limit, the per-env API, Gymnasium's AsyncVectorEnv and envpool.

usage: python loadtests/vector_throughput.py [--seconds 5] [--warmup 1] [--servers 2]
                                             [--skip-async-256] [--out loadtests/out/vector_throughput.json]

Measured in one run, on this machine, OpenSpiel catch unless said (steps/s count every env
step of a batch, including the steps that auto-reset a finished env, in every case alike):

  (a)  in-process limit, one core: pyspiel catch, random legal actions, the tensor written in
       place into a [k, 10, 5] float32 buffer plus the legal-action mask, auto-reset;
  (a') in-process full observation, one core: legal actions, observation_tensor() as a list
       and observation_string() per step (what the per-env API sends);
  (b)  pool.vector() over the local backend with server-side auto-reset, n = 256 and 1,024
       (step(), and send/recv with two half batches in flight);
  (c)  the per-env API, n coroutines each awaiting its env's step, n = 256;
  (d)  Gymnasium's AsyncVectorEnv (one subprocess per env) over a Gymnasium wrapper of the
       same game (tensor plus mask), n = 8 and 256;
  (e)  CartPole-v1: envserver's gymnasium adapter through pool.vector(), envpool, and
       Gymnasium's SyncVectorEnv, n = 256 each.

Targets (issue 15): (b) >= 0.75 x (a); (c) >= 0.35 x (a'); (b) >= 5 x (d).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from common import cpu_seconds, write_report  # loadtests/ is on sys.path (script dir; pytest's pythonpath)

OUT = Path(__file__).resolve().parent / "out" / "vector_throughput.json"


class Case(msgspec.Struct):
    name: str
    n: int
    steps: int
    seconds: float
    steps_per_s: float
    note: str = ""
    error: str | None = None
    cpu_s: float = 0.0  # CPU seconds of this process and its servers in the measured window
    steps_per_cpu_s: float = 0.0  # on a busy machine, the steadier figure
    cores_used: float = 0.0


def cpu_now(pids: list[int] = ()) -> float:  # type: ignore[assignment]
    """CPU seconds so far of this process (all its threads) and of ``pids``."""
    return time.process_time() + sum(cpu_seconds(pid) for pid in pids)


def with_cpu(case: Case, cpu: float) -> Case:
    case.cpu_s = round(cpu, 3)
    case.steps_per_cpu_s = round(case.steps / cpu, 1) if cpu > 0 else 0.0
    case.cores_used = round(cpu / case.seconds, 2) if case.seconds else 0.0
    return case


class Report(msgspec.Struct):
    cases: list[Case]
    ratios: dict[str, float | None]
    targets: dict[str, bool | None]
    cpu_count: int


def timed(name: str, n: int, seconds: float, warmup: float, run: Callable[[float], int], note: str = "", pids: list[int] = ()) -> Case:  # type: ignore[assignment]
    """Run ``run(deadline) -> steps`` for ``warmup`` then ``seconds`` seconds (CPU counted for this process and ``pids``)."""
    try:
        run(time.perf_counter() + warmup)
        cpu = cpu_now(pids)
        started = time.perf_counter()
        steps = run(started + seconds)
        elapsed = time.perf_counter() - started
        case = with_cpu(Case(name, n, steps, round(elapsed, 3), round(steps / elapsed, 1), note), cpu_now(pids) - cpu)
    except Exception as exc:  # a case that cannot run is reported, the others go on
        case = Case(name, n, 0, 0.0, 0.0, note, f"{type(exc).__name__}: {exc}")
    report(case)
    return case


def random_steps(step: Callable[[np.ndarray], Any], n: int, actions: int) -> Callable[[float], int]:
    """A ``run(deadline) -> steps`` that calls ``step`` with n random actions below ``actions`` until the deadline."""
    rng = np.random.default_rng(0)

    def run(deadline: float) -> int:
        steps = 0
        while time.perf_counter() < deadline:
            step(rng.integers(0, actions, n))
            steps += n
        return steps

    return run


def report(case: Case) -> None:
    print(f"{case.name:<40} n={case.n:<5} {case.steps_per_s:>12,.0f} steps/s {case.steps_per_cpu_s:>12,.0f} steps/cpu-s {case.error or ''}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- (a) in process


def catch_states(k: int, seed: int) -> tuple[Any, list[Any], Callable[[], Any], random.Random]:
    """The catch game, k states past their chance node, ``fresh()`` for another such state, and the rng it draws from.

    The stepping loops stay inline in each case: a call per env step would slow the baselines.
    """
    import pyspiel

    game = pyspiel.load_game("catch")
    rng = random.Random(seed)

    def fresh() -> Any:
        state = game.new_initial_state()
        outcomes = state.chance_outcomes()
        state.apply_action(outcomes[int(rng.random() * len(outcomes))][0])
        return state

    return game, [fresh() for _ in range(k)], fresh, rng


def in_process_limit(k: int = 256, seed: int = 0) -> Callable[[float], int]:
    """One core: k catch states stepped with random legal actions, tensor in place, mask rows, auto-reset."""
    from open_spiel.python.observation import make_observation

    game, states, fresh, rng = catch_states(k, seed)
    observation = make_observation(game)
    tensor = memoryview(observation.tensor).cast("B")
    size = len(tensor)
    buffer = bytearray(size * k)
    out = memoryview(buffer)
    num_actions = game.num_distinct_actions()
    rows: dict[tuple[int, ...], bytes] = {}

    def run(deadline: float) -> int:
        steps = 0
        while time.perf_counter() < deadline:
            masks = []
            for i in range(k):
                state = states[i]
                if state.is_terminal():
                    state = states[i] = fresh()
                else:
                    legal = state.legal_actions(0)
                    state.apply_action(legal[int(rng.random() * len(legal))])
                observation.set_from(state, 0)
                out[i * size : (i + 1) * size] = tensor
                legal = [] if state.is_terminal() else state.legal_actions(0)
                key = tuple(legal)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = bytes(1 if a in legal else 0 for a in range(num_actions))
                masks.append(row)
            b"".join(masks)
            steps += k
        return steps

    return run


def in_process_full(k: int = 256, seed: int = 0) -> Callable[[float], int]:
    """One core: the full observation per step (legal actions, tensor as a list, text)."""
    _, states, fresh, rng = catch_states(k, seed)

    def run(deadline: float) -> int:
        steps = 0
        while time.perf_counter() < deadline:
            for i in range(k):
                state = states[i]
                if state.is_terminal():
                    state = states[i] = fresh()
                else:
                    legal = state.legal_actions(0)
                    state.apply_action(legal[int(rng.random() * len(legal))])
                state.legal_actions(0)
                state.observation_tensor(0)
                state.observation_string(0)
            steps += k
        return steps

    return run


# ---------------------------------------------------------------------------- (b), (c), (e) through envfleet


async def vector_case(pool_kwargs: dict[str, Any], n: int, seconds: float, warmup: float, pipelined: bool, name: str) -> Case:
    from rollout.pool import EnvPool

    async with EnvPool(n=n, **pool_kwargs) as pool:
        vector = pool.vector(batch_size=n // 2 if pipelined else None)
        rng = np.random.default_rng(0)
        _, info = await vector.reset(seed=0)

        def pick(mask: np.ndarray) -> np.ndarray:
            return np.argmax(rng.random(mask.shape) * mask, axis=1) if mask.shape[1] else np.zeros(len(mask), np.int64)

        async def loop(deadline: float) -> int:
            steps = 0
            if not pipelined:
                mask = info["action_mask"]
                while time.perf_counter() < deadline:
                    _, _, _, _, step_info = await vector.step(pick(mask))
                    mask = step_info["action_mask"]
                    steps += n
                return steps
            # two halves in flight: the client works on one while the servers compute the other
            half = n // 2
            vector.send(pick(info["action_mask"][:half]), np.arange(half))
            vector.send(pick(info["action_mask"][half:]), np.arange(half, n))
            while time.perf_counter() < deadline:
                _, _, _, _, got = await vector.recv()
                vector.send(pick(got["action_mask"]), got["env_id"])
                steps += len(got["env_id"])
            while True:  # drain, so the next loop starts clean
                try:
                    await vector.recv()
                except Exception:
                    break
            return steps

        pids = [pool.backend.pid(url) for url in pool.servers]  # type: ignore[union-attr]
        await loop(time.perf_counter() + warmup)
        cpu = cpu_now(pids)
        started = time.perf_counter()
        steps = await loop(started + seconds)
        elapsed = time.perf_counter() - started
        cpu = cpu_now(pids) - cpu
    case = with_cpu(Case(name, n, steps, round(elapsed, 3), round(steps / elapsed, 1), "batch_size n/2, two in flight" if pipelined else "step()"), cpu)
    report(case)
    return case


async def per_env_case(n: int, seconds: float, warmup: float, servers: int) -> Case:
    from rollout.commands.bench import measure
    from rollout.pool import EnvPool

    async with EnvPool(n=n, game="catch", servers=servers) as pool:
        pids = [pool.backend.pid(url) for url in pool.servers]  # type: ignore[union-attr]
        await measure(pool, "per-env", warmup, warmup=0.0)
        cpu = cpu_now(pids)
        result = await measure(pool, "per-env", seconds, warmup=0.0)
        cpu = cpu_now(pids) - cpu
    case = with_cpu(Case("(c) per-env await env.step", n, result.steps, result.seconds, result.steps_per_s, "full observation (tensor, text, legal actions)"), cpu)
    report(case)
    return case


def guarded(name: str, n: int, coro: Any) -> Case:
    try:
        result: Case = asyncio.run(coro)
        return result
    except Exception as exc:
        print(f"{name:<40} n={n:<5} failed: {exc!r}", file=sys.stderr, flush=True)
        return Case(name, n, 0, 0.0, 0.0, error=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------- (d) Gymnasium AsyncVectorEnv


def _catch_gym_env() -> Any:
    """A Gymnasium env of pyspiel catch: the tensor as observation, the legal-action mask in info."""
    import gymnasium
    import pyspiel
    from open_spiel.python.observation import make_observation

    class CatchGymEnv(gymnasium.Env):  # type: ignore[misc]
        def __init__(self) -> None:
            self.game = pyspiel.load_game("catch")
            self.obs = make_observation(self.game)
            self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (10, 5), np.float32)
            self.action_space = gymnasium.spaces.Discrete(3)
            self.state: Any = None

        def _out(self) -> tuple[np.ndarray, dict[str, Any]]:
            self.obs.set_from(self.state, 0)
            mask = np.zeros(3, bool)
            if not self.state.is_terminal():
                mask[self.state.legal_actions(0)] = True
            return self.obs.tensor.reshape(10, 5).copy(), {"action_mask": mask}

        def reset(self, *, seed: int | None = None, options: Any = None) -> Any:
            super().reset(seed=seed)
            self.state = self.game.new_initial_state()
            self.state.apply_action(int(self.np_random.integers(5)))
            return self._out()

        def step(self, action: Any) -> Any:
            self.state.apply_action(int(action))
            obs, info = self._out()
            done = self.state.is_terminal()
            return obs, float(self.state.returns()[0]) if done else 0.0, done, False, info

    return CatchGymEnv()


def async_vector_case(n: int, seconds: float, warmup: float) -> Case:
    import gymnasium

    def run_all() -> Case:
        envs = gymnasium.vector.AsyncVectorEnv([_catch_gym_env] * n, autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP)
        try:
            envs.reset(seed=0)
            run = random_steps(envs.step, n, 3)
            return timed("(d) gymnasium AsyncVectorEnv", n, seconds, warmup, run, "one subprocess per env", [p.pid for p in envs.processes])
        finally:
            envs.close()

    try:
        return run_all()
    except Exception as exc:
        return Case("(d) gymnasium AsyncVectorEnv", n, 0, 0.0, 0.0, error=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------- (e) CartPole


def envpool_case(n: int, seconds: float, warmup: float) -> Case:
    try:
        import envpool
    except ImportError as exc:
        return Case("(e) envpool CartPole-v1", n, 0, 0.0, 0.0, error=f"envpool not installed: {exc}")
    try:
        with warnings.catch_warnings():  # envpool's spaces warn about float64 bounds cast to float32: its business, not this measurement's
            warnings.simplefilter("ignore")
            envs = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n)
            envs.reset()
    except Exception as exc:
        return Case("(e) envpool CartPole-v1", n, 0, 0.0, 0.0, error=f"{type(exc).__name__}: {exc}")
    try:
        return timed("(e) envpool CartPole-v1", n, seconds, warmup, random_steps(envs.step, n, 2), f"envpool {envpool.__version__}, its own threads")
    finally:
        envs.close()


def sync_cartpole_case(n: int, seconds: float, warmup: float) -> Case:
    import gymnasium

    envs = gymnasium.make_vec("CartPole-v1", num_envs=n, vectorization_mode="sync")
    envs.reset(seed=0)
    try:
        return timed("(e) gymnasium SyncVectorEnv CartPole-v1", n, seconds, warmup, random_steps(envs.step, n, 2), "in process, one core")
    finally:
        envs.close()


# ---------------------------------------------------------------------------- report


def ratio(a: Case | None, b: Case | None, field: str = "steps_per_s") -> float | None:
    if a is None or b is None or not getattr(a, field) or not getattr(b, field):
        return None
    return round(getattr(a, field) / getattr(b, field), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--skip-async-256", action="store_true", help="leave out AsyncVectorEnv with 256 subprocesses")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seconds, warmup = args.seconds, args.warmup
    catch = {"game": "catch", "servers": args.servers}
    cases: dict[str, Case] = {}
    cases["a"] = timed("(a) in-process limit (tensor+mask)", 256, seconds, warmup, in_process_limit(), "one core")
    cases["a_full"] = timed("(a') in-process full observation", 256, seconds, warmup, in_process_full(), "one core")
    for n in (256, 1024):
        cases[f"b{n}"] = guarded("(b) pool.vector step()", n, vector_case(catch, n, seconds, warmup, False, "(b) pool.vector step()"))
        cases[f"b{n}_pipe"] = guarded("(b) pool.vector send/recv", n, vector_case(catch, n, seconds, warmup, True, "(b) pool.vector send/recv"))
    cases["c"] = guarded("(c) per-env await env.step", 256, per_env_case(256, seconds, warmup, args.servers))
    cases["d8"] = async_vector_case(8, seconds, warmup)
    if not args.skip_async_256:
        cases["d256"] = async_vector_case(256, seconds, warmup)
    cartpole = {"env": "gymnasium", "options": {"id": "CartPole-v1"}, "servers": args.servers}
    cases["e_envfleet"] = guarded("(e) envfleet gymnasium adapter CartPole", 256, vector_case(cartpole, 256, seconds, warmup, False, "(e) envfleet gymnasium adapter CartPole"))
    cases["e_envpool"] = envpool_case(256, seconds, warmup)
    cases["e_sync"] = sync_cartpole_case(256, seconds, warmup)

    def best(*keys: str, field: str = "steps_per_s") -> Case | None:
        found = [cases[k] for k in keys if k in cases and getattr(cases[k], field)]
        return max(found, key=lambda c: getattr(c, field)) if found else None

    def best_cpu(*keys: str) -> Case | None:
        return best(*keys, field="steps_per_cpu_s")

    b256 = best("b256", "b256_pipe")
    b_best = best("b256", "b256_pipe", "b1024", "b1024_pipe")
    d_best = best("d8", "d256")
    ratios = {
        "b256_step / a": ratio(cases.get("b256"), cases["a"]),
        "b256_best / a": ratio(b256, cases["a"]),
        "b1024_step / a": ratio(cases.get("b1024"), cases["a"]),
        "b_best / a": ratio(b_best, cases["a"]),
        "c / a_full": ratio(cases.get("c"), cases["a_full"]),
        "b256_best / d_best": ratio(b256, d_best),
        "b256_best / d256": ratio(b256, cases.get("d256")),
        "e_envfleet / e_envpool": ratio(cases.get("e_envfleet"), cases.get("e_envpool")),
        "e_envfleet / e_sync": ratio(cases.get("e_envfleet"), cases.get("e_sync")),
        # per CPU second (client and servers counted): steadier than wall time when other work shares the machine
        "cpu: b_best / a": ratio(best_cpu("b256", "b256_pipe", "b1024", "b1024_pipe"), cases["a"], "steps_per_cpu_s"),
        "cpu: c / a_full": ratio(cases.get("c"), cases["a_full"], "steps_per_cpu_s"),
        "cpu: b256_best / d_best": ratio(best_cpu("b256", "b256_pipe"), best_cpu("d8", "d256"), "steps_per_cpu_s"),
    }
    targets = {
        "(b) >= 0.75 x (a)": None if ratios["b_best / a"] is None else ratios["b_best / a"] >= 0.75,
        "(c) >= 0.35 x (a')": None if ratios["c / a_full"] is None else ratios["c / a_full"] >= 0.35,
        "(b) >= 5 x (d)": None if ratios["b256_best / d_best"] is None else ratios["b256_best / d_best"] >= 5.0,
    }
    report = Report(list(cases.values()), ratios, targets, os.cpu_count() or 0)
    write_report("vector_throughput", report, args.out)
    optional = ("(d)", "(e) envpool")  # references that may not run here (256 subprocesses; envpool not installed)
    return 1 if any(c.error for c in cases.values() if not c.name.startswith(optional)) else 0


if __name__ == "__main__":
    sys.exit(main())
