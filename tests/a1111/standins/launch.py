"""Stand-in for A1111's ``launch`` module (``modules/launch_utils.py`` re-exported, 1.10): ``is_installed(package)``
(is a distribution of that name installed) and ``run_pip(command, desc=None, live=...)``, here recording the
commands instead of running pip."""

from __future__ import annotations

import importlib.metadata

installed: set[str] | None = None
"""Distributions to report as installed (stand-in only); None: ask importlib.metadata."""
pip_commands: list[str] = []


def is_installed(package):
    if installed is not None:
        return package.lower() in installed
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_pip(command, desc=None, live=False):
    pip_commands.append(command)
    return ""
