"""The built-in policies: observation -> action callables for environments that list their legal actions."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any


def legal_actions(observation: Any) -> Any:
    """The legal actions of a typed observation, or of plain data (a plugin's generic decode, an OpenEnv server's JSON)."""
    return observation["legal_actions"] if isinstance(observation, dict) else observation.legal_actions


def random_legal(seed: int) -> Callable[[Any], Any]:
    """A policy that picks uniformly among the observation's legal actions, reproducibly from ``seed``."""
    draw = random.Random(seed).random

    def pick(observation: Any) -> Any:
        legal = legal_actions(observation)
        return legal[int(draw() * len(legal))]

    return pick


def first_legal(observation: Any) -> Any:
    """The first of the observation's legal actions."""
    return legal_actions(observation)[0]
