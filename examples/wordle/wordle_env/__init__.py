"""envfleet-wordle: a Wordle-like word game for LLM agents, as an envserver environment plugin."""

from .env import WordleAction, WordleEnv, WordleObservation, WordleState, score, words

__all__ = ["WordleAction", "WordleEnv", "WordleObservation", "WordleState", "score", "words"]
