"""Exceptions raised by the rollout client (minimal; to be merged with the full tree)."""


class EnvError(Exception):
    """Base class of every envfleet client error."""


class FleetError(EnvError):
    """A fleet backend could not start, replace or stop its servers."""
