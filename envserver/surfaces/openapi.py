"""The OpenAPI document of the HTTP surface, built from the protocol's msgspec types."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..env import Environment
from ..protocol import HttpResetRequest, HttpStepRequest, Metadata, OpenEnvResult, json_schemas


def openapi_document(env_class: type[Environment]) -> dict[str, Any]:  # type: ignore[type-arg]
    types = (HttpResetRequest, HttpStepRequest, OpenEnvResult, Metadata, env_class.Action, env_class.Observation, env_class.State)
    (reset, step, result, meta, _, _, state), components = json_schemas(types, "#/components/schemas/{name}")

    def op(summary: str, response: dict[str, Any], body: dict[str, Any] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": response}}}},
        }
        if body is not None:
            spec["requestBody"] = {"content": {"application/json": {"schema": body}}}
        return spec

    obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"envserver ({env_class.name})", "version": __version__, "description": env_class.description},
        "paths": {
            "/health": {"get": op("Liveness", obj)},
            "/metadata": {"get": op("Environment name and description", meta)},
            "/schema": {"get": op("JSON Schemas of action, observation and state", obj)},
            "/reset": {"post": op("Start an episode", result, reset)},
            "/step": {"post": op("Apply an action", result, step)},
            "/state": {"get": op("Episode state", state)},
            "/close": {"post": op("End the session named by X-Session-Id", obj)},
            "/mcp": {"post": op("JSON-RPC 2.0 (MCP tools)", obj, obj)},
        },
        "components": {"schemas": components},
    }
