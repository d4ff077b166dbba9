"""ComfyUI node classes (thin: parse inputs, call fair_core, format outputs)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
