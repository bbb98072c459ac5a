"""The wordle environment passes envfleet's conformance checker and plays by Wordle's rules."""

from __future__ import annotations

import pytest

from envserver.errors import ServerError
from envserver.protocol import ErrorCode
from envserver.testing import check_environment
from wordle_env import WordleAction, WordleEnv, score, words
from wordle_env.policies import first_consistent


def test_conforms() -> None:
    report = check_environment(
        WordleEnv,
        sample_action=first_consistent,
        bad_actions=[{"guess": 5}, {"guess": "x" * 65}, {"guess": "crane", "hint": True}],
    )
    assert report.episode_ended


def test_marks_count_repeated_letters_once() -> None:
    assert score("speed", "abide") == ["gray", "gray", "yellow", "gray", "yellow"]  # one e in the answer: one yellow
    assert score("eerie", "there") == ["yellow", "gray", "yellow", "gray", "green"]
    assert score("crane", "crane") == ["green"] * 5


def test_the_seed_chooses_the_word() -> None:
    answers = set()
    for seed in range(20):
        env = WordleEnv()
        env.reset(seed=seed)
        answers.add(env._answer)
        again = WordleEnv()
        again.reset(seed=seed)
        assert again._answer == env._answer
    assert len(answers) > 10 and answers <= set(words())


def test_invalid_and_repeated_guesses_earn_nothing() -> None:
    env = WordleEnv()
    env.reset(seed=3)
    answer = env._answer
    wrong = next(w for w in words() if w != answer and w[0] == answer[0])  # earns a green
    assert env.step(WordleAction(wrong)).reward > 0
    for guess, why in ((wrong, "already tried"), ("zzzzz", "not in the word list"), ("abc", "not a 5-letter word")):
        result = env.step(WordleAction(guess))
        assert result.reward == 0.0 and not result.observation.valid and why in result.observation.message
    result = env.step(WordleAction(answer.upper()))
    assert result.reward == 1.0 and result.terminated and result.observation.message == "Solved!"
    assert env.state().answer == answer and env.state().solved
    with pytest.raises(ServerError) as info:
        env.step(WordleAction(answer))
    assert info.value.code == ErrorCode.EPISODE_OVER


def test_the_board_is_text_and_the_answer_stays_hidden() -> None:
    env = WordleEnv(max_guesses=2)
    first = env.reset(seed=1)
    assert "6" not in first.observation.board and "2 guesses left" in first.observation.board
    assert env.state().answer is None
    result = env.step(WordleAction("crane"))
    assert "C R A N E" in result.observation.board and len(result.observation.rows) == 1
    result = env.step(WordleAction("crane"))
    assert result.truncated and env._answer in result.observation.message
