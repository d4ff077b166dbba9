"""The pack's model folders in ComfyUI's ``folder_paths``, the names its dropdowns offer, and names -> files.

* ``models/fair_adaptors`` (``.safetensors``): adaptors; the adaptor dropdown also lists the fair adaptors found in
  ``models/loras`` (plain LoRAs there are left out).
* ``models/attribute_classifiers`` (``.onnx``, ``.safetensors``): classifiers; the dropdown also offers the offline
  CC0 gender/age networks (``pretrained:...``).

Both can be pointed elsewhere in ``extra_model_paths.yaml`` (keys ``fair_adaptors``, ``attribute_classifiers``).
A name from a node input only ever resolves to a file inside these folders
(:func:`fair_core.host_helpers.resolve_in_folders`).
"""

from __future__ import annotations

import os
from pathlib import Path

from fair_core.adaptor import list_adaptors
from fair_core.host_helpers import resolve_in_folders
from fair_core.resolve import PRETRAINED_CHOICES

ADAPTORS = "fair_adaptors"
CLASSIFIERS = "attribute_classifiers"
EXTENSIONS = {ADAPTORS: {".safetensors"}, CLASSIFIERS: {".onnx", ".safetensors"}}


def register_folders() -> None:
    """Add the pack's folders under ComfyUI's models directory (kept if ``extra_model_paths.yaml`` made them)."""
    import folder_paths

    for name, extensions in EXTENSIONS.items():
        path = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, path)
        else:
            folder_paths.folder_names_and_paths[name] = ([path], set(extensions))
        os.makedirs(path, exist_ok=True)


def adaptor_folders() -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths(ADAPTORS) + folder_paths.get_folder_paths("loras")


def adaptor_names() -> list[str]:
    """Fair adaptors (header says so) in the adaptor folders, then in ``loras``, as names relative to their folder."""
    names: list[str] = []
    for folder in adaptor_folders():
        headers, _problems = list_adaptors([folder], fair_only=True)
        names += [os.path.relpath(header.path, folder) for header in headers]
    return list(dict.fromkeys(names))


def adaptor_path(name: str) -> Path:
    return resolve_in_folders(name, adaptor_folders(), "adaptor")


def classifier_names() -> list[str]:
    import folder_paths

    return list(PRETRAINED_CHOICES) + folder_paths.get_filename_list(CLASSIFIERS)


def classifier_spec(name: str) -> str:
    """What :func:`fair_core.resolve.resolve_audit_scorer` takes for a dropdown name."""
    import folder_paths

    if name in PRETRAINED_CHOICES:
        return name
    return str(resolve_in_folders(name, folder_paths.get_folder_paths(CLASSIFIERS), "classifier"))
