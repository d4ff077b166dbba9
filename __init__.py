"""ComfyUI entry point of the Fair Adaptors node pack (classic node API; no ``comfy_entrypoint``).

ComfyUI imports this folder by path (``custom_nodes/<folder>/__init__.py``), so the library ``fair_core`` beside it
is not importable until the folder is on ``sys.path``: it is appended, after ComfyUI's own entries, so ComfyUI's
top-level ``nodes`` module keeps precedence over this pack's ``nodes`` package (imported relatively below).
"""

import os
import sys

_PACK = os.path.dirname(os.path.realpath(__file__))
if _PACK not in sys.path:
    sys.path.append(_PACK)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_folders  # noqa: E402

try:
    import folder_paths  # noqa: F401  (ComfyUI's; absent when the pack is imported elsewhere)
except ImportError:
    pass
else:
    register_folders()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
