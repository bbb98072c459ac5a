"""The dashboard of ``rollout bench --dashboard``: its status JSON against real local servers,
and its page in Debian's headless Chromium while the real command runs.

The browser test skips without Chromium or Playwright, except under ``CI=true`` (see
``tests/envserver/test_web_browser.py``); its screenshot lands in ``artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from rollout import EnvPool
from rollout.cli import DASHBOARD_PORT, build_parser
from rollout.commands.bench import run_bench
from rollout.commands.dashboard import Dashboard, parse_metrics
from rollout.commands.eval import evaluate
from rollout.fleet.local import LocalFleet
from rollout.pool import EpisodeRecord
from rollout.telemetry import Telemetry
from tests.envserver.test_web_browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, require_browser


async def get_status(http: aiohttp.ClientSession, dashboard: Dashboard) -> dict[str, Any]:
    async with http.get(dashboard.url + "api/status") as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("application/json")
        body: dict[str, Any] = await response.json()
        return body


async def wait_for(
    http: aiohttp.ClientSession, dashboard: Dashboard, check: Callable[[dict[str, Any]], bool], timeout: float = 20.0
) -> dict[str, Any]:
    """Poll the status until ``check`` holds; fail with the last status otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        status = await get_status(http, dashboard)
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"status never satisfied the check: {status}")
        await asyncio.sleep(0.1)


def test_parse_metrics_keeps_unlabelled_samples() -> None:
    text = '# HELP a_total A.\n# TYPE a_total counter\na_total 12\nb{le="1"} 3\nc 1.5e3\n\nbad line x\n'
    assert parse_metrics(text) == {"a_total": 12.0, "c": 1500.0}


async def test_status_follows_a_running_bench(http: aiohttp.ClientSession) -> None:
    """A token-protected two-server bench: totals, rates, latency, scraped servers; closed after."""
    telemetry = Telemetry("bench")
    pool_kwargs = {"n": 8, "servers": 2, "options": {"game": "catch"}, "token": "dash-secret"}
    async with Dashboard(telemetry, port=0, interval=0.25) as dashboard:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", dashboard.url)
        bench = asyncio.create_task(run_bench(pool_kwargs, ["per-env"], 2.0, progress=None, telemetry=telemetry))
        try:
            status = await wait_for(
                http,
                dashboard,
                lambda s: s["phase"] == "per-env"
                and len(s["servers"]) == 2
                and all(v["state"] == "up" and (v["steps_per_s"] or 0) > 0 for v in s["servers"])
                and s["latency"]["p50_ms"] is not None
                and s["rates"]["steps_per_s"] > 0,
            )
            assert status["command"] == "bench" and status["pool"] == {"n": 8, "servers": 2}
            assert status["eval"] is None
            assert status["totals"]["steps"] > 0 and status["totals"]["episodes"] > 0
            assert status["latency"]["kind"] == "step" and 0 < status["latency"]["p50_ms"] <= status["latency"]["p99_ms"]
            for server in status["servers"]:  # scraped with the pool's token: the servers require it
                assert server["sessions"] == 4 and server["errors"] == 0 and server["problem"] == ""
            history = status["history"]
            assert len(history) >= 2 and history[-1]["t"] > history[0]["t"]
            assert any(point["steps_per_s"] > 0 for point in history)
            later = await wait_for(http, dashboard, lambda s: s["totals"]["steps"] > status["totals"]["steps"])
            assert len(later["history"]) >= len(history)
            report = await bench
        finally:
            bench.cancel()
            await asyncio.gather(bench, return_exceptions=True)
        final = await get_status(http, dashboard)
        assert final["totals"]["steps"] >= report.results[0].steps  # the totals include the warm-up
    with pytest.raises(aiohttp.ClientConnectionError):  # the listening socket is gone
        await get_status(http, dashboard)


async def test_status_marks_a_dead_server_down_then_replaced(http: aiohttp.ClientSession) -> None:
    telemetry = Telemetry("bench")
    async with EnvPool(n=2, servers=2, options={"game": "catch"}) as pool:
        telemetry.attach(pool)
        async with Dashboard(telemetry, port=0, interval=0.2) as dashboard:
            await wait_for(http, dashboard, lambda s: [v["state"] for v in s["servers"]] == ["up", "up"])
            victim = pool.servers[0]
            assert isinstance(pool.backend, LocalFleet)
            os.kill(pool.backend.pid(victim), signal.SIGKILL)
            status = await wait_for(
                http,
                dashboard,
                lambda s: {v["url"]: v["state"] for v in s["servers"]}.get(victim) == "replaced"
                and sum(v["state"] == "up" for v in s["servers"]) == 2,
            )
            assert len(status["servers"]) == 3 and victim not in pool.servers


async def test_status_shows_eval_progress_and_episode_times(http: aiohttp.ClientSession) -> None:
    telemetry = Telemetry("eval")
    async with Dashboard(telemetry, port=0, interval=0.1) as dashboard:
        telemetry.start_eval(total=10, done=2)  # resumed: two episodes were already recorded
        for i in range(4):
            telemetry.episode(EpisodeRecord(i, i, 1.0, 9, {"wall_time": 0.010 * (i + 1)}))
        status = await wait_for(http, dashboard, lambda s: s["latency"]["p50_ms"] is not None)
        progress = status["eval"]
        assert progress["done"] == 6 and progress["total"] == 10 and progress["fraction"] == 0.6
        assert progress["eta_s"] is not None and progress["eta_s"] > 0
        assert status["totals"] == {"steps": 36, "episodes": 4, "errors": 0}
        assert status["latency"]["kind"] == "episode" and status["latency"]["p99_ms"] == pytest.approx(40.0, rel=0.01)  # histogram buckets: within 1%
        assert status["phase"] == "eval" and status["pool"] is None and status["servers"] == []


async def test_status_follows_rollout_eval_and_its_resume(http: aiohttp.ClientSession, tmp_path: Any) -> None:
    out = str(tmp_path / "eval.jsonl")
    pool: dict[str, Any] = {"n": 4, "servers": 1, "game": "catch", "progress": None}
    telemetry = Telemetry("eval")
    async with Dashboard(telemetry, port=0, interval=0.1) as dashboard:
        await evaluate("random", 60, out=out, telemetry=telemetry, **pool)
        status = await wait_for(http, dashboard, lambda s: s["latency"]["p50_ms"] is not None)
        assert status["eval"]["done"] == status["eval"]["total"] == 60 and status["eval"]["eta_s"] == 0
        assert status["totals"]["episodes"] == 60 and status["totals"]["steps"] == 60 * 9  # catch: 9 steps
        assert status["latency"]["kind"] == "episode" and status["pool"] == {"n": 4, "servers": 1}
        await evaluate("random", 80, out=out, telemetry=telemetry, **pool)  # resumes
        status = await get_status(http, dashboard)
        assert status["eval"]["done"] == status["eval"]["total"] == 80 and status["totals"]["episodes"] == 80


def test_dashboard_flag_of_bench_and_eval() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench"]).dashboard is None
    assert parser.parse_args(["bench", "--dashboard"]).dashboard == DASHBOARD_PORT == 8765
    assert parser.parse_args(["bench", "--dashboard", "0", "--n", "2"]).dashboard == 0
    assert parser.parse_args(["eval", "--out", "x.jsonl", "--dashboard", "9000"]).dashboard == 9000


# --------------------------------------------------------------------------- in a real browser


@pytest.mark.browser
async def test_page_draws_a_live_chart_during_rollout_bench() -> None:
    require_browser()
    from playwright.async_api import async_playwright, expect

    command = [sys.executable, "-m", "rollout.cli", "bench", "--n", "16", "--servers", "1", "--seconds", "7", "--mode", "per-env"]
    proc = await asyncio.create_subprocess_exec(
        *command, "--dashboard", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        url = ""
        lines: list[str] = []
        while not url:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "rollout bench exited without printing the dashboard URL:\n" + "".join(lines)
            lines.append(line)
            match = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else ""
        drain = asyncio.create_task(proc.stderr.read())
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 1000})
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
                await page.goto(url)
                chart = page.locator("canvas#chart")
                await expect(page.locator("#servers tbody tr[data-state='up']")).to_have_count(1, timeout=20_000)
                await expect(chart).to_have_attribute("data-points", re.compile(r"^([3-9]|\d\d+)$"), timeout=20_000)
                await expect(page.locator("#phase")).to_have_text("· per-env", timeout=10_000)
                await expect(page.locator("#n-steps-rate")).to_have_text(re.compile(r"^[\d,.]+$"))
                await expect(page.locator("#n-p99")).to_have_text(re.compile(r" ms$"))
                before_points = int(await chart.get_attribute("data-points") or 0)
                before_pixels = await chart.evaluate("c => c.toDataURL()")
                await expect(chart).not_to_have_attribute("data-points", str(before_points), timeout=5_000)
                assert await chart.evaluate("c => c.toDataURL()") != before_pixels, "the chart was not redrawn"
                assert re.search(r"now [\d,.]+ steps/s", await chart.get_attribute("aria-label") or "")
                assert await page.locator("#numbers").get_attribute("aria-live") == "polite"
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(SCREENSHOTS / "dashboard_bench.png"), full_page=True)

                # Keyboard: p pauses (nothing redraws), p again resumes.
                await page.keyboard.press("p")
                await expect(page.locator("#pause")).to_have_attribute("aria-pressed", "true")
                paused_at = await chart.get_attribute("data-points")
                await page.wait_for_timeout(1_500)
                assert await chart.get_attribute("data-points") == paused_at
                await page.keyboard.press("p")
                await expect(page.locator("#pause")).to_have_attribute("aria-pressed", "false")
                await expect(chart).not_to_have_attribute("data-points", paused_at or "", timeout=5_000)
                assert not problems, problems

                assert await asyncio.wait_for(proc.wait(), 30) == 0, (await drain).decode()
                await expect(page.locator("#connection")).to_contain_text("Disconnected", timeout=10_000)
            finally:
                await browser.close()
        out = (await proc.stdout.read()).decode()
        assert "| per-env | 16 | 1 |" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
