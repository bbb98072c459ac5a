"""examples/train_catch.py learns: a short run beats the random policy clearly."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np

import rollout.gym

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_catch.py"


def _load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_catch", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_training_run_clearly_beats_random() -> None:
    train_catch = _load_example()
    envs = rollout.gym.make_vec("openspiel", game="catch", num_envs=256, servers=2)
    try:
        log = io.StringIO()
        history = train_catch.train(envs, updates=18, horizon=20, lr=0.1, target=0.9, seed=0, log=log)
        # the policy starts uniform: its first update's episodes are the random policy's
        random_policy = history[0]
        assert -0.8 < random_policy < -0.4
        assert np.mean(history[-3:]) > random_policy + 0.6, log.getvalue()
        assert log.getvalue().count("mean return") == len(history)
    finally:
        envs.close()
