"""Export a torch classifier to the ONNX file of DESIGN §3.2 and check it against torch.

The legacy TorchScript exporter (``dynamo=False``) is used: it needs nothing beyond torch and onnx
(the dynamo exporter needs onnxscript). The batch axis is dynamic; the metadata is copied from the
torch classifier's spec; the parity check runs the written file through our own
:class:`~fair_core.classifiers.runtime.OnnxClassifier` on the CPU provider.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from fair_core.classifiers.model import AttributeClassifier
from fair_core.classifiers.runtime import OnnxClassifier

OPSET = 17
PARITY_TOLERANCE = 1e-4


def export_onnx(
    classifier: AttributeClassifier,
    path: str | Path,
    check: bool = True,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> float | None:
    """Write ``classifier`` as ONNX (input ``image``, output ``logits``, metadata) to ``path``.

    Returns:
        With ``check``: the largest |torch - onnxruntime| logit difference over random crops
        (batches of 1 and 3, uniform in [-1, 1]); raises ``ValueError`` above ``tolerance``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(classifier).float().cpu().eval()
    size = model.spec.input_size
    example = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            model, (example,), str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=OPSET, dynamo=False,
        )
    graph = onnx.load(str(path))
    for key, value in model.spec.to_metadata().items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return parity_error(model, path, tolerance, seed) if check else None


def parity_error(classifier: AttributeClassifier, path: str | Path, tolerance: float = PARITY_TOLERANCE, seed: int = 0) -> float:
    """Largest |torch - ONNX| logit difference on random crops; ``ValueError`` if above ``tolerance``."""
    model = copy.deepcopy(classifier).float().cpu().eval()
    runtime = OnnxClassifier(path, device="cpu")
    size = model.spec.input_size
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 3):
        crops = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(crops)
        worst = max(worst, float((runtime(crops) - expected).abs().max()))
    if worst > tolerance:
        raise ValueError(f"{path}: ONNX output differs from torch by {worst:.3g} (> {tolerance:g})")
    return worst
