"""The play page's HTTP routes on a real server: the page, its static files, the games list."""

from __future__ import annotations

from importlib.resources import files


async def test_page_and_static_files(catch_server, http) -> None:
    async with http.get(f"{catch_server.url}/web") as response:
        assert response.status == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        page = await response.text()
    assert '<script src="/web/static/play.js" defer></script>' in page
    assert '<link rel="stylesheet" href="/web/static/play.css">' in page
    for name, kind in [("play.js", "text/javascript"), ("play.css", "text/css")]:
        async with http.get(f"{catch_server.url}/web/static/{name}") as response:
            assert response.status == 200
            assert response.headers["content-type"].startswith(kind)
            assert await response.text() == (files("envserver.web") / "static" / name).read_text()
    async with http.get(f"{catch_server.url}/web/static/nothing.js") as response:
        assert response.status == 404


async def test_page_uses_no_outside_resources(catch_server, http) -> None:
    for path in ("/web", "/web/static/play.js", "/web/static/play.css"):
        async with http.get(catch_server.url + path) as response:
            text = await response.text()
        assert "http://" not in text and "https://" not in text, path
        assert "//cdn" not in text, path


async def test_games_lists_pyspiel_games_with_default_parameters(catch_server, http) -> None:
    async with http.get(f"{catch_server.url}/web/games") as response:
        assert response.status == 200
        body = await response.json()
    assert body["env"] == "openspiel"
    assert body["defaults"] == {"game": "catch", "params": {}, "opponent": "random"}
    assert body["opponents"] == ["random", "first_legal", "last_legal"]
    games = {game["name"]: game for game in body["games"]}
    assert len(games) > 50
    assert games["catch"]["params"] == {"columns": 5, "rows": 10}
    assert games["catch"]["players"] == [1, 1]
    assert games["tic_tac_toe"]["params"] == {}
    assert games["connect_four"]["params"]["x_in_row"] == 4
    assert games["kuhn_poker"]["loadable"] is True
    assert games["misere"]["loadable"] is False and games["misere"]["params"]["game"] is None  # a nested game
    assert games["goofspiel"]["simultaneous"] is True


async def test_games_reflect_the_servers_defaults(spawn_server, http) -> None:
    server = spawn_server("--env", "openspiel", "--env-options", '{"game": "tic_tac_toe", "opponent": "first_legal"}')
    async with http.get(f"{server.url}/web/games") as response:
        body = await response.json()
    assert body["defaults"] == {"game": "tic_tac_toe", "params": {}, "opponent": "first_legal"}


async def test_games_need_the_openspiel_env(echo_server, http) -> None:
    async with http.get(f"{echo_server.url}/web/games") as response:
        assert response.status == 404
        body = await response.json()
    assert body["code"] == "NOT_FOUND"
    assert "the play page needs openspiel" in body["detail"]


async def test_no_web_turns_the_page_off(spawn_server, http) -> None:
    server = spawn_server("--env", "openspiel", "--no-web")
    for path in ("/web", "/web/games", "/web/static/play.js"):
        async with http.get(server.url + path) as response:
            assert response.status == 404, path
    async with http.get(f"{server.url}/health") as response:
        assert response.status == 200


async def test_token_from_the_page_url_reaches_its_assets(spawn_server, http) -> None:
    server = spawn_server("--env", "openspiel", "--token", "s3cret&x")
    async with http.get(f"{server.url}/web") as response:
        assert response.status == 401
    async with http.get(f"{server.url}/web", params={"token": "s3cret&x"}) as response:
        assert response.status == 200
        page = await response.text()
    assert 'src="/web/static/play.js?token=s3cret%26x"' in page
    assert 'href="/web/static/play.css?token=s3cret%26x"' in page
    async with http.get(f"{server.url}/web/static/play.js?token=s3cret%26x") as response:
        assert response.status == 200
    async with http.ws_connect(f"{server.ws_url}/web/ws?token=s3cret%26x") as ws:  # what play.js opens
        await ws.send_json({"type": "reset", "data": {"seed": 1}})
        assert (await ws.receive_json())["type"] == "observation"
