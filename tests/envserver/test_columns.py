"""Columnar batches (``vstep``/``vreset`` on ``/v1/mux``): packed arrays, auto-reset modes, seeds, bad input."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from envserver.env import Environment
from envserver.envs.openspiel import OpenSpielEnv
from envserver.errors import ServerError
from envserver.protocol import Columns, ErrorCode, VecReset, VecStep, episode_seed
from envserver.sessions import Session
from envserver.surfaces.columns import ColumnBatch, VectorSessions

columns_decoder = msgspec.msgpack.Decoder(Columns)


def arrays(body: Any) -> dict[str, Any]:
    """A ``Columns`` reply body (decoded untyped by the test client) as numpy arrays."""
    columns = msgspec.convert(body, Columns) if not isinstance(body, Columns) else body
    k = len(columns.reward) // 8
    out: dict[str, Any] = {
        "obs": np.frombuffer(columns.obs, np.float32).reshape(k, *columns.obs_shape) if columns.obs else None,
        "reward": np.frombuffer(columns.reward, np.float64),
        "terminated": np.frombuffer(columns.terminated, np.bool_),
        "truncated": np.frombuffer(columns.truncated, np.bool_),
        "failures": {row: info.code for row, info in columns.failures.items()},
        "messages": {row: info.message for row, info in columns.failures.items()},
        "final_obs": np.frombuffer(columns.final_obs, np.float32).reshape(k, *columns.obs_shape) if columns.final_obs else None,
        "text": columns.text,
    }
    if columns.num_actions:
        out["mask"] = np.frombuffer(columns.mask, np.bool_).reshape(k, columns.num_actions)
    return out


async def vone(mux: Any, kind: type, *fields: Any) -> dict[str, Any]:
    """Send one vstep/vreset; return its reply as arrays (raising if the whole request failed)."""
    (reply,) = await mux.call(vreq(mux, kind, *fields))
    assert reply.ok, reply.body
    return arrays(reply.body)


def vreq(mux: Any, kind: type, *fields: Any) -> Any:
    mux._ids += 1
    return kind(mux._ids, *fields)


def actions(*values: int) -> bytes:
    return np.array(values, np.int64).tobytes()


async def opened(mux: Any, sids: list[int], options: dict[str, Any] | None = None) -> None:
    replies = await mux.call(*(mux.req("open", sid, None, options or {}) for sid in sids))
    assert all(r.ok for r in replies), replies


async def test_vreset_and_vstep_answer_packed_arrays_equal_to_the_typed_api(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1, 2, 3, 4])
    reset = await vone(mux, VecReset, [1, 2], [7, 8])  
    typed = await mux.one("reset", 3, episode_seed(7, 0))
    assert reset["obs"].shape == (2, 10, 5) and reset["obs"].dtype == np.float32
    assert np.frombuffer(typed["observation"]["info_state"][1], np.float32).tolist() == reset["obs"][0].ravel().tolist()
    assert reset["mask"].tolist() == [[True, True, True]] * 2
    step = await vone(mux, VecStep, [1, 3], actions(1, 1))
    assert not step["failures"]
    assert step["obs"][0].tolist() == step["obs"][1].tolist()  # same seed, same action: same observation
    await mux.call(*(mux.req("close", sid) for sid in [1, 2, 3, 4]))


async def test_next_step_resets_the_step_after_the_end_and_ignores_its_action(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1])
    first = await vone(mux, VecReset, [1], [5])
    for _ in range(9):  # catch lasts 9 moves
        out = await vone(mux, VecStep, [1], actions(1))
    assert out["terminated"].tolist() == [True] and out["reward"][0] in (-1.0, 1.0)
    assert out["mask"].tolist() == [[False, False, False]]  # nothing is legal at the end
    after = await vone(mux, VecStep, [1], actions(99))  # ignored: this step resets
    assert not after["failures"] and after["reward"].tolist() == [0.0] and after["terminated"].tolist() == [False]
    assert after["mask"].tolist() == [[True, True, True]]
    second = await vone(mux, VecReset, [1], [5])
    assert second["obs"].tolist() == first["obs"].tolist()
    # the auto-reset started episode 1 of base seed 5, which is what a typed reset with that seed gives
    typed = await mux.one("reset", 1, episode_seed(5, 1))
    assert np.frombuffer(typed["observation"]["info_state"][1], np.float32).tolist() == after["obs"][0].ravel().tolist()
    await mux.one("close", 1)


async def test_same_step_returns_the_reset_observation_and_the_final_one_apart(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1, 2])
    await vone(mux, VecReset, [1, 2], [3, 4])
    for _ in range(8):
        out = await vone(mux, VecStep, [1, 2], actions(0, 2), "same_step")
        assert out["final_obs"] is None
    last = await vone(mux, VecStep, [1, 2], actions(0, 2), "same_step")
    assert last["terminated"].tolist() == [True, True] and set(last["reward"].tolist()) <= {-1.0, 1.0}
    assert last["final_obs"] is not None
    assert last["final_obs"][:, :9].sum() == 0 and last["final_obs"][:, 9].sum() >= 2  # final boards: ball down at the paddle's row
    assert last["obs"][:, 0].sum() == 2  # the next episodes' boards: ball at the top
    assert last["mask"].tolist() == [[True, True, True]] * 2  # already the next episode's
    fresh = [await mux.one("reset", sid, episode_seed(base, 1)) for sid, base in ((1, 3), (2, 4))]
    for row, typed in enumerate(fresh):
        assert np.frombuffer(typed["observation"]["info_state"][1], np.float32).tolist() == last["obs"][row].ravel().tolist()
    await mux.call(mux.req("close", 1), mux.req("close", 2))


async def test_disabled_mode_reports_episode_over_for_that_row_only(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1, 2])
    await vone(mux, VecReset, [1], [0])
    await vone(mux, VecReset, [2], [0])
    for _ in range(9):
        await vone(mux, VecStep, [1], actions(1), "disabled")
    out = await vone(mux, VecStep, [1, 2], actions(1, 1), "disabled")
    assert out["failures"][0] == "EPISODE_OVER" and 1 not in out["failures"]
    assert out["obs"][0].sum() == 0.0 and out["obs"][1].sum() == 2.0  # failed row zero, the other a board
    await mux.call(mux.req("close", 1), mux.req("close", 2))


async def test_bad_rows_fail_alone_and_bad_requests_fail_whole(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1, 2])
    await vone(mux, VecReset, [1, 2], [0, 1])
    out = await vone(mux, VecStep, [1, 2, 77], actions(9, 1, 1))
    assert out["failures"][0] == "INVALID_ACTION"
    assert out["failures"][2] == "UNKNOWN_SESSION"
    assert 1 not in out["failures"] and out["obs"][1].sum() == 2.0
    (short,) = await mux.call(vreq(mux, VecStep, [1, 2], actions(1)))
    assert not short.ok and short.body["code"] == "VALIDATION_ERROR" and "bytes of actions" in short.body["message"]
    (twice,) = await mux.call(vreq(mux, VecStep, [1, 1], actions(1, 1)))
    assert not twice.ok and "twice" in twice.body["message"]
    (mode,) = await mux.call(vreq(mux, VecStep, [1], actions(1), "sometimes"))
    assert not mode.ok and mode.body["code"] == "VALIDATION_ERROR"
    (seeds,) = await mux.call(vreq(mux, VecReset, [1, 2], [1]))
    assert not seeds.ok and "seeds" in seeds.body["message"]
    await mux.ping()  # the connection keeps working
    await mux.call(mux.req("close", 1), mux.req("close", 2))


async def test_text_comes_only_when_asked(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1])
    plain = await vone(mux, VecReset, [1], [0])
    assert plain["text"] is None
    with_text = await vone(mux, VecStep, [1], actions(1), "next_step", True)
    assert with_text["text"] is not None and with_text["text"][0].count("\n") >= 9  # catch's 10-row board
    await mux.one("close", 1)


async def test_envs_without_tensors_or_blocking_ones_are_refused_per_row(test_envs_server, mux_connect) -> None:
    mux = await mux_connect(test_envs_server)
    await opened(mux, [1])
    replies = await mux.call(mux.req("open", 2, "slow_echo", {}))
    assert replies[0].ok
    out = await vone(mux, VecReset, [1, 2], [0, 0])
    assert out["failures"][0] == "VALIDATION_ERROR" and "tensor" in out["messages"][0]
    assert out["failures"][1] == "VALIDATION_ERROR" and "blocking" in out["messages"][1]
    await mux.call(mux.req("close", 1), mux.req("close", 2))


# ---------------------------------------------------------------------------- in process: fast path == generic path


def _play(write: Any, envs: list[OpenSpielEnv], seeds: list[int], moves: list[list[int]]) -> list[Columns]:
    out = []
    batch = ColumnBatch(len(envs), envs[0].column_spec(), text=True)
    write(envs, (), batch, dict(enumerate(seeds)))
    out.append(batch.columns())
    for row_actions in moves:
        batch = ColumnBatch(len(envs), envs[0].column_spec(), text=True)
        write(envs, row_actions, batch, {})
        out.append(batch.columns())
    return out


@pytest.mark.parametrize("game", ["catch", "tic_tac_toe", "kuhn_poker"])
def test_openspiel_fast_path_writes_what_the_generic_path_writes(game: str) -> None:
    generic = Environment.write_batch.__func__  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    moves = []
    probe = [OpenSpielEnv(game=game) for _ in range(4)]
    first = _play(OpenSpielEnv.write_batch, probe, [1, 2, 3, 4], [])
    mask = np.frombuffer(first[0].mask, np.bool_).reshape(4, -1)
    for _ in range(3):  # legal first moves for every row, then whatever (illegal rows must fail the same way)
        moves.append([int(rng.choice(np.flatnonzero(m))) if m.any() else 0 for m in mask])
    fast = _play(OpenSpielEnv.write_batch, [OpenSpielEnv(game=game) for _ in range(4)], [1, 2, 3, 4], moves)
    slow = _play(lambda *a: generic(OpenSpielEnv, *a), [OpenSpielEnv(game=game) for _ in range(4)], [1, 2, 3, 4], moves)
    for a, b in zip(fast, slow):
        assert a == b


def test_vector_sessions_derive_each_episode_seed_from_base_and_index() -> None:
    envs = {sid: OpenSpielEnv(game="catch") for sid in (1, 2)}
    live = {sid: Session(str(sid), env) for sid, env in envs.items()}
    sessions = VectorSessions(live.__getitem__)
    sessions.handle(VecReset(1, [1, 2], [10, 10], [0, 3]))
    assert envs[1]._seed == episode_seed(10, 0) and envs[2]._seed == episode_seed(10, 3)
    for _ in range(10):
        sessions.handle(VecStep(2, [1, 2], actions(1, 1)))
    assert envs[1]._seed == episode_seed(10, 1) and envs[2]._seed == episode_seed(10, 4)
    with pytest.raises(ServerError) as info:
        sessions.handle(VecStep(3, [1, 2], actions(1)))
    assert info.value.code is ErrorCode.VALIDATION_ERROR


# ---------------------------------------------------------------------------- hostile frames


async def test_hostile_columnar_requests_get_coded_errors_and_the_connection_lives(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await opened(mux, [1, 2])
    raw = [
        ["vstep", 901, [1, 2], [1, 1]],  # actions as a list, not packed bytes
        ["vstep", 902, [1, 2], b"\x01" * 16, "next_step", "yes"],  # text not a bool
        ["vstep", 903, "1,2", b"\x00" * 16],  # sids not a list
        ["vreset", 904, [1, 2], [1, 2], [0, 1], False, "extra"],  # a field too many
        ["vreset", 905, [1, 2], ["a", "b"]],  # seeds not ints
        ["vstep", 906, [1, 2], b"\x00" * 17],  # not a whole number of int64
    ]
    await mux.send_raw(msgspec.msgpack.encode(raw))
    got: dict[int, Any] = {}
    while len(got) < len(raw):
        for reply in await mux.recv():
            got[reply.id] = reply
    for rid in range(901, 907):
        assert not got[rid].ok and got[rid].body["code"] == "VALIDATION_ERROR", got[rid]
    # empty, negative seeds, far episodes and huge actions: answered, never a crash
    empty = await vone(mux, VecReset, [], [])
    assert empty["reward"].size == 0 and not empty["failures"]
    odd = await vone(mux, VecReset, [1, 2], [-5, 2**63 - 1], [-3, 2**40])
    assert not odd["failures"] and odd["obs"].shape == (2, 10, 5)
    huge = await vone(mux, VecStep, [1, 2], np.array([2**62, -(2**62)], np.int64).tobytes())
    assert huge["failures"] == {0: "INVALID_ACTION", 1: "INVALID_ACTION"}
    other = await mux_connect(catch_server)  # sids name this connection's sessions only
    foreign = await vone(other, VecStep, [1, 2], actions(1, 1))
    assert foreign["failures"] == {0: "UNKNOWN_SESSION", 1: "UNKNOWN_SESSION"}
    await mux.ping()
    await mux.call(mux.req("close", 1), mux.req("close", 2))


def test_gymnasium_adapter_fast_path_writes_what_the_generic_path_writes() -> None:
    from envserver.envs.gymnasium_env import GymnasiumEnv

    generic = Environment.write_batch.__func__  # type: ignore[attr-defined]
    moves = [[0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 5]]  # the last row's 5 is outside Discrete(2)
    fast = _play(GymnasiumEnv.write_batch, [GymnasiumEnv() for _ in range(3)], [1, 2, 3], moves)  # type: ignore[arg-type]
    slow = _play(lambda *a: generic(GymnasiumEnv, *a), [GymnasiumEnv() for _ in range(3)], [1, 2, 3], moves)  # type: ignore[arg-type]
    for a, b in zip(fast, slow):
        assert a.failures.keys() == b.failures.keys()
        assert (a.obs, a.reward, a.terminated, a.truncated, a.mask) == (b.obs, b.reward, b.terminated, b.truncated, b.mask)
    assert fast[-1].failures[2].code == "INVALID_ACTION"
