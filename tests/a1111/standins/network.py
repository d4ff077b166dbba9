"""Stand-in for the built-in Lora's ``network.py`` (A1111 1.10 ``extensions-builtin/Lora``; Forge
``sd_forge_lora``), written for these tests: ``NetworkOnDisk(name, filename)`` (``metadata`` from the safetensors
header, ``alias`` = ``ss_output_name`` or the name, ``shorthash`` = the first 12 characters of ``sshs_model_hash``)
and ``Network(name, network_on_disk)``."""

from __future__ import annotations

from safetensors import safe_open


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename
        try:
            with safe_open(filename, "pt") as file:
                self.metadata = dict(file.metadata() or {})
        except Exception:  # the web UI lists an unreadable file with no metadata
            self.metadata = {}
        self.alias = self.metadata.get("ss_output_name", name)
        self.shorthash = self.metadata.get("sshs_model_hash", "")[:12]


class Network:
    def __init__(self, name, network_on_disk: NetworkOnDisk):
        self.name, self.network_on_disk = name, network_on_disk
        self.mentioned_name = name
        self.te_multiplier = self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.bundle_embeddings: dict[str, list[str]] = {}
