"""Stand-in for ``modules/extra_networks.py`` (A1111 1.10; Forge the same), written for these tests.

Mirrors the names and signatures the built-in Lora and the script meet: ``ExtraNetwork(name)`` with
``activate(p, params_list)`` / ``deactivate(p)``, ``ExtraNetworkParams(items)`` (``positional`` and ``named``
``key=value`` arguments), ``register_extra_network``, ``parse_prompts(prompts)`` -> ``(prompts without their
``<network:args>`` tags, the first prompt's tags per network)`` and ``activate(p, extra_network_data)``, which calls
every registered network, with an empty list for one the prompt did not name (that is how a LoRA of the previous
batch is unloaded).
"""

from __future__ import annotations

import re

extra_network_registry: dict = {}
TAG = re.compile(r"<(?P<network>\w+):(?P<arguments>[^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = list(items or [])
        self.named = dict(item.split("=", 1) for item in self.items if "=" in item)
        self.positional = [item for item in self.items if "=" not in item]


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def _tags(prompt: str) -> dict[str, list[ExtraNetworkParams]]:
    found: dict[str, list[ExtraNetworkParams]] = {}
    for match in TAG.finditer(prompt):
        found.setdefault(match["network"], []).append(ExtraNetworkParams(match["arguments"].split(":")))
    return found


def parse_prompts(prompts):
    """The prompts with their tags cut out (the rest of the text, spaces included, stays), and the tags of the
    first prompt: A1111 applies one set of networks per batch."""
    prompts = list(prompts)
    return [TAG.sub("", prompt) for prompt in prompts], (_tags(prompts[0]) if prompts else {})


def activate(p, extra_network_data):
    for name, extra_network in extra_network_registry.items():
        extra_network.activate(p, list(extra_network_data.get(name, [])))
