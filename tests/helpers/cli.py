"""Running the project's commands as subprocesses of a test: always this checkout's code.

``REPO`` is the checkout the tests belong to; :func:`checkout_env` puts it first on
``PYTHONPATH`` so a subprocess (``examples/*.py``, ``python -m megatron_ext...``) imports this tree
even where another copy of the package is installed."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkout_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH`` plus ``extra``."""
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + path if path else ""))
    env.update(extra)
    return env
