"""envserver: typed environment servers speaking OpenEnv's contract and a fast multiplexed WebSocket."""

__version__ = "0.1.0"
