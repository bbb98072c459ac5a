"""The wire surfaces of envserver: how clients reach the sessions that ``server.py`` holds.

OpenEnv's HTTP routes and ``WS /ws`` (``openenv_http``, ``openenv_ws``, ``mcp``, ``openapi``),
envfleet's multiplexed ``WS /v1/mux`` with its columnar batches (``mux``, ``columns``),
``GET /metrics`` and the browser play page (``web/``). ``app.py`` mounts them all on one server;
they share the messages of ``protocol.py`` and never touch an environment except through ``env.py``.
"""
