"""The ``python_sandbox`` environment: agents' code in a limited interpreter, graded in another trust domain.

``env`` is the environment (the ``python_sandbox`` entry point) and ``types`` its wire types. Server side:
``interpreter`` drives one agent interpreter, ``grader`` and ``grading_process`` grade a step against
``tasks``, and ``isolation`` starts every child in namespaces (bubblewrap) or as a plain process. Child
side, never importing envserver: ``worker`` (the agent's interpreter) and ``harness`` (the grading process).
"""
