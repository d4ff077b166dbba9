"""Stand-in for ``modules/scripts.py`` (A1111 1.10), written for these tests.

Mirrors what a script meets: ``AlwaysVisible``, ``PostprocessBatchListArgs(images)``, ``OnComponent(component)``,
the ``Script`` base class (``infotext_fields``, ``paste_field_names``, ``on_after_component(callback, *, elem_id)``,
``elem_id(item_id)`` and no-op hooks with the upstream signatures) and a ``ScriptRunner`` that builds a script's UI
(``args_from``/``args_to`` into one list of inputs, the collected ``infotext_fields``), calls ``after_component``
callbacks by ``elem_id`` and calls each hook with the script's slice of ``p.script_args``: ``process(p, *args)``,
``before_process_batch``/``process_batch``/``postprocess_batch_list(p, [pp,] *args, **kwargs)``,
``postprocess(p, processed, *args)`` and Forge's ``process_before_every_sampling(p, *args, **kwargs)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

AlwaysVisible = object()


@dataclass
class PostprocessBatchListArgs:
    images: list


@dataclass
class OnComponent:
    component: Any


class Script:
    args_from = args_to = None
    is_txt2img = is_img2img = False
    tabname = None
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        return []

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def on_after_component(self, callback, *, elem_id):
        self.__dict__.setdefault("after_component_callbacks", []).append((elem_id, callback))

    def elem_id(self, item_id):
        """A page-unique id: tab, title and item (the exact upstream spelling does not matter here)."""
        return f"script_{self.tabname}_{re.sub(r'[^a-z0-9]+', '_', self.title().lower())}_{item_id}"


class ScriptRunner:
    def __init__(self):
        self.alwayson_scripts: list[Script] = []
        self.inputs: list = [None]  # slot 0 belongs to the script dropdown in the real UI
        self.infotext_fields: list = []
        self.paste_field_names: list = []
        self.after_component_callbacks: dict[str, list] = {}

    def initialize_script(self, script, is_img2img):
        script.is_img2img, script.is_txt2img = is_img2img, not is_img2img
        script.tabname = "img2img" if is_img2img else "txt2img"
        if script.show(is_img2img) is AlwaysVisible:
            self.alwayson_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        self.inputs.extend(script.ui(script.is_img2img))
        script.args_to = len(self.inputs)
        self.infotext_fields.extend(script.infotext_fields or [])
        self.paste_field_names.extend(script.paste_field_names or [])
        for elem_id, callback in getattr(script, "after_component_callbacks", []):
            self.after_component_callbacks.setdefault(elem_id, []).append(callback)

    def after_component(self, component, **kwargs):
        for callback in self.after_component_callbacks.get(component.elem_id, []):
            callback(OnComponent(component))

    def _each(self, hook: str, p, *before, **kwargs):
        for script in self.alwayson_scripts:
            getattr(script, hook)(p, *before, *p.script_args[script.args_from:script.args_to], **kwargs)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._each("postprocess_batch_list", p, pp, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
