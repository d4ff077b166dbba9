"""Stand-in for the built-in Lora's ``networks.py``: A1111 1.10 ``extensions-builtin/Lora/networks.py``, or with
``FORGE = True`` Forge's ``extensions-builtin/sd_forge_lora/networks.py``.

* ``available_networks`` / ``available_network_aliases`` / ``forbidden_network_aliases`` and
  ``list_available_networks()``, which forgets everything and rescans ``shared.cmd_opts.lora_dir`` only.
* ``load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None)``: names are looked up in the
  aliases (a miss triggers a rescan); found networks go to ``loaded_networks``.
  A1111: the file's ``bundle_emb.<token>.*`` tensors become ``Network.bundle_embeddings`` (registered as
  textual-inversion embeddings while the LoRA is active). Forge (``load_lora_for_models``): keys that are not
  LoRA keys are unmatched, and with more than 12 of them the whole LoRA is dropped (``dropped``); bundled tokens
  are never read.
"""

from __future__ import annotations

import os

from safetensors import safe_open

import network
from modules import shared

FORGE = False
available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []
dropped = []
"""Forge only: ``(file, unmatched key count)`` of LoRAs ``load_lora_for_models`` refused."""


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for file in sorted(files):
            if not file.endswith(".safetensors"):
                continue
            name = os.path.splitext(file)[0]
            entry = network.NetworkOnDisk(name, os.path.join(root, file))
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry


def _lookup(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name, None)
    return available_network_aliases.get(name, None)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    loaded_networks.clear()
    networks_on_disk = [_lookup(name) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [_lookup(name) for name in names]
    for i, (network_on_disk, name) in enumerate(zip(networks_on_disk, names)):
        if network_on_disk is None:
            continue
        with safe_open(network_on_disk.filename, "pt") as file:
            keys = list(file.keys())
        if FORGE:
            unmatched = [k for k in keys if not k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))]
            if len(unmatched) > 12:
                print(f'[LORA] LoRA version mismatch for model: {network_on_disk.filename}')
                dropped.append((network_on_disk.filename, len(unmatched)))
                continue
        net = network.Network(name, network_on_disk)
        if not FORGE:
            net.bundle_embeddings = {k.split(".")[1]: k for k in keys if k.startswith("bundle_emb.")}
        net.mentioned_name = name
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)
