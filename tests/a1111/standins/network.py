"""Stand-in for ``extensions-builtin/Lora/network.py`` (A1111 1.10; Forge: ``sd_forge_lora/network.py``):
``NetworkOnDisk(name, filename)`` (metadata from the safetensors header, ``alias`` = ``ss_output_name`` or the name,
``shorthash`` from ``sshs_model_hash``) and ``Network(name, network_on_disk)``."""

from __future__ import annotations

import json
import os
import struct


def read_metadata(filename):
    """``modules/sd_models.py`` ``read_metadata_from_safetensors``: the header's ``__metadata__``."""
    with open(filename, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if not 2 < length < 100 * 1024 * 1024:
            raise ValueError(f"{filename} is not a safetensors file")
        return json.loads(file.read(length)).get("__metadata__", {})


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        try:  # upstream: errors.display(e, f"reading lora {filename}") and no metadata
            self.metadata = read_metadata(filename)
        except Exception:
            self.metadata = {}
        self.alias = self.metadata.get('ss_output_name', self.name)
        self.hash = self.metadata.get('sshs_model_hash', '')
        self.shorthash = self.hash[0:12]
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"


class Network:
    def __init__(self, name, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.bundle_embeddings = {}
        self.mentioned_name = None
