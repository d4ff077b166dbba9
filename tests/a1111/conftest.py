"""Drive ``scripts/fair_adaptors.py`` against the stand-ins in ``standins/`` (each names the A1111 1.10 / Forge file
it mirrors). The stand-ins are importable only inside the ``standins`` fixture, and every test gets fresh copies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

STANDINS = Path(__file__).parent / "standins"


def _forget_standins() -> None:
    """Drop every module imported from ``standins/`` (only those: a real package of the same name stays)."""
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(STANDINS)):
            del sys.modules[name]


@pytest.fixture
def standins():
    """The stand-in modules on ``sys.path`` (first), removed again afterwards."""
    _forget_standins()
    sys.path.insert(0, str(STANDINS))
    yield
    sys.path.remove(str(STANDINS))
    _forget_standins()
