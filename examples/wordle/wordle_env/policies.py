"""Policies for ``rollout eval --policy wordle_env.policies:NAME``: ``policy(observation) -> action``.

An observation arrives as a ``WordleObservation`` when this package is installed where the
policy runs, or as a plain dict when it is not; both are read the same way here.
"""

from __future__ import annotations

import random
from typing import Any

from .env import score, words


def _rows(observation: Any) -> list[tuple[str, list[str]]]:
    rows = observation["rows"] if isinstance(observation, dict) else observation.rows
    return [(row["guess"], row["marks"]) if isinstance(row, dict) else (row.guess, row.marks) for row in rows]


def first_consistent(observation: Any) -> dict[str, str]:
    """Guess the first listed word that agrees with every mark on the board."""
    rows = _rows(observation)
    for word in words():
        if all(score(guess, word) == list(marks) for guess, marks in rows):
            return {"guess": word}
    return {"guess": words()[0]}  # unreachable when the answer is in the list


def always_crane(observation: Any) -> dict[str, str]:
    """Guess 'crane' every time: the second guess on is a repeat, which earns nothing."""
    return {"guess": "crane"}


def random_word(observation: Any) -> dict[str, str]:
    """Guess a random listed word (cheap: for benchmarks of the environment, not of the policy)."""
    return {"guess": random.choice(words())}
