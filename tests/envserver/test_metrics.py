"""``GET /metrics``: Prometheus text that follows what real clients did to a real server."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from envserver.metrics import CONTENT_TYPE, Histogram

SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def parse(text: str) -> dict[str, float]:
    """Prometheus text as ``{"name{labels}": value}``, checking every line's shape on the way."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter", "histogram"), line
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            assert re.sub(r"_(bucket|sum|count)$", "", name) in typed or name in typed, f"{name} has no TYPE"
            samples[name + (labels or "")] = float(value)
    return samples


async def scrape(http: aiohttp.ClientSession, server: object) -> dict[str, float]:
    async with http.get(f"{server.url}/metrics") as response:  # type: ignore[attr-defined]
        assert response.status == 200
        assert response.headers["content-type"] == CONTENT_TYPE
        return parse(await response.text())


def buckets(samples: dict[str, float]) -> list[tuple[float, float]]:
    found = []
    for key, value in samples.items():
        match = re.fullmatch(r'envserver_mux_request_seconds_bucket\{le="([^"]+)"\}', key)
        if match:
            found.append((float(match.group(1)), value))
    return found


def test_histogram_charges_each_request_its_share_of_the_frame() -> None:
    histogram = Histogram([0.001, 0.01, 0.1])
    histogram.observe_frame(0.004, 4)  # 1 ms each: on the 0.001 bound, which is inclusive
    histogram.observe_frame(0.05, 1)
    histogram.observe_frame(0.0, 0)  # a frame with no requests records nothing
    histogram.observe(7.0)
    assert histogram.cumulative() == [("0.001", 4), ("0.01", 4), ("0.1", 5), ("+Inf", 6)]
    assert histogram.count == 6
    assert abs(histogram.sum - 7.054) < 1e-9


async def test_metrics_follow_mux_traffic(spawn_server, mux_connect, http) -> None:
    server = spawn_server("--env", "openspiel", "--game", "catch")
    before = await scrape(http, server)
    assert before["envserver_sessions_active"] == 0
    assert before["envserver_steps_total"] == 0
    assert before['envserver_info{version="0.1.0",env="openspiel"}'] == 1
    assert before["envserver_mux_request_seconds_count"] == 0

    mux = await mux_connect(server)
    await mux.call(mux.req("open", 1), mux.req("reset", 1, 7))  # frame 1: 2 requests
    for _ in range(3):  # frames 2-4: 1 step each
        await mux.one("step", 1, 1)
    (illegal,) = await mux.call(mux.req("step", 1, 99))  # frame 5: an error
    assert not illegal.ok

    after = await scrape(http, server)
    assert after["envserver_sessions_active"] == 1
    assert after["envserver_sessions_opened_total"] == 1
    assert after["envserver_resets_total"] == 1
    assert after["envserver_steps_total"] == 4  # the illegal step was requested too
    assert after["envserver_errors_total"] == 1
    assert after["envserver_frames_received_total"] == 5
    assert after["envserver_frames_sent_total"] == 5
    assert after["envserver_bytes_received_total"] > 5 * 4
    assert after["envserver_bytes_sent_total"] > after["envserver_bytes_received_total"]  # observations are bigger
    # 6 requests in 5 frames, each charged its share of its frame's handling time.
    assert after["envserver_mux_request_seconds_count"] == 6
    assert 0 < after["envserver_mux_request_seconds_sum"] < 1
    counts = buckets(after)
    assert counts[-1] == (float("inf"), 6)
    assert [c for _, c in counts] == sorted(c for _, c in counts)  # cumulative
    assert [b for b, _ in counts] == sorted(b for b, _ in counts)

    await mux.ws.close()
    for _ in range(100):  # the server closes the connection's sessions once it sees it go
        if (await scrape(http, server))["envserver_sessions_active"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await scrape(http, server))["envserver_sessions_active"] == 0


async def test_refused_and_expired_sessions_are_counted(spawn_server, http) -> None:
    server = spawn_server("--env", "echo", "--max-sessions", "1", "--idle-ttl", "0.2")
    ws_url = server.ws_url + "/ws"
    async with http.ws_connect(ws_url) as first:
        await first.send_json({"type": "reset", "data": {}})
        assert (await first.receive_json())["type"] == "observation"
        async with http.ws_connect(ws_url) as second:  # over the cap: told, then closed
            refused = await second.receive_json()
            assert refused["data"]["code"] == "CAPACITY_REACHED"
        samples = await scrape(http, server)
        assert samples["envserver_sessions_refused_total"] == 1
        assert samples["envserver_sessions_max"] == 1
        for _ in range(100):  # the reaper runs every idle_ttl / 4
            samples = await scrape(http, server)
            if samples["envserver_sessions_expired_total"]:
                break
            await asyncio.sleep(0.05)
        assert samples["envserver_sessions_expired_total"] == 1
        assert samples["envserver_sessions_active"] == 0
        # /ws requests count as steps and resets, but not as mux frames.
        assert samples["envserver_resets_total"] == 1
        assert samples["envserver_frames_received_total"] == 0


async def test_metrics_are_served_without_the_web_page(spawn_server, http) -> None:
    server = spawn_server("--env", "echo", "--no-web")
    samples = await scrape(http, server)
    assert samples['envserver_info{version="0.1.0",env="echo"}'] == 1
    async with http.get(f"{server.url}/web") as response:
        assert response.status == 404


async def test_a_blocking_env_step_is_counted_once_and_timed_whole(spawn_server, mux_connect, http: aiohttp.ClientSession) -> None:
    from tests.conftest import TEST_ENVS_SCRIPT

    server = spawn_server("--env", "slow_echo", script=TEST_ENVS_SCRIPT)
    mux = await mux_connect(server)
    for sid in (1, 2):
        await mux.one("open", sid)
        await mux.one("reset", sid, None)
    before = await scrape(http, server)
    for _ in range(5):  # "ab": the slow echo sleeps 4 ms per step in a worker thread
        (reply,) = await mux.call(mux.req("steps", [1, 2], [{"message": "ab"}, {"message": "ab"}]))
        assert reply.ok and not reply.body[1]
    await mux.one("step", 1, {"message": "ab"})
    after = await scrape(http, server)
    assert after["envserver_steps_total"] - before["envserver_steps_total"] == 11  # 5 x 2 sessions + 1, each once
    assert after["envserver_resets_total"] == 2
    requests = after["envserver_mux_request_seconds_count"] - before["envserver_mux_request_seconds_count"]
    seconds = after["envserver_mux_request_seconds_sum"] - before["envserver_mux_request_seconds_sum"]
    assert requests == 6  # five many-requests and one step, each observed once when its answer was ready
    assert seconds >= 6 * 0.004  # the worker-thread time is included, not just the spawn of a task


async def test_blocking_calls_past_the_connection_bound_are_refused(spawn_server, mux_connect) -> None:
    from tests.conftest import TEST_ENVS_SCRIPT

    server = spawn_server("--env", "slow_echo", "--max-blocking-per-connection", "3", script=TEST_ENVS_SCRIPT)
    mux = await mux_connect(server)
    for sid in range(1, 6):
        await mux.one("open", sid)
    async with asyncio.timeout(10):
        replies = await mux.call(*[mux.req("step", sid, {"message": "ab"}) for sid in range(1, 6)])
        refused = [r for r in replies if not r.ok]
        assert len(refused) == 2 and all(r.body["code"] == "CAPACITY_REACHED" and "limit is 3" in r.body["message"] for r in refused)
        (reply,) = await mux.call(mux.req("steps", [1, 2, 3, 4, 5], [{"message": "ab"}] * 5))
        assert reply.ok and sorted(reply.body[1]) == [3, 4]  # a many-request: the sessions past the bound fail alone
        assert all(r.ok for r in await mux.call(*[mux.req("step", sid, {"message": "x"}) for sid in (1, 2, 3)]))  # freed again
    assert server.proc.poll() is None
