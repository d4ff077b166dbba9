"""Stand-in for ``modules/infotext_utils.py`` (A1111 1.10), written for these tests.

The contract the script relies on: an infotext is ``prompt``, an optional ``Negative prompt: ...`` line, and a last
line of ``Key: value`` pairs separated by commas, where a value holding a comma, colon or newline is written as a
JSON string (``quote``). ``parse_generation_parameters`` reads that back; ``paste_values(paste_fields, infotext)``
is what the paste button does with a script's ``infotext_fields``: the ``on_infotext_pasted`` callbacks see the
parsed pairs first, then each component gets its key's value converted to the type of its current value
(``"False"`` is False for a checkbox, numbers come back as floats), or an unchanged ``gr.update()`` when the key is
absent or does not convert.
"""

from __future__ import annotations

import json
import re

import gradio as gr
from modules import script_callbacks

NEGATIVE = "Negative prompt:"
PAIR = re.compile(r'\s*(?P<key>[^:,"]+):\s*(?P<value>"(?:\\.|[^"\\])*"|[^,]*),?')


def quote(text):
    return json.dumps(text, ensure_ascii=False) if any(c in str(text) for c in ",:\n") else text


def _pairs(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value"`` -> {key: value}; empty unless the whole line is such pairs."""
    pairs, position = {}, 0
    while position < len(line):
        match = PAIR.match(line, position)
        if match is None or match.end() == position:
            return {}
        value = match["value"].strip()
        pairs[match["key"].strip()] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return pairs


def parse_generation_parameters(text: str) -> dict:
    lines = text.strip().split("\n")
    parameters = _pairs(lines[-1]) if len(lines) > 1 else {}
    body = lines[:-1] if parameters else lines
    negative_at = next((i for i, line in enumerate(body) if line.startswith(NEGATIVE)), len(body))
    negative = "\n".join(body[negative_at:])[len(NEGATIVE):].strip() if negative_at < len(body) else ""
    return {**parameters, "Prompt": "\n".join(body[:negative_at]), "Negative prompt": negative}


def _converted(value: str, current):
    if isinstance(current, bool):
        return value != "False"
    if isinstance(current, (int, float)):
        return float(value)
    return type(current)(value) if current is not None else value


def paste_values(paste_fields, infotext: str) -> list:
    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    updates = []
    for component, key in paste_fields:
        value = key(params) if callable(key) else params.get(key)
        try:
            updates.append(gr.update() if value is None else gr.update(value=_converted(value, component.value)))
        except (TypeError, ValueError):
            updates.append(gr.update())
    return updates
