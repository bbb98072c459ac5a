"""The one place where blocking work leaves the event loop."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from collections.abc import Callable

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_background: set[asyncio.Future[Any]] = set()  # cleanups nobody awaits; the server waits for them at shutdown


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="envserver-blocking")
    return _executor


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a worker thread and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), functools.partial(fn, *args, **kwargs))


def run_in_background(fn: Callable[..., Any], *args: Any) -> None:
    """Run blocking ``fn`` in a worker thread without waiting for it (e.g. reaping a killed process).

    Called off a loop, it runs ``fn`` right away. The server awaits what is still running at
    shutdown (``finish_background``), so no cleanup is lost when the loop ends.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        fn(*args)
        return
    future = loop.run_in_executor(_pool(), functools.partial(fn, *args))
    _background.add(future)
    future.add_done_callback(_background.discard)


async def finish_background(timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the cleanups ``run_in_background`` started on this loop."""
    loop = asyncio.get_running_loop()
    pending = [future for future in _background if future.get_loop() is loop]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def shutdown() -> None:
    global _executor
    if _executor is not None:
        _executor.shutdown(wait=False, cancel_futures=True)
        _executor = None
