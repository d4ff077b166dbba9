"""ComfyUI entry point of the Fair Adaptors node pack.

ComfyUI imports this package and reads the three names below. Outside ComfyUI (tests, the CLI) the
package still imports: the node classes only need ComfyUI at call time.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
