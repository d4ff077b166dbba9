"""fair_core: the Fair Adaptors library (targets, alignment loss, adjusted DFT, adaptor files, metrics).

Knows torch/diffusers/peft/transformers/onnxruntime; never imports ComfyUI, A1111, gradio or the
host-facing packages (nodes/, scripts/, train_cli/).
"""

__version__ = "0.1.0"
