"""A Wordle-like word game for LLM agents, served by envserver.

Each episode hides one five-letter word from ``words.txt`` (chosen by the reset seed). The
agent sends ``{"guess": "crane"}``; the observation shows the board as text and the same
feedback as data. A guess that is not a listed word, or was already tried, uses a turn and
earns nothing.

Reward: 1.0 for finding the word, plus 0.02 for each position a valid new guess turns
green for the first time; invalid and repeated guesses get 0.
"""

from __future__ import annotations

import os
import random
import uuid
from functools import cache
from importlib import resources
from typing import Annotated, Any, Literal

import msgspec

from envserver.env import Environment
from envserver.errors import ServerError
from envserver.protocol import ErrorCode, StepResult

WORD_LENGTH = 5
GREEN_CREDIT = 0.02
Mark = Literal["green", "yellow", "gray"]
_SYMBOLS = {"green": "G", "yellow": "Y", "gray": "."}
_BLANK_ROW = " ".join("_" * WORD_LENGTH)


@cache
def words() -> tuple[str, ...]:
    """The word list shipped with the package, sorted."""
    text = resources.files(__package__).joinpath("words.txt").read_text()
    return tuple(sorted({line.strip() for line in text.splitlines() if line.strip()}))


def score(guess: str, answer: str) -> list[Mark]:
    """Wordle's marks: green in place, yellow elsewhere (as often as the answer has the letter), else gray."""
    marks: list[Mark] = ["gray"] * len(guess)
    unmatched: dict[str, int] = {}
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            marks[i] = "green"
        else:
            unmatched[a] = unmatched.get(a, 0) + 1
    for i, g in enumerate(guess):
        if marks[i] != "green" and unmatched.get(g, 0) > 0:
            marks[i] = "yellow"
            unmatched[g] -= 1
    return marks


class WordleAction(msgspec.Struct, forbid_unknown_fields=True):
    """One guess: a five-letter word (case is ignored)."""

    guess: Annotated[str, msgspec.Meta(max_length=64)]


class GuessRow(msgspec.Struct):
    """A scored guess on the board."""

    guess: str
    marks: list[Mark]


class WordleObservation(msgspec.Struct):
    """The board as text for a language model, plus the same feedback as data."""

    board: str
    rows: list[GuessRow]  # the valid guesses so far, scored
    last_guess: str | None = None
    valid: bool = True  # whether the last guess counted
    message: str = ""
    guesses_left: int = 6
    word_length: int = WORD_LENGTH


class WordleState(msgspec.Struct):
    episode_id: str | None
    step_count: int
    max_guesses: int
    solved: bool = False
    seed: int | None = None
    answer: str | None = None  # shown only once the episode is over


class WordleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Session options (``--env-options``)."""

    max_guesses: Annotated[int, msgspec.Meta(ge=1, le=20)] = 6


class WordleEnv(Environment[WordleAction, WordleObservation, WordleState]):
    name = "wordle"
    description = "Guess the hidden five-letter word in six tries; the board is text, the feedback also comes as data."
    Action = WordleAction
    Observation = WordleObservation
    State = WordleState

    def __init__(self, **options: Any) -> None:
        try:
            self.config = msgspec.convert(options, WordleConfig)
        except msgspec.ValidationError as exc:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"bad wordle options: {exc}") from None
        self._answer = ""
        self._rows: list[GuessRow] = []
        self._lines: list[str] = []  # the board's rows as text, each rendered once
        self._tried: set[str] = set()
        self._greens: set[int] = set()
        self._steps = 0
        self._episode_id: str | None = None
        self._seed: int | None = None
        self._over = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> StepResult[WordleObservation]:
        if options:
            raise ServerError(ErrorCode.VALIDATION_ERROR, f"wordle takes no reset options, got {sorted(options)}")
        rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        self._answer = rng.choice(words())
        self._rows, self._lines, self._tried, self._greens = [], [], set(), set()
        self._steps, self._seed, self._over = 0, seed, False
        self._episode_id = str(uuid.uuid4())
        return StepResult(self._observe(None, True, f"Guess the {WORD_LENGTH}-letter word."))

    def step(self, action: WordleAction) -> StepResult[WordleObservation]:
        if self._over:
            raise ServerError(ErrorCode.EPISODE_OVER, "the game is over: call reset")
        self._steps += 1
        guess = action.guess.strip().lower()
        reward, solved = 0.0, False
        if len(guess) != WORD_LENGTH or not guess.isascii() or not guess.isalpha():
            valid, message = False, f"{guess!r} is not a {WORD_LENGTH}-letter word; no credit."
        elif guess not in _word_set():
            valid, message = False, f"{guess!r} is not in the word list; no credit."
        elif guess in self._tried:
            valid, message = False, f"{guess!r} was already tried; no credit."
        else:
            valid = True
            self._tried.add(guess)
            marks = score(guess, self._answer)
            self._rows.append(GuessRow(guess, marks))
            self._lines.append(f"{' '.join(guess.upper())}   {' '.join(_SYMBOLS[m] for m in marks)}")
            new_greens = {i for i, mark in enumerate(marks) if mark == "green"} - self._greens
            self._greens |= new_greens
            solved = guess == self._answer
            reward = 1.0 if solved else GREEN_CREDIT * len(new_greens)
            message = "Solved!" if solved else f"{sum(m == 'green' for m in marks)} in place, {sum(m == 'yellow' for m in marks)} elsewhere."
        truncated = not solved and self._steps >= self.config.max_guesses
        self._over = solved or truncated
        if truncated:
            message += f" Out of guesses: the word was {self._answer!r}."
        return StepResult(self._observe(guess, valid, message), reward=reward, terminated=solved, truncated=truncated)

    def state(self) -> WordleState:
        solved = bool(self._rows) and self._rows[-1].guess == self._answer
        answer = self._answer if self._over and self._episode_id else None
        return WordleState(self._episode_id, self._steps, self.config.max_guesses, solved, self._seed, answer)

    def _observe(self, guess: str | None, valid: bool, message: str) -> WordleObservation:
        left = self.config.max_guesses - self._steps
        blanks = [_BLANK_ROW] * max(0, left) if not self._over else []
        board = "\n".join([*self._lines, *blanks, f"({left} guesses left; G = right place, Y = wrong place, . = not in the word)", message])
        return WordleObservation(board, list(self._rows), guess, valid, message, left)


@cache
def _word_set() -> frozenset[str]:
    return frozenset(words())
