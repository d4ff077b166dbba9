"""ComfyUI node classes (classic V1 API, category "fairness"): thin, parse inputs, call fair_core, format outputs.

Imported by the pack's root ``__init__.py`` with relative imports (ComfyUI has its own top-level ``nodes``
module). ComfyUI's modules (``folder_paths``, ``comfy.sd``) are imported when a node runs, so this package also
imports outside ComfyUI.
"""

from .adaptor import FairTextEncode, LoadFairAdaptor
from .audit import BiasAudit, LoadAttributeClassifier, TargetDistribution
from .folders import register_folders
from .midblock import MidBlockBypass

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "FairAdaptorLoader": LoadFairAdaptor,
    "FairTextEncode": FairTextEncode,
    "FairAttributeClassifierLoader": LoadAttributeClassifier,
    "FairTargetDistribution": TargetDistribution,
    "FairBiasAudit": BiasAudit,
    "FairMidBlockBypass": MidBlockBypass,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "FairAdaptorLoader": "Load Fair Adaptor",
    "FairTextEncode": "Fair Text Encode (positive prompt)",
    "FairAttributeClassifierLoader": "Load Attribute Classifier",
    "FairTargetDistribution": "Target Distribution",
    "FairBiasAudit": "Bias Audit",
    "FairMidBlockBypass": "Mid-Block Bypass (experimental)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_folders"]
