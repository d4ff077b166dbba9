"""Stand-in for the built-in Lora's ``extra_networks_lora.py`` (A1111 1.10; Forge the same), written for these
tests: ``ExtraNetworkLora.activate(p, params_list)`` reads each ``<lora:name[:te[:unet]]>`` tag (or ``te=``/``unet=``;
unet defaults to te, te to 1), calls ``networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)``
and writes the "Lora hashes" generation parameter (``name: shorthash``, ``:`` and ``,`` removed from names)."""

from __future__ import annotations

import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.calls = []
        """The ``(names, te_multipliers, unet_multipliers)`` of every activation (stand-in only)."""

    def activate(self, p, params_list):
        names, te, unet = [], [], []
        for params in params_list:
            args = params.positional
            names.append(args[0])
            te.append(float(params.named.get("te", args[1] if len(args) > 1 else 1.0)))
            unet.append(float(params.named.get("unet", args[2] if len(args) > 2 else te[-1])))
        self.calls.append((names, te, unet))
        networks.load_networks(names, te, unet, [None] * len(names))
        hashes = [f"{n.mentioned_name.replace(':', '').replace(',', '')}: {n.network_on_disk.shorthash}"
                  for n in networks.loaded_networks if n.network_on_disk.shorthash]
        if hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(hashes)

    def deactivate(self, p):
        pass
