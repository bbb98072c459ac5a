"""``WS /v1/mux`` against a real server: batching, ordering, and every kind of bad input."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from envserver.protocol import ErrorCode, Tensor, msgpack_encoder


def error_code(reply: object) -> str:
    assert not reply.ok, f"expected an error, got {reply}"  # type: ignore[attr-defined]
    return reply.body["code"]  # type: ignore[attr-defined,no-any-return]


async def test_many_sessions_on_one_connection(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    sids = range(1, 33)
    opened = await mux.call(*[mux.req("open", s) for s in sids])
    assert [r.body for r in opened] == [{"sid": s, "env": "openspiel"} for s in sids]
    resets = await mux.call(*[mux.req("reset", s, s) for s in sids])
    for reply in resets:
        assert reply.ok
        obs = reply.body["observation"]
        assert obs["legal_actions"] == [0, 1, 2]
        assert obs["game_phase"] == "initial"
        tensor = msgspec.convert(obs["info_state"], Tensor)
        assert tensor.shape == (10, 5) and tensor.dtype == "float32"
        assert sum(tensor.tolist()) == 2.0  # the ball and the paddle
    # Play every session to the end, one frame per round.
    for round_ in range(9):
        steps = await mux.call(*[mux.req("step", s, 1) for s in sids])
        assert all(r.ok for r in steps)
        assert all(r.body["terminated"] is (round_ == 8) for r in steps)
    assert {r.body["reward"] for r in steps} <= {1.0, -1.0}
    closed = await mux.call(*[mux.req("close", s) for s in sids])
    assert all(r.ok and r.body is None for r in closed)


async def test_a_frame_is_answered_in_one_reply_frame(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    requests = [mux.req("open", 1), mux.req("reset", 1, 3)]
    requests += [mux.req("step", 1, 1) for _ in range(9)]
    requests += [mux.req("state", 1), mux.req("close", 1)]
    await mux.send(requests)
    replies = await mux.recv()
    assert [r.id for r in replies] == [r.id for r in requests]
    assert all(r.ok for r in replies)


async def test_requests_of_one_session_run_in_order(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1)
    await mux.one("open", 2)
    frame = [mux.req("reset", 1, 0), mux.req("reset", 2, 0)]
    for _ in range(4):
        frame += [mux.req("step", 1, 0), mux.req("state", 1), mux.req("step", 2, 2), mux.req("state", 2)]
    replies = await mux.call(*frame)
    counts = [r.body["step_count"] for r in replies if r.ok and "step_count" in r.body]
    assert counts == [1, 1, 2, 2, 3, 3, 4, 4]
    histories = [r.body["history"] for r in replies if "history" in (r.body or {})]
    assert histories[-2][-4:] == [0, 0, 0, 0] and histories[-1][-4:] == [2, 2, 2, 2]


async def test_blocking_env_keeps_per_session_order(test_envs_server, mux_connect) -> None:
    """A blocking env runs in worker threads; one session's requests still run in arrival order."""
    mux = await mux_connect(test_envs_server)
    await mux.one("open", 1, "slow_echo")
    await mux.one("open", 2, "slow_echo")
    frame = [mux.req("reset", 1), mux.req("reset", 2)]
    for i in range(6):
        frame += [mux.req("step", 1, {"message": f"a{i}"}), mux.req("step", 2, {"message": f"b{i}"})]
    frame += [mux.req("state", 1), mux.req("state", 2)]
    replies = await mux.call(*frame)
    assert all(r.ok for r in replies), replies
    assert [r.body["observation"]["echoed_message"] for r in replies[2:-2:2]] == [f"a{i}" for i in range(6)]
    assert [r.body["observation"]["echoed_message"] for r in replies[3:-2:2]] == [f"b{i}" for i in range(6)]
    assert replies[-2].body["step_count"] == replies[-1].body["step_count"] == 6
    await mux.ping()


async def test_many_sessions_step_and_reset_in_one_request(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.call(*[mux.req("open", s) for s in (1, 2, 3, 4)])
    (batch,) = await mux.call(mux.req("resets", [1, 2, 3], [5, 6, 5]))
    results, failures = batch.body
    assert batch.ok and failures == {} and len(results) == 3
    single = await mux.one("reset", 4, 5)
    assert results[0] == results[2] == single  # the same seed, the same observation
    # one illegal action and one unknown session fail alone; the rest of the request is answered
    (batch,) = await mux.call(mux.req("steps", [1, 2, 99, 3], [0, 7, 1, 2]))
    results, failures = batch.body
    assert {i: f["code"] for i, f in failures.items()} == {1: ErrorCode.INVALID_ACTION, 2: ErrorCode.UNKNOWN_SESSION}
    assert results[1] is None and results[2] is None
    assert results[0]["observation"]["game_phase"] == results[3]["observation"]["game_phase"] == "playing"
    states = await mux.call(*[mux.req("state", s) for s in (1, 2, 3)])
    assert [r.body["step_count"] for r in states] == [1, 0, 1]  # the illegal action left session 2 unchanged


async def test_many_request_with_mismatched_lists(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1)
    replies = await mux.call(mux.req("steps", [1], [0, 1]), mux.req("resets", [1, 1], [None]))
    assert [error_code(r) for r in replies] == [ErrorCode.VALIDATION_ERROR] * 2
    assert "1 sids but 2 actions" in replies[0].body["message"]
    await mux.ping()


async def test_many_request_on_blocking_envs(test_envs_server, mux_connect) -> None:
    """Sessions of a blocking env in one many-request run in threads; the reply holds every result in order."""
    mux = await mux_connect(test_envs_server)
    await mux.call(mux.req("open", 1, "slow_echo"), mux.req("open", 2, "slow_echo"))
    (reset,) = await mux.call(mux.req("resets", [1, 2], [None, None]))
    assert reset.ok and reset.body[1] == {}
    (batch,) = await mux.call(mux.req("steps", [1, 2, 1, 7], [{"message": "a"}, {"message": "b"}, {"message": "c"}, {}]))
    results, failures = batch.body
    assert [r["observation"]["echoed_message"] for r in results[:3]] == ["a", "b", "c"]
    assert results[3] is None and failures[3]["code"] == ErrorCode.UNKNOWN_SESSION
    states = await mux.call(mux.req("state", 1), mux.req("state", 2))
    assert [r.body["step_count"] for r in states] == [2, 1]
    # a single request after a many-request in the same frame runs after it on the same session
    batch, state = await mux.call(mux.req("steps", [1], [{"message": "d"}]), mux.req("state", 1))
    assert batch.ok and state.body["step_count"] == 3


async def test_unknown_op(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.send_raw(msgspec.msgpack.encode([["launch", 41, 1]]))
    (reply,) = await mux.recv()
    assert reply.id == 41 and error_code(reply) == ErrorCode.UNKNOWN_TYPE
    assert "launch" in reply.body["message"]
    await mux.ping()


async def test_good_requests_in_a_frame_with_a_bad_one_are_answered(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.send_raw(msgspec.msgpack.encode([["ping", 1, 0], ["bogus", 2, 0], ["step", 3, "not-a-sid"], ["ping", 4, 0]]))
    replies = {r.id: r for r in await mux.recv()}
    assert replies[1].ok and replies[4].ok
    assert error_code(replies[2]) == ErrorCode.UNKNOWN_TYPE
    assert error_code(replies[3]) == ErrorCode.VALIDATION_ERROR


async def test_unknown_session(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    replies = await mux.call(mux.req("step", 99, 1), mux.req("reset", 99), mux.req("state", 99), mux.req("close", 99))
    assert [error_code(r) for r in replies] == [ErrorCode.UNKNOWN_SESSION] * 4
    await mux.ping()


async def test_closed_session_is_unknown(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 5)
    await mux.one("close", 5)
    (reply,) = await mux.call(mux.req("reset", 5))
    assert error_code(reply) == ErrorCode.UNKNOWN_SESSION
    await mux.one("open", 5)  # the id can be reused
    await mux.one("close", 5)


async def test_open_twice(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1)
    (reply,) = await mux.call(mux.req("open", 1))
    assert error_code(reply) == ErrorCode.SESSION_EXISTS
    await mux.one("reset", 1)


@pytest.mark.parametrize(
    "data",
    [b"\xc1", b"\x93\xa4step", msgpack_encoder.encode([["step", 1, 1, 2]])[:-2], b"\xdd\xff\xff\xff\xff"],
    ids=["never-used-byte", "truncated-array", "truncated-frame", "huge-array-header"],
)
async def test_malformed_msgpack(catch_server, mux_connect, data: bytes) -> None:
    mux = await mux_connect(catch_server)
    await mux.send_raw(data)
    (reply,) = await mux.recv()
    assert reply.id == 0 and error_code(reply) == ErrorCode.INVALID_JSON
    await mux.ping()


@pytest.mark.parametrize("frame", [{"op": "ping"}, 7, [[]], [["ping"]], [{"op": "ping", "id": 1, "sid": 0}]])
async def test_wrong_shaped_frame(catch_server, mux_connect, frame: object) -> None:
    mux = await mux_connect(catch_server)
    await mux.send_raw(msgspec.msgpack.encode(frame))
    replies = await mux.recv()
    assert replies and all(error_code(r) in (ErrorCode.VALIDATION_ERROR, ErrorCode.UNKNOWN_TYPE) for r in replies)
    await mux.ping()


async def test_text_frame_is_refused(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.ws.send_str('[["ping", 1, 0]]')
    (reply,) = await mux.recv()
    assert error_code(reply) == ErrorCode.INVALID_JSON
    await mux.ping()


@pytest.mark.parametrize("action", ["left", 1.5, True, None, [1], {"action_id": "1"}, {"action_id": 1, "extra": 2}])
async def test_wrong_typed_action(catch_server, mux_connect, action: object) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1)
    await mux.one("reset", 1, 7)
    (reply,) = await mux.call(mux.req("step", 1, action))
    assert error_code(reply) == ErrorCode.VALIDATION_ERROR
    state = await mux.one("state", 1)
    assert state["step_count"] == 0
    await mux.one("step", 1, {"action_id": 1})  # OpenEnv's action shape works on the mux too


async def test_illegal_action_leaves_the_episode_unchanged(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1, None, {"game": "tic_tac_toe", "opponent": "first_legal"})
    first = await mux.one("reset", 1, 11)
    after = await mux.one("step", 1, 4)  # centre; the opponent answers in cell 0
    before_state = await mux.one("state", 1)
    assert before_state["history"] == [4, 0]
    for illegal in (4, 0, 9, -1, 10**6):
        (reply,) = await mux.call(mux.req("step", 1, illegal))
        assert error_code(reply) == ErrorCode.INVALID_ACTION
        assert str(illegal) in reply.body["message"]
    assert await mux.one("state", 1) == before_state
    legal = after["observation"]["legal_actions"]
    assert 4 not in legal and 0 not in legal and legal != first["observation"]["legal_actions"]
    nxt = await mux.one("step", 1, legal[0])
    assert (await mux.one("state", 1))["history"][:3] == [4, 0, legal[0]]
    assert nxt["observation"]["game_phase"] in ("playing", "terminal")


async def test_step_after_the_end(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1)
    (reply,) = await mux.call(mux.req("step", 1, 1))
    assert error_code(reply) == ErrorCode.EPISODE_OVER  # no reset yet
    await mux.one("reset", 1, 0)
    for _ in range(9):
        await mux.one("step", 1, 1)
    (reply,) = await mux.call(mux.req("step", 1, 1))
    assert error_code(reply) == ErrorCode.EPISODE_OVER


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"game": "no_such_game"}, "no_such_game"),
        ({"game": "catch", "params": {"rows": -3}}, "catch"),
        ({"game": "catch", "params": {"no_such_param": 1}}, "no_such_param"),
        ({"game": "catch", "params": {"rows": [1]}}, "params"),
        ({"game": "catch", "opponent": "grandmaster"}, "grandmaster"),
        ({"game": "kuhn_poker", "agent_player": 5}, "agent_player"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_bad_game_options(catch_server, mux_connect, options: dict, words: str) -> None:
    mux = await mux_connect(catch_server)
    await mux.one("open", 1)
    await mux.one("reset", 1, 1)
    await mux.one("step", 1, 0)
    (reply,) = await mux.call(mux.req("reset", 1, 1, options))
    assert error_code(reply) == ErrorCode.VALIDATION_ERROR
    assert words in reply.body["message"]
    assert (await mux.one("state", 1))["step_count"] == 1  # the running episode is untouched
    if "agent_player" in options:
        return  # the seat is checked against the game at reset, not at open
    (reply,) = await mux.call(mux.req("open", 2, None, options))
    # An option no client may set is refused before any environment is made; a bad value fails the make.
    assert error_code(reply) == (ErrorCode.VALIDATION_ERROR if "colour" in options else ErrorCode.FACTORY_ERROR)
    assert words in reply.body["message"]
    await mux.one("open", 2)  # the failed open did not take the id


async def test_environment_not_served(catch_server, mux_connect) -> None:
    mux = await mux_connect(catch_server)
    for env in ("no_such_env", "echo"):  # unknown, or known but not what the operator named
        (reply,) = await mux.call(mux.req("open", 1, env))
        assert error_code(reply) == ErrorCode.FORBIDDEN
        assert repr(env) in reply.body["message"] and "openspiel" in reply.body["message"]  # names what it serves
    assert (await mux.one("open", 1, "openspiel"))["env"] == "openspiel"


async def test_oversized_frame(spawn_server, mux_connect) -> None:
    server = spawn_server("--game", "catch", "--max-frame-bytes", "1024")
    mux = await mux_connect(server)
    await mux.one("open", 1)
    step = mux.req("step", 1, {"action_id": 1, "game_name": "x" * 1500})
    await mux.send([step, mux.req("ping", 0)])
    replies = await mux.recv()  # each request of the refused frame is named, so its caller alone fails
    assert [r.id for r in replies] == [step.id, step.id + 1]
    assert all(error_code(r) == ErrorCode.FRAME_TOO_LARGE and "1024" in r.body["message"] for r in replies)
    await mux.send_raw(b"\x91\xc5\x07\xd0" + b"x" * 2000)  # unreadable and too large: answered with id 0
    (reply,) = await mux.recv()
    assert reply.id == 0 and error_code(reply) == ErrorCode.FRAME_TOO_LARGE
    assert (await mux.one("reset", 1, 0))["observation"]["game_phase"] == "initial"
    assert server.proc.poll() is None


async def test_reset_storm_past_the_cap(spawn_server, mux_connect) -> None:
    server = spawn_server("--game", "catch", "--max-sessions", "8")
    first = await mux_connect(server)
    second = await mux_connect(server)
    replies = await first.call(*[first.req("open", s) for s in range(5)])
    assert all(r.ok for r in replies)
    frame = []
    for s in range(10):
        frame += [second.req("open", s), second.req("reset", s, s)]
    replies = await second.call(*frame)
    opens, resets = replies[::2], replies[1::2]
    assert [r.ok for r in opens] == [True] * 3 + [False] * 7
    assert {error_code(r) for r in opens[3:]} == {ErrorCode.CAPACITY_REACHED}
    assert "8" in opens[3].body["message"]
    assert {error_code(r) for r in resets[3:]} == {ErrorCode.UNKNOWN_SESSION}
    await second.ping()
    # Explicit closes free their slots ...
    await first.call(*[first.req("close", s) for s in range(5)])
    replies = await second.call(*[second.req("open", s) for s in range(3, 10)])
    assert [r.ok for r in replies] == [True] * 5 + [False] * 2
    # ... and so does a connection going away.
    await second.ws.close()
    third = await mux_connect(server)
    deadline = time.monotonic() + 5
    while True:
        replies = await third.call(*[third.req("open", s) for s in range(8)])
        if all(r.ok for r in replies) or time.monotonic() > deadline:
            break
        await third.call(*[third.req("close", s) for s, r in enumerate(replies) if r.ok])
        await asyncio.sleep(0.05)
    assert all(r.ok for r in replies), replies


async def test_sessions_expire_only_when_their_connection_is_silent(spawn_server, mux_connect) -> None:
    server = spawn_server("--game", "catch", "--idle-ttl", "0.4")
    mux = await mux_connect(server)
    await mux.one("open", 1)
    await mux.one("open", 2)
    await mux.one("reset", 1, 0)
    await mux.one("reset", 2, 0)
    for _ in range(6):  # session 2 idles, but its connection keeps talking: a sign of life for all its sessions
        await asyncio.sleep(0.15)
        await mux.one("ping", 0)
    assert (await mux.one("step", 2, 1))["observation"]["game_phase"] == "playing"
    await asyncio.sleep(1.0)  # the connection falls silent past the TTL
    (reply,) = await mux.call(mux.req("step", 2, 1))
    assert error_code(reply) == ErrorCode.UNKNOWN_SESSION
    assert "expired" in reply.body["message"]
    await mux.one("open", 2)  # an expired session may be opened again under its number
    assert (await mux.one("reset", 2, 0))["observation"]["game_phase"] == "initial"
    await mux.one("open", 3)  # the connection is fine
    await mux.one("reset", 3, 0)
