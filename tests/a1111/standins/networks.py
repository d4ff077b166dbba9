"""Stand-in for the built-in Lora's ``networks.py`` (A1111 1.10 ``extensions-builtin/Lora``; with ``FORGE = True``
Forge's ``sd_forge_lora``), written for these tests. The contract the script relies on:

* ``available_networks`` (file name -> ``NetworkOnDisk``) and ``available_network_aliases`` (file names and the
  aliases no two files share -> ``NetworkOnDisk``); ``list_available_networks()`` rescans ``--lora-dir`` only,
  forgetting entries added by hand.
* ``load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None)``: each name is found by file name,
  else by alias (a miss rescans once); found files become ``loaded_networks``. A1111 keeps a file's
  ``bundle_emb.<token>.*`` tensors as ``bundle_embeddings`` (registered as embeddings while the LoRA is active).
  Forge reads LoRA keys only: other keys are unmatched, and a file with more than 12 of them is dropped whole, with
  its console line (recorded in ``dropped``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from safetensors import safe_open

import network
from modules import shared

FORGE = False
FORGE_MAX_UNMATCHED = 12
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
available_networks: dict = {}
available_network_aliases: dict = {}
loaded_networks: list = []
dropped: list = []
"""Forge only: ``(file, unmatched key count)`` of each LoRA it refused (stand-in only)."""


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = Path(shared.cmd_opts.lora_dir)
    folder.mkdir(parents=True, exist_ok=True)
    found = [network.NetworkOnDisk(path.stem, str(path)) for path in sorted(folder.rglob("*.safetensors"))]
    shared_aliases = {alias for alias, count in Counter(entry.alias for entry in found).items() if count > 1}
    for entry in found:
        available_networks[entry.name] = available_network_aliases[entry.name] = entry
        if entry.alias not in shared_aliases:
            available_network_aliases.setdefault(entry.alias, entry)


def _find(name):
    return available_networks.get(name) or available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    if any(_find(name) is None for name in names):
        list_available_networks()
    loaded_networks.clear()
    for i, name in enumerate(names):
        entry = _find(name)
        if entry is None:
            continue
        with safe_open(entry.filename, "pt") as file:
            keys = list(file.keys())
        others = [key for key in keys if not key.startswith(LORA_PREFIXES)]
        if FORGE and len(others) > FORGE_MAX_UNMATCHED:
            print(f"[LORA] LoRA version mismatch for model: {entry.filename}")
            dropped.append((entry.filename, len(others)))
            continue
        loaded = network.Network(name, entry)
        loaded.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        loaded.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        loaded.dyn_dim = dyn_dims[i] if dyn_dims else None
        if not FORGE:
            for key in others:
                if key.startswith("bundle_emb."):
                    loaded.bundle_embeddings.setdefault(key.split(".")[1], []).append(key)
        loaded_networks.append(loaded)
