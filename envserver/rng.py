"""A small seeded random source (SplitMix64): cheap to seed, the same sequence everywhere.

Environments reseed on every reset; ``random.Random(seed)`` costs ~15 µs to seed with a
64-bit integer, this costs nothing, and its stream does not depend on the Python version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from operator import itemgetter

_MASK = 0xFFFFFFFFFFFFFFFF
_PROBABILITY = itemgetter(1)


class SeededRandom:
    __slots__ = ("_state",)

    def __init__(self, seed: int | None = None) -> None:
        self._state = (seed if seed is not None else _UNSEEDED.next64()) & _MASK

    def next64(self) -> int:
        self._state = z = (self._state + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        return (self.next64() >> 11) * (1.0 / 9007199254740992.0)

    def pick(self, items: Sequence[int]) -> int:
        return items[int(self.random() * len(items))]

    def weighted(self, outcomes: Sequence[tuple[int, float]]) -> int:
        """One action of ``outcomes`` ((action, probability) pairs) drawn by probability."""
        target = self.random() * sum(map(_PROBABILITY, outcomes))  # the same float sum as a generator, faster
        for action, probability in outcomes:
            target -= probability
            if target < 0:
                return action
        return outcomes[-1][0]


# Seeds of unseeded generators: one stream per process, seeded once from the OS
# (a urandom call per reset costs more than the rest of the reset).
_UNSEEDED = SeededRandom(int.from_bytes(os.urandom(8), "little"))
