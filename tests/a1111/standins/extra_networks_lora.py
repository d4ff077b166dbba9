"""Stand-in for ``extensions-builtin/Lora/extra_networks_lora.py`` (A1111 1.10; Forge's copy is the same):
``ExtraNetworkLora.activate(p, params_list)`` turns the ``<lora:name:te:unet>`` tags of the first prompt into
``networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)`` and writes "Lora hashes"."""

from __future__ import annotations

import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    remove_symbols = str.maketrans('', '', ":,")

    def __init__(self):
        super().__init__('lora')
        self.calls = []
        """Every ``load_networks`` call's arguments (stand-in only)."""

    def activate(self, p, params_list):
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te_multiplier = float(params.named.get("te", te_multiplier))
            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            unet_multiplier = float(params.named.get("unet", unet_multiplier))
            te_multipliers.append(te_multiplier)
            unet_multipliers.append(unet_multiplier)
            dyn_dims.append(None)
        self.calls.append((names, te_multipliers, unet_multipliers))
        networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)
        lora_hashes = {item.mentioned_name.translate(self.remove_symbols): item.network_on_disk.shorthash
                       for item in networks.loaded_networks if item.network_on_disk.shorthash}
        if lora_hashes:
            p.extra_generation_params["Lora hashes"] = ', '.join(f'{k}: {v}' for k, v in lora_hashes.items())

    def deactivate(self, p):
        pass
