"""Stand-in for ``modules/extra_networks.py`` (A1111 1.10; Forge identical): ``ExtraNetwork``,
``ExtraNetworkParams``, ``register_extra_network``, ``parse_prompt``/``parse_prompts`` (``<name:args>`` tags are cut
out of the prompts; only the first prompt's tags count) and ``activate(p, extra_network_data)``."""

from __future__ import annotations

import re
from collections import defaultdict

extra_network_registry = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_data
        res.append(updated_prompt)
    return res, extra_data


def activate(p, extra_network_data):
    """Every registered network is activated, with an empty list when the prompt did not name it (that is how the
    built-in Lora unloads what the previous batch used)."""
    for name, extra_network in extra_network_registry.items():
        extra_network.activate(p, list(extra_network_data.get(name, [])))
