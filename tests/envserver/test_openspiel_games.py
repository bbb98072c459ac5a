"""OpenSpiel through the mux: determinism, every game against every opponent, tensors as pyspiel's."""

from __future__ import annotations

import math
import random
from array import array

import msgspec
import pyspiel
import pytest

from envserver.envs.openspiel import OPPONENTS, OpenSpielEnv
from envserver.envs.openspiel_types import OpenSpielAction
from envserver.protocol import Tensor

GAMES = ["catch", "tic_tac_toe", "connect_four", "kuhn_poker", "leduc_poker", "breakthrough"]


async def play(mux, sid: int, seed: int, options: dict, policy_seed: int, max_steps: int = 500) -> tuple[list[dict], dict]:
    """Reset with ``seed``, play random legal actions (from ``policy_seed``) to the end."""
    rng = random.Random(policy_seed)
    body = await mux.one("reset", sid, seed, options)
    trajectory = [body]
    while not body["terminated"]:
        legal = body["observation"]["legal_actions"]
        body = await mux.one("step", sid, legal[int(rng.random() * len(legal))])
        trajectory.append(body)
        assert len(trajectory) < max_steps
    return trajectory, await mux.one("state", sid)


@pytest.mark.parametrize(("game", "seed"), [("kuhn_poker", 3), ("catch", 7), ("leduc_poker", 11)])
async def test_same_seed_same_trajectory(catch_server, mux_connect, game: str, seed: int) -> None:
    first, second = await mux_connect(catch_server), await mux_connect(catch_server)
    await first.one("open", 1)
    await second.one("open", 1, None, {"game": game})
    runs = [
        await play(first, 1, seed, {"game": game}, policy_seed=seed),
        await play(second, 1, seed, {"game": game}, policy_seed=seed),  # another connection and session
        await play(first, 1, seed, {"game": game}, policy_seed=seed),  # the same session again
    ]
    (traj, state) = runs[0]
    assert len(traj) > 1 and traj[-1]["observation"]["game_phase"] == "terminal"
    for other_traj, other_state in runs[1:]:
        assert other_traj == traj
        assert other_state["history"] == state["history"]
        assert {k: v for k, v in other_state.items() if k != "episode_id"} == {k: v for k, v in state.items() if k != "episode_id"}
    # and the seed matters: some other seed deals or drops differently
    others = [(await play(first, 1, s, {"game": game}, policy_seed=seed))[1]["history"] for s in range(seed + 1, seed + 9)]
    assert any(h != state["history"] for h in others)


@pytest.mark.parametrize("opponent", sorted(OPPONENTS))
async def test_every_game_plays_to_the_end(catch_server, mux_connect, opponent: str) -> None:
    mux = await mux_connect(catch_server)
    sessions = {}
    for sid, game in enumerate(GAMES):
        for seat in (0, 1) if game != "catch" else (0,):
            key = sid * 2 + seat
            sessions[key] = (game, seat)
            await mux.one("open", key)
    rng = random.Random(0)
    frame = [mux.req("reset", key, key, {"game": g, "agent_player": seat, "opponent": opponent}) for key, (g, seat) in sessions.items()]
    replies = dict(zip(sessions, await mux.call(*frame)))
    steps = dict.fromkeys(sessions, 0)
    while True:
        live = [k for k, r in replies.items() if not r.body["terminated"]]
        if not live:
            break
        for k in live:
            obs = replies[k].body["observation"]
            assert obs["legal_actions"] and obs["game_phase"] in ("initial", "playing")
            assert obs["current_player_id"] == sessions[k][1]
        frame = [mux.req("step", k, rng.choice(replies[k].body["observation"]["legal_actions"])) for k in live]
        for k, reply in zip(live, await mux.call(*frame)):
            assert reply.ok, (sessions[k], reply.body)
            replies[k] = reply
            steps[k] += 1
            assert steps[k] < 1000, sessions[k]
    for k, reply in replies.items():
        game, seat = sessions[k]
        obs = reply.body["observation"]
        assert obs["game_phase"] == "terminal" and obs["legal_actions"] == []
        assert len(obs["returns"]) == pyspiel.load_game(game).num_players()
        if game != "catch":
            assert sum(obs["returns"]) == pytest.approx(0.0)  # all six two-player games are zero-sum
        state = await mux.one("state", k)
        assert state["game_name"] == game and state["agent_player"] == seat and state["opponent_policy"] == opponent
        assert state["step_count"] == steps[k]
    await mux.call(*[mux.req("close", k) for k in sessions])


def expected_tensor(game: pyspiel.Game, history: list[int], player: int) -> bytes:
    state = game.new_initial_state()
    for action in history:
        state.apply_action(action)
    if game.get_type().provides_information_state_tensor:
        values = state.information_state_tensor(player)
    else:
        values = state.observation_tensor(player)
    return array("f", values).tobytes()


@pytest.mark.parametrize("game_name", GAMES)
async def test_tensor_matches_pyspiel(catch_server, mux_connect, game_name: str) -> None:
    """The observation's tensor is what pyspiel gives for the agent at the same history."""
    mux = await mux_connect(catch_server)
    game = pyspiel.load_game(game_name)
    for seat in range(min(2, game.num_players())):
        await mux.one("open", seat)
        body = await mux.one("reset", seat, 5, {"game": game_name, "agent_player": seat})
        rng = random.Random(seat)
        while True:
            history = (await mux.one("state", seat))["history"]
            tensor = msgspec.convert(body["observation"]["info_state"], Tensor)
            assert tensor.dtype == "float32"
            assert tensor.data == expected_tensor(game, history, seat), (game_name, history)
            size = len(tensor.data) // 4
            assert size == math.prod(tensor.shape)
            assert len(tensor.tolist()) == size and tensor.numpy().size == size
            if body["terminated"]:
                break
            body = await mux.one("step", seat, rng.choice(body["observation"]["legal_actions"]))
        await mux.one("close", seat)


async def test_text_and_tensor_can_be_left_out(catch_server, mux_connect) -> None:
    """``text: false`` / ``tensor: false`` drop just that field; the episode and the rest are the same."""
    mux = await mux_connect(catch_server)
    variants = {1: {}, 2: {"text": False}, 3: {"tensor": False}}
    runs = {}
    for sid, extra in variants.items():
        await mux.one("open", sid)
        runs[sid] = (await play(mux, sid, 9, {"game": "kuhn_poker", **extra}, policy_seed=9))[0]
    full = runs[1]
    assert all(b["observation"]["text"] and b["observation"]["info_state"] for b in full)
    for sid, field in ((2, "text"), (3, "info_state")):
        assert len(runs[sid]) == len(full)
        for body, expected in zip(runs[sid], full):
            assert body["observation"][field] is None
            body["observation"][field] = expected["observation"][field]
            assert body == expected
    for sid in (2, 3):  # a reset without options is back to the server's defaults
        observation = (await mux.one("reset", sid, 9))["observation"]
        assert observation["text"] and observation["info_state"]


def test_seeded_draws_are_pinned() -> None:
    """Chance and opponent draws for a seed never change (recorded trajectories depend on them)."""
    catch = OpenSpielEnv()
    assert [catch.reset(seed=s) and catch.state().history[0] for s in range(12)] == [4, 2, 2, 0, 2, 1, 3, 1, 3, 3, 0, 1]
    leduc = OpenSpielEnv(game="leduc_poker")  # chance deals and a random opponent
    histories = []
    for seed in range(3):
        result = leduc.reset(seed=seed)
        while not result.terminated:
            result = leduc.step(OpenSpielAction(result.observation.legal_actions[0]))
        histories.append(leduc.state().history)
    assert histories == [[5, 2, 1, 1, 4, 1, 1], [3, 4, 1, 2, 0], [3, 4, 1, 2, 0]]


def test_episode_ids_are_unique_hex() -> None:
    envs = [OpenSpielEnv(), OpenSpielEnv()]
    assert envs[0].state().episode_id is None
    ids = []
    for _ in range(100):
        for env in envs:
            env.reset()
            ids.append(env.state().episode_id)
            assert env.state().episode_id == ids[-1]  # stable within the episode
    assert len(set(ids)) == len(ids) and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
