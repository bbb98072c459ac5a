"""rollout: drive thousands of environment sessions over a fleet of envservers."""

from .client import EnvClient
from .commands.eval import evaluate
from .commands.summary import EvalSummary
from .config import FleetConfig
from .errors import (
    CapacityReached,
    EnvCrashed,
    EnvError,
    EpisodeOver,
    EvalError,
    FleetError,
    InvalidAction,
    PolicyFailed,
    PoolClosed,
    ProtocolError,
    RequestTimeout,
    RequestTooLarge,
    ServerReplyError,
    Unauthorized,
    UnencodableAction,
    UnknownSession,
)
from .pool import Env, EnvPool, EpisodeRecord, PoolConfig, episode_seed

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
    "EvalError",
    "EvalSummary",
    "FleetConfig",
    "FleetError",
    "InvalidAction",
    "PolicyFailed",
    "PoolClosed",
    "PoolConfig",
    "ProtocolError",
    "RequestTimeout",
    "RequestTooLarge",
    "ServerReplyError",
    "Unauthorized",
    "UnencodableAction",
    "UnknownSession",
    "episode_seed",
    "evaluate",
]
