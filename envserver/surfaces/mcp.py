"""JSON-RPC 2.0 (MCP's tool methods) for ``POST /mcp`` and ``mcp`` frames on ``WS /ws``."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ServerError
from ..server import EnvServer, coded
from ..sessions import Session

INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


async def handle_jsonrpc(server: EnvServer, session: Session | None, payload: Any) -> dict[str, Any]:
    """Answer one JSON-RPC request; errors are JSON-RPC error objects, never exceptions."""
    if not isinstance(payload, dict) or payload.get("jsonrpc") != "2.0" or not isinstance(payload.get("method"), str):
        return _error(payload.get("id") if isinstance(payload, dict) else None, INVALID_REQUEST, "not a JSON-RPC 2.0 request")
    rid, method = payload.get("id"), payload["method"]
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        return _error(rid, INVALID_PARAMS, "params must be an object")
    env_class = type(session.env) if session is not None else server.env_class
    if method == "initialize":
        return {
            "jsonrpc": "2.0",
            "id": rid,
            "result": {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": f"envserver-{env_class.name}", "version": "0.1.0"},
            },
        }
    if method == "tools/list":
        tools = [
            {"name": name, "description": description, "inputSchema": {"type": "object"}}
            for name, description in env_class.tools.items()
        ]
        return {"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}
    if method == "tools/call":
        name, arguments = params.get("name"), params.get("arguments") or {}
        if not isinstance(name, str) or name not in env_class.tools or not isinstance(arguments, dict):
            return _error(rid, INVALID_PARAMS, f"unknown tool {name!r}; tools: {', '.join(env_class.tools) or 'none'}")
        env = session.env if session is not None else server._make_env()
        try:
            content = env.call_tool(name, arguments)
            if inspect.isawaitable(content):  # tools that do I/O (an adapted OpenEnv MCP environment's)
                content = await content
        except ServerError as exc:
            return _error(rid, INVALID_PARAMS, exc.message)
        except Exception as exc:
            return _error(rid, INTERNAL_ERROR, coded(exc).message)
        finally:
            if session is None:
                env.close()
        return {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": str(content)}], "structuredContent": content}}
    return _error(rid, METHOD_NOT_FOUND, f"method {method!r} is not offered by the {env_class.name} environment")
