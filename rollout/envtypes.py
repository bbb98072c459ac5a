"""Which types a client decodes an environment's observations and states into.

A server names its environment's types in ``/metadata`` (``module:QualName``). When the
client can import them it decodes into those very Structs. It imports only from packages
it already trusts to hold environments: ``envserver``, every package registered in the
``envfleet.envs`` entry-point group on this machine, and the package of a
``package.module:Class`` spec the caller gave; a server cannot make the client import
anything else. Otherwise, or when the local types' schema differs from the server's, the
client decodes generic data (dicts, lists) built from ``/schema``, with every tensor still
arriving as a ``Tensor``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import logging
from typing import Any, TypedDict

import aiohttp
import msgspec

from envserver.protocol import FLAT_TENSOR_SCHEMA, Metadata, Tensor, json_schema

log = logging.getLogger("rollout")


class WireTypes(msgspec.Struct, frozen=True):
    """The types replies are decoded into, and where they came from (``local`` or ``schema``)."""

    observation: Any = Any
    state: Any = Any
    source: str = "none"


async def fetch_wire_types(http: aiohttp.ClientSession, url: str, spec: str, timeout: float) -> WireTypes:
    """Read ``/metadata`` and ``/schema`` of environment ``spec`` on the server at ``url``; choose the decode types."""
    try:
        query = {"env": spec}
        metadata, schema = await asyncio.wait_for(asyncio.gather(_get(http, url + "/metadata", query), _get(http, url + "/schema", query)), timeout)
        metadata = msgspec.convert(metadata, Metadata)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, msgspec.MsgspecError) as exc:
        log.warning("%s: cannot read its schema (%r); decoding replies as plain data", url, exc)
        return WireTypes()
    return wire_types(metadata, schema, spec)


def wire_types(metadata: Metadata, schema: Any, spec: str) -> WireTypes:
    """The environment's own Structs if importable and matching ``schema``, else generic types from ``schema``."""
    schema = schema if isinstance(schema, dict) else {}
    local = (_import_type(metadata.observation_type, spec), _import_type(metadata.state_type, spec))
    if all(local) and [json_schema(t) for t in local] == [schema.get("observation"), schema.get("state")]:
        return WireTypes(local[0], local[1], "local")
    if all(local):
        log.warning("%s: the local types differ from the server's schema (version skew?); decoding generic data", metadata.env_class)
    return WireTypes(generic_type(schema.get("observation")), generic_type(schema.get("state")), "schema")


def trusted_packages(spec: str) -> set[str]:
    """Top-level packages whose modules the client may import to find wire types."""
    packages = {"envserver", *_registered_packages()}
    if ":" in spec:
        packages.add(spec.removeprefix("openenv:").split(":", 1)[0].split(".", 1)[0])
    return packages


@functools.cache
def _registered_packages() -> frozenset[str]:
    """Top-level packages of the environments installed here (read once: a scan costs ~30 ms)."""
    return frozenset(point.value.split(":", 1)[0].split(".", 1)[0] for point in importlib.metadata.entry_points(group="envfleet.envs"))


def _import_type(path: str | None, spec: str) -> type | None:
    if not path or ":" not in path:
        return None
    module_name, _, qualname = path.partition(":")
    if module_name.split(".", 1)[0] not in trusted_packages(spec):
        return None
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception as exc:  # not installed here, or broken: decode generically instead
        log.info("cannot import %s (%r); decoding generic data", path, exc)
        return None
    return target if isinstance(target, type) and issubclass(target, msgspec.Struct) else None


async def _get(http: aiohttp.ClientSession, url: str, query: dict[str, str]) -> Any:
    async with http.get(url, params=query) as response:
        response.raise_for_status()
        return msgspec.json.decode(await response.read())


def generic_type(schema: Any) -> Any:
    """A msgspec type for ``schema``: plain dicts and lists, ``Tensor`` where the schema has a tensor.

    Parts without tensors decode as ``Any`` (no per-field cost); objects holding tensors become
    ``TypedDict`` types, so msgspec builds the ``Tensor`` values in the same decode call.
    """
    if not isinstance(schema, dict):
        return Any
    defs = schema.get("$defs", {}) if isinstance(schema.get("$defs"), dict) else {}
    return _Builder(defs).type_of(schema, frozenset())


class _Builder:
    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.made: dict[str, Any] = {}

    def type_of(self, node: Any, seen: frozenset[str]) -> Any:
        if not isinstance(node, dict):
            return Any
        if node == FLAT_TENSOR_SCHEMA:
            return Tensor
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name in seen or name not in self.defs:  # a recursive type: leave it generic
                return Any
            if name not in self.made:
                self.made[name] = self.type_of(self.defs[name], seen | {name})
            return self.made[name]
        options = node.get("anyOf")
        if isinstance(options, list):
            kinds = [self.type_of(option, seen) for option in options if option != {"type": "null"}]
            if len(kinds) == 1 and kinds[0] is not Any:
                return kinds[0] | None if len(options) == 2 else kinds[0]
            return Any
        kind = node.get("type")
        if kind == "array" and "prefixItems" not in node:
            item = self.type_of(node.get("items"), seen)
            return Any if item is Any else list[item]  # type: ignore[valid-type]
        if kind == "object":
            properties = node.get("properties")
            if isinstance(properties, dict) and properties:
                fields = {key: self.type_of(value, seen) for key, value in properties.items()}
                if all(value is Any for value in fields.values()):
                    return Any
                return TypedDict(str(node.get("title", "Generic")), fields, total=False)  # type: ignore[operator]
            values = self.type_of(node.get("additionalProperties"), seen)
            return Any if values is Any else dict[str, values]  # type: ignore[valid-type]
        return Any
