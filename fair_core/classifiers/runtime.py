"""onnxruntime sessions for classifier files: the fast path the UIs and ``fair eval`` use.

Works with either ``onnxruntime`` or ``onnxruntime-gpu`` installed (never both: they share the
``onnxruntime`` module). The execution provider is chosen explicitly: CUDA when the installed build
offers it (and ``device`` allows it), CPU otherwise. onnxruntime-gpu without usable CUDA libraries
falls back to CPU with only a log line, so the provider actually running is read back from the
session and reported as :attr:`OnnxClassifier.provider`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fair_core.classifiers.metadata import ClassifierFileError, ClassifierSpec, file_identity

logger = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def select_providers(device: str = "auto") -> list[str]:
    """Providers to request: ``auto`` -> CUDA first if this onnxruntime build has it; ``cuda``/``cpu`` forced."""
    import onnxruntime as ort

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ValueError(f"device='cuda' but this onnxruntime build has no CUDA provider (available: {available}); install onnxruntime-gpu")
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def read_onnx_spec(path: str | Path) -> ClassifierSpec:
    """The :class:`ClassifierSpec` of an ONNX classifier file; files without our metadata are rejected."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends for non-ONNX files
        raise ClassifierFileError(f"{path}: not a readable ONNX file ({error})") from None
    spec = ClassifierSpec.from_metadata({p.key: p.value for p in model.metadata_props}, str(path))
    _check_signature(model, spec, path)
    return spec


def _check_signature(model, spec: ClassifierSpec, path: Path) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs[:1] != ["image"] or outputs[:1] != ["logits"]:
        raise ClassifierFileError(f"{path}: expected input 'image' and output 'logits', found inputs {inputs}, outputs {outputs}")
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].dim_value not in (0, spec.num_logits):
        raise ClassifierFileError(f"{path}: graph gives {dims[1].dim_value} logits, fair.attributes needs {spec.num_logits}")


class OnnxClassifier:
    """An ONNX classifier file as a callable ``crops (N, 3, S, S) -> logits (N, sum K_a)``.

    Args:
        path: ``.onnx`` file with DESIGN §3.2 metadata.
        device: ``auto`` (CUDA if available), ``cuda`` or ``cpu``.
        batch_size: crops per onnxruntime call; larger inputs are run in order in chunks.
        threads: intra-op threads for the CPU provider (``None``: onnxruntime's default).
    """

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 64, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.spec = read_onnx_spec(self.path)
        self.identity = file_identity(self.path)
        self.batch_size = int(batch_size)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        requested = select_providers(device)
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        self.provider = self.session.get_providers()[0]
        if self.provider != requested[0]:
            logger.warning("%s: requested %s but onnxruntime runs %s", self.path.name, requested[0], self.provider)

    @property
    def attributes(self):
        return self.spec.attributes

    def __call__(self, crops: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits ``(N, sum K_a)`` float32, on the device of a tensor input (no gradient)."""
        device = crops.device if isinstance(crops, torch.Tensor) else torch.device("cpu")
        array = crops.detach().float().cpu().numpy() if isinstance(crops, torch.Tensor) else np.asarray(crops, np.float32)
        size = self.spec.input_size
        if array.ndim != 4 or array.shape[1:] != (3, size, size):
            raise ValueError(f"{self.path.name} expects crops (N, 3, {size}, {size}), got {array.shape}")
        chunks = [
            self.session.run(["logits"], {"image": np.ascontiguousarray(array[start : start + self.batch_size])})[0]
            for start in range(0, array.shape[0], self.batch_size)
        ]
        logits = np.concatenate(chunks) if chunks else np.zeros((0, self.spec.num_logits), np.float32)
        return torch.from_numpy(logits).to(device)


def torch_device(device: str) -> str:
    """The torch device for ``device``: ``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else
    (``cpu``, ``cuda``, ``cuda:1`` under multi-GPU training) as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_classifier(path: str | Path, device: str = "auto"):
    """Open a classifier file by suffix: ``.onnx`` -> :class:`OnnxClassifier` (``device``: ``auto``/``cuda``/
    ``cpu`` provider choice), ``.safetensors`` -> torch on :func:`torch_device` ``(device)``."""
    from fair_core.classifiers.model import AttributeClassifier

    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxClassifier(path, device=device)
    if path.suffix == ".safetensors":
        return AttributeClassifier.load(path, device=torch_device(device))
    raise ClassifierFileError(f"{path}: classifier files end in .onnx or .safetensors")
