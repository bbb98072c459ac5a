"""rollout: drive thousands of environment sessions over a fleet of envservers."""

from .client import EnvClient
from .config import FleetConfig
from .errors import (
    CapacityReached,
    EnvCrashed,
    EnvError,
    EpisodeOver,
    FleetError,
    InvalidAction,
    PoolClosed,
    RequestTimeout,
    ServerReplyError,
    Unauthorized,
    UnknownSession,
)
from .pool import EnvPool, Env, EpisodeRecord, PoolConfig, episode_seed

__version__ = "0.1.0"

__all__ = [
    "CapacityReached",
    "Env",
    "EnvClient",
    "EnvCrashed",
    "EnvError",
    "EnvPool",
    "EpisodeOver",
    "EpisodeRecord",
    "FleetConfig",
    "FleetError",
    "InvalidAction",
    "PoolClosed",
    "PoolConfig",
    "RequestTimeout",
    "ServerReplyError",
    "Unauthorized",
    "UnknownSession",
    "episode_seed",
]
