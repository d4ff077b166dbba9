"""Drive ``scripts/fair_adaptors.py`` against the stand-ins in ``standins/`` (each names the A1111 1.10 / Forge file
it mirrors). The stand-ins are importable only inside the ``host`` fixture, and every test gets fresh copies."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

STANDINS = Path(__file__).parent / "standins"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fair_adaptors.py"
STANDIN_MODULES = ("gradio", "modules", "network", "networks", "extra_networks_lora", "backend", "launch",
                   "fair_adaptors")


def _forget_standins() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN_MODULES:
            del sys.modules[name]


@pytest.fixture
def standins():
    """The stand-in modules on ``sys.path`` (first), removed again afterwards."""
    _forget_standins()
    sys.path.insert(0, str(STANDINS))
    yield
    sys.path.remove(str(STANDINS))
    _forget_standins()


def load_script(models: Path, forge: bool):
    """Import the script as A1111's ``script_loading.load_module`` does (by file location, not registered in
    ``sys.modules``), after pointing the stand-ins' ``paths.models_path`` and ``--lora-dir`` at ``models`` and
    registering the built-in Lora; Forge's LoRA-only copies go to ``models/.cache``."""
    from modules import extra_networks, paths, shared

    import extra_networks_lora
    import networks

    paths.models_path = str(models)
    shared.cmd_opts.lora_dir = str(models / "Lora")
    networks.FORGE = forge
    networks.list_available_networks()
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    spec = importlib.util.spec_from_file_location("fair_adaptors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FORGE_CACHE = models / ".cache"
    return module
