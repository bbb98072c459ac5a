"""Routes of the play page: ``GET /web``, ``GET /web/static/...`` and ``GET /web/games``.

The page itself talks to the server only through ``WS /web/ws``, the OpenEnv session API
programs use at ``/ws`` under the page's own path (the only socket that takes ``?token=``,
since a browser cannot set a header on a WebSocket), so a person's episode is an ordinary session.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from ...errors import ServerError
from ...protocol import ErrorCode
from ...server import EnvServer
from ..openenv_http import error_response, json_response
from ..openenv_ws import ws_endpoint

STATIC = Path(__file__).parent / "static"
ASSETS = ("/web/static/play.css", "/web/static/play.js")
NO_STORE = {"cache-control": "no-cache"}


async def page(request: Request) -> Response:
    """The play page; a ``?token=`` it was opened with is passed on to its own assets."""
    text = (STATIC / "index.html").read_text(encoding="utf-8")
    token = request.query_params.get("token")
    if token:
        suffix = html.escape("?token=" + quote(token, safe=""))
        for asset in ASSETS:
            text = text.replace(f'"{asset}"', f'"{asset}{suffix}"')
    return HTMLResponse(text, headers=NO_STORE)


async def games(request: Request) -> Response:
    """The games pyspiel registers, with default parameters, and the server's own defaults."""
    server: EnvServer = request.app.state.server
    if server.config.env != "openspiel":
        return error_response(
            ServerError(ErrorCode.NOT_FOUND, f"this server serves {server.config.env!r}; the play page needs openspiel")
        )
    from ...envs.openspiel import OPPONENTS, GameConfig

    defaults = GameConfig(**{k: v for k, v in server.config.env_options.items() if k in GameConfig.__struct_fields__})
    return json_response(
        {
            "env": server.config.env,
            "defaults": {"game": defaults.game, "params": defaults.params, "opponent": defaults.opponent},
            "opponents": list(OPPONENTS),
            "games": _catalog(),
        }
    )


@functools.cache
def _catalog() -> list[dict[str, Any]]:
    # pyspiel is imported here, lazily, only on servers that already loaded it for the openspiel env.
    import pyspiel

    catalog = []
    for game_type in sorted(pyspiel.registered_games(), key=lambda t: t.short_name):
        params = {
            name: value if isinstance(value, (bool, int, float, str)) else None
            for name, value in game_type.parameter_specification.items()
        }
        catalog.append(
            {
                "name": game_type.short_name,
                "long_name": game_type.long_name,
                "params": params,
                "players": [game_type.min_num_players, game_type.max_num_players],
                "loadable": bool(game_type.default_loadable),
                "simultaneous": game_type.dynamics == pyspiel.GameType.Dynamics.SIMULTANEOUS,
            }
        )
    return catalog


def web_routes() -> list[BaseRoute]:
    """The play page's routes, for ``create_app`` to add when ``config.web`` is set."""
    return [
        Route("/web", page),
        Route("/web/games", games),
        WebSocketRoute("/web/ws", ws_endpoint),
        Mount("/web/static", StaticFiles(directory=STATIC), name="web-static"),
    ]
