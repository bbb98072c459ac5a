"""The ``rollout`` subcommands, one module each, wired to the command line by ``rollout/cli.py``.

``bench``, ``eval`` (its file format in ``results``, its figures in ``summary``), ``report``, ``dashboard``,
``image`` (``rollout image build``), ``scaffold`` (``rollout env new``) and ``k8s`` (``rollout fleet
k8s-manifest``). They sit on top of the library (``EnvPool``, ``VectorPool``, the fleet backends), which
never imports them; ``rollout.evaluate`` and ``rollout.EvalSummary`` are re-exported from here.
"""
