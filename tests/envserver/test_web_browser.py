"""The play page at /web, driven by clicks in Debian's headless Chromium against a real envserver.

Needs /usr/bin/chromium (``.ci/browser.sh`` installs it) and Playwright for Python, which is
pointed at that binary: no browser is downloaded. Without them the tests skip, except under
``CI=true``, where they fail. Screenshots land in ``artifacts/screenshots/``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


def require_browser() -> None:
    """Skip without Chromium or Playwright; under CI=true, fail instead."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium, or run .ci/browser.sh)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python (pip install -e '.[test]')")
    if not missing:
        return
    skip_or_fail("the browser tests need " + " and ".join(missing))


@pytest.fixture(scope="module")
def server_url(catch_server: Any) -> str:
    """A real ``python -m envserver`` subprocess (conftest's shared one: openspiel, web page on)."""
    return str(catch_server.url)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any, server_url: str) -> AsyncIterator[Any]:
    """The play page, loaded and with its game list filled; fails the test on any page error."""
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": 1180, "height": 1000})
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    try:
        await page.goto(f"{server_url}/web")
        await expect(page.locator("#game option[value='tic_tac_toe']")).to_be_attached()
        yield page
    finally:
        await context.close()
    assert not problems


async def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def reset(page: Any, game: str, seed: int, *, opponent: str = "random", params: str = "{}") -> None:
    from playwright.async_api import expect

    await page.select_option("#game", game)
    await page.fill("#params", params)
    await page.fill("#seed", str(seed))
    await page.select_option("#opponent", opponent)
    await page.get_by_role("button", name="Reset", exact=True).click()
    await expect(page.locator("#log li").first).to_contain_text(f"Reset: {game}")
    await expect(page.locator("body")).to_have_attribute("data-busy", "false")
    await expect(page.locator("#st-game")).to_have_text(game)


async def click_action(page: Any, button: Any, step: int) -> None:
    from playwright.async_api import expect

    await button.click()
    await expect(page.locator("#st-steps")).to_have_text(str(step))
    await expect(page.locator("body")).to_have_attribute("data-busy", "false")


def catch_move(board: str) -> str:
    """The action that moves catch's paddle (x, bottom row) towards the ball (o)."""
    rows = [row for row in board.split("\n") if row]
    ball = next(row.index("o") for row in rows if "o" in row)
    paddle = rows[-1].index("x")
    return "LEFT" if ball < paddle else "RIGHT" if ball > paddle else "STAY"


async def test_catch_played_to_the_end_by_clicking(page: Any) -> None:
    from playwright.async_api import expect

    await reset(page, "catch", seed=5)
    await expect(page.locator("#grid .cell")).to_have_count(50)  # 10 rows x 5 columns
    await expect(page.locator("#grid .ball")).to_have_count(1)
    await expect(page.locator("#st-terminal")).to_have_text("no")
    await screenshot(page, "catch_start")
    step = 0
    while (await page.locator("#st-terminal").text_content()) == "no":
        move = catch_move(await page.locator("#board").text_content())
        step += 1
        await click_action(page, page.get_by_role("button", name=move, exact=True), step)
        assert step < 20, "catch did not end"
    assert step == 9  # the ball falls from row 1 to row 10
    await expect(page.locator("#st-terminal")).to_contain_text("yes")
    await expect(page.locator("#st-reward")).to_have_text("1")  # the paddle went under the ball
    await expect(page.locator("#st-return")).to_have_text("1")
    await expect(page.locator("#log li").last).to_have_text("Episode over. Your return: 1")
    await expect(page.locator("#actions")).to_contain_text("the episode is over")
    await screenshot(page, "catch_end")


async def test_tic_tac_toe_matches_the_api_replay(page: Any, server_url: str) -> None:
    from playwright.async_api import expect

    seed = 11
    await reset(page, "tic_tac_toe", seed=seed, opponent="random")
    await expect(page.locator("#grid .cell")).to_have_count(9)
    played: list[int] = []
    while (await page.locator("#st-terminal").text_content()) == "no":
        buttons = page.locator("#actions button.action")
        button = buttons.nth((await buttons.count()) // 2)  # a fixed rule, so the game varies
        assert re.fullmatch(r"x\(\d,\d\)", await button.text_content())  # the game's own action names
        played.append(int(await button.get_attribute("data-action")))
        await click_action(page, button, len(played))
    board = await page.locator("#board").text_content()
    page_return = await page.locator("#st-return").text_content()
    page_history = (await page.locator("#st-history").text_content()).split()
    await screenshot(page, "tic_tac_toe_end")

    async with aiohttp.ClientSession() as http, http.ws_connect(f"{server_url.replace('http', 'ws', 1)}/ws") as ws:
        await ws.send_json({"type": "reset", "data": {"seed": seed, "options": {"game": "tic_tac_toe", "opponent": "random"}}})
        reply = await ws.receive_json()
        for action in played:
            assert not reply["data"]["done"]
            await ws.send_json({"type": "step", "data": {"action_id": action}})
            reply = await ws.receive_json()
        await ws.send_json({"type": "state"})
        state = (await ws.receive_json())["data"]

    assert reply["type"] == "observation" and reply["data"]["done"] is True
    observation = reply["data"]["observation"]
    assert observation["text"] == board
    assert page_return == f"{observation['returns'][0]:g}"
    assert page_history == [str(a) for a in state["history"]]


async def test_illegal_action_and_bad_input_are_shown(page: Any) -> None:
    from playwright.async_api import expect

    await reset(page, "catch", seed=1)
    error = page.locator("#error")
    await expect(error).to_be_hidden()

    await page.fill("#action-id", "99")
    await page.get_by_role("button", name="Send action").click()
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("Server error INVALID_ACTION")
    await expect(error).to_contain_text("action 99 is not legal; legal actions: [0, 1, 2]")
    await expect(page.locator("#log li.log-error")).to_contain_text("Refused (INVALID_ACTION)")
    await expect(page.locator("#st-steps")).to_have_text("0")  # nothing was played
    await screenshot(page, "illegal_action")

    await page.get_by_role("button", name="Dismiss").click()
    await expect(error).to_be_hidden()
    await click_action(page, page.get_by_role("button", name="STAY", exact=True), 1)  # the session still works

    await page.fill("#params", '{"rows": ')
    await page.get_by_role("button", name="Reset", exact=True).click()
    await expect(error).to_contain_text("the parameters must be a JSON object")

    await page.fill("#params", '{"rows": "many"}')
    await page.get_by_role("button", name="Reset", exact=True).click()
    await expect(error).to_contain_text("Server error VALIDATION_ERROR")
    await expect(error).to_contain_text("cannot load game 'catch'")


async def test_keyboard_plays_and_resets(page: Any) -> None:
    from playwright.async_api import expect

    await reset(page, "catch", seed=2)
    await page.locator("#board").click()  # focus leaves the form fields, where keys type text
    await page.keyboard.press("2")  # the second legal action: STAY
    await expect(page.locator("#st-steps")).to_have_text("1")
    await expect(page.locator("#log")).to_contain_text("You played STAY (1)")
    await expect(page.locator("#actions button").nth(1)).to_be_focused()  # focus stays on the actions
    await page.keyboard.press("Enter")
    await expect(page.locator("#st-steps")).to_have_text("2")
    await page.locator("#board").click()
    await page.keyboard.press("r")
    await expect(page.locator("#st-steps")).to_have_text("0")
    await expect(page.locator("#log li")).to_have_count(2)  # reset line + the chance move


async def test_connect_four_grid(page: Any) -> None:
    from playwright.async_api import expect

    await reset(page, "connect_four", seed=3, opponent="first_legal")
    await expect(page.locator("#grid .cell")).to_have_count(42)
    await click_action(page, page.get_by_role("button", name="x3", exact=True), 1)
    await expect(page.locator("#grid .x")).to_have_count(1)
    await expect(page.locator("#grid .o")).to_have_count(1)  # first_legal answered in column 0
    await expect(page.locator("#st-opponent")).to_have_text("0")
    await screenshot(page, "connect_four")
