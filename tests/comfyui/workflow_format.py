"""ComfyUI's two workflow formats for the example workflows: the API format the tests post to ``/prompt`` and the
UI (LiteGraph) format users drag into the editor, converted with the server's ``/object_info``.

``python tests/comfyui/workflow_format.py URL`` (a running server with the pack) writes each
``example_workflows/*.api.json`` as ``*.json`` in UI format; the tests convert the UI files back and compare.

UI format, version 0.4: ``nodes`` (id, type, pos, size, inputs = link slots, outputs, widgets_values in the node's
input order, with the frontend's extra "control_after_generate" value after a ``seed``) and ``links``
(``[id, from node, from slot, to node, to slot, type]``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_INPUTS = {"seed", "noise_seed"}
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


def _inputs(info: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, type) of a node's inputs in declaration order, required then optional."""
    spec = info["input"]
    return [(name, entry[0]) for part in ("required", "optional") for name, entry in spec.get(part, {}).items()]


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _depths(api: dict[str, Any]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(node_id: str) -> int:
        if node_id not in depth:
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((of(str(i)) for i in links), default=-1)
        return depth[node_id]

    for node_id in api:
        of(node_id)
    return depth


def api_to_ui(api: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    links: list[list[Any]] = []
    depth = _depths(api)
    rows: dict[int, int] = {}
    nodes = []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node_id in sorted(api, key=int):
        for name, kind in _inputs(object_info[api[node_id]["class_type"]]):
            value = api[node_id]["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                source_type = object_info[api[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, int(value[0]), value[1], int(node_id), name, source_type])
                outgoing.setdefault((int(value[0]), value[1]), []).append(link_id)
    for order, node_id in enumerate(sorted(api, key=lambda i: (depth[i], int(i)))):
        item, info = api[node_id], object_info[api[node_id]["class_type"]]
        slots, widgets = [], []
        for name, kind in _inputs(info):
            value = item["inputs"].get(name)
            if _is_widget(kind) and not isinstance(value, list):
                widgets.append(value)
                if name in SEED_INPUTS:
                    widgets.append("fixed")
            elif not _is_widget(kind):
                link = next((l[0] for l in links if l[3] == int(node_id) and l[4] == name), None)
                slots.append({"name": name, "type": kind, "link": link})
        outputs = [{"name": out_name, "type": out_type, "links": outgoing.get((int(node_id), slot), []),
                    "slot_index": slot} for slot, (out_type, out_name) in
                   enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        row = rows.get(depth[node_id], 0)
        rows[depth[node_id]] = row + 1
        position = [40 + 340 * depth[node_id], 40 + 260 * row]
        nodes.append({"id": int(node_id), "type": item["class_type"], "pos": position,
                      "size": [320, 220], "flags": {}, "order": order, "mode": 0, "inputs": slots, "outputs": outputs,
                      "properties": {"Node name for S&R": item["class_type"]}, "widgets_values": widgets})
    for link in links:  # the UI format names the target slot by its index among the node's link slots
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = [s["name"] for s in target["inputs"]].index(link[4])
    return {"last_node_id": max(int(i) for i in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    by_id = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                link = by_id[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        values = iter(node.get("widgets_values", []))
        for name, kind in _inputs(info):
            if _is_widget(kind) and name not in inputs:
                inputs[name] = next(values)
                if name in SEED_INPUTS:
                    next(values)  # control_after_generate
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return dict(sorted(api.items(), key=lambda item: int(item[0])))


def main(url: str) -> None:
    import harness

    info = harness.Client(url).object_info()
    for path in sorted(EXAMPLES.glob("*.api.json")):
        ui = api_to_ui(json.loads(path.read_text()), info)
        target = path.with_name(path.name.replace(".api.json", ".json"))
        target.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1])
