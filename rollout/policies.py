"""The built-in policies: observation -> action callables for environments that list their legal actions."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any


def random_legal(seed: int) -> Callable[[Any], Any]:
    """A policy that picks uniformly among ``observation.legal_actions``, reproducibly from ``seed``."""
    draw = random.Random(seed).random

    def pick(observation: Any) -> Any:
        legal = observation.legal_actions
        return legal[int(draw() * len(legal))]

    return pick


def first_legal(observation: Any) -> Any:
    """The first of ``observation.legal_actions``."""
    return observation.legal_actions[0]
