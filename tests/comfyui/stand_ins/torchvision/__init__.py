"""Import-only stand-in for torchvision in the ComfyUI test server (not a fake of our code).

ComfyUI's ``comfy/sd.py`` imports torchvision unconditionally (Stable Cascade's stage C coder and ControlNet use
``torchvision.models``), and the package index has no CPU torchvision build for torch 2.13. The SD1.5 workflows the
tests run never touch it; any attribute access raises ImportError, so a use would fail loudly, not silently.
"""


def __getattr__(name: str):
    raise ImportError(f"torchvision is an import-only stand-in in the Fair Adaptors test server (asked for {name!r})")
