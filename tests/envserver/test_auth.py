"""Bearer-token auth (``--token``) on every surface of a real envserver."""

from __future__ import annotations

import aiohttp
import pytest

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def token_server(shared_server):
    return shared_server("--game", "catch", "--token", TOKEN)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}])
@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/metadata"), ("GET", "/schema"), ("POST", "/reset"), ("POST", "/mcp")])
async def test_http_refused_without_the_right_token(token_server, http, headers, method: str, path: str) -> None:
    async with http.request(method, token_server.url + path, headers=headers, json={}) as r:
        assert r.status == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert (await r.json())["code"] == "UNAUTHORIZED"


async def test_http_with_bearer_token(token_server, http) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(token_server.url + "/health", headers=headers) as r:
        assert r.status == 200 and await r.json() == {"status": "healthy"}
    async with http.post(token_server.url + "/reset", headers=headers, json={"seed": 1}) as r:
        assert r.status == 200 and (await r.json())["observation"]["legal_actions"] == [0, 1, 2]


@pytest.mark.parametrize("path", ["/ws", "/v1/mux"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
async def test_websockets_refused_without_the_right_token(token_server, http, path: str, headers) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with http.ws_connect(token_server.ws_url + path, headers=headers):
            pass
    assert info.value.status in (401, 403)


async def test_websockets_with_token(token_server, http, mux_connect) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.ws_connect(token_server.ws_url + "/ws", headers=headers) as ws:
        await ws.send_json({"type": "reset"})
        assert (await ws.receive_json(timeout=10))["type"] == "observation"
    async with http.ws_connect(token_server.ws_url + f"/web/ws?token={TOKEN}") as ws:  # the play page's socket: browsers cannot set headers
        await ws.send_json({"type": "state"})
        assert (await ws.receive_json(timeout=10))["type"] == "state"
    mux = await mux_connect(token_server, headers=headers)
    await mux.one("open", 1)
    assert (await mux.one("reset", 1, 0))["observation"]["game_phase"] == "initial"


@pytest.mark.parametrize("path", ["/ws", "/v1/mux", "/health", "/metrics", "/reset"])
async def test_token_in_the_query_string_only_on_the_play_page(token_server, http, path: str) -> None:
    """``?token=`` ends up in logs and histories: only the browser play page's routes take it."""
    url = f"{path}?token={TOKEN}"
    if path in ("/ws", "/v1/mux"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(token_server.ws_url + url)
        assert info.value.status == 401
        return
    async with http.request("POST" if path == "/reset" else "GET", token_server.url + url, json={}) as r:
        assert r.status == 401 and (await r.json())["code"] == "UNAUTHORIZED"
    async with http.get(token_server.url + f"/web?token={TOKEN}") as r:
        assert r.status == 200


async def test_websocket_refusal_is_a_coded_error(token_server, http) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(token_server.ws_url + "/v1/mux")
    assert info.value.status == 401 and info.value.headers is not None
    assert info.value.headers.get("content-type") == "application/json"
