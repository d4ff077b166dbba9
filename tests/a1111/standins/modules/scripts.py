"""Stand-in for ``modules/scripts.py`` (A1111 1.10).

* ``AlwaysVisible``, ``PostprocessBatchListArgs(images)``, ``OnComponent(component)``.
* ``Script``: the attributes and helpers the upstream base class gives (``infotext_fields``, ``paste_field_names``,
  ``on_after_component(callback, *, elem_id)``, ``elem_id(item_id)``) and its no-op hooks.
* ``ScriptRunner``: how the web UI builds a script's UI (``create_script_ui``: ``args_from``/``args_to``, collected
  ``infotext_fields``), dispatches ``after_component`` callbacks by ``elem_id``, and calls the hooks with
  ``p.script_args[args_from:args_to]``: ``process(p, *args)``, ``before_process_batch(p, *args, **kwargs)``,
  ``process_batch(p, *args, **kwargs)``, ``postprocess_batch_list(p, pp, *args, **kwargs)``, ``postprocess(p, processed, *args)``, and Forge's
  ``process_before_every_sampling(p, *args, **kwargs)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

AlwaysVisible = object()


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


@dataclass
class OnComponent:
    component: Any


class Script:
    name = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    infotext_fields = None
    paste_field_names = None
    on_after_component_elem_id = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

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
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'


class ScriptRunner:
    def __init__(self):
        self.alwayson_scripts = []
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.on_after_component_elem_id = {}

    def initialize_script(self, script, is_img2img):
        """One script of ``initialize_scripts``: tab flags, then always-on registration."""
        script.is_txt2img = not is_img2img
        script.is_img2img = is_img2img
        script.tabname = "img2img" if is_img2img else "txt2img"
        if script.show(script.is_img2img) == AlwaysVisible:
            self.alwayson_scripts.append(script)
            script.alwayson = True

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        controls = script.ui(script.is_img2img)
        script.name = script.title().lower()
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)
        for elem_id, callback in script.on_after_component_elem_id or []:
            self.on_after_component_elem_id.setdefault(elem_id, []).append((callback, script))

    def after_component(self, component, **kwargs):
        for callback, _script in self.on_after_component_elem_id.get(component.elem_id, []):
            callback(OnComponent(component=component))

    def process(self, p):
        for script in self.alwayson_scripts:
            script.process(p, *p.script_args[script.args_from:script.args_to])

    def before_process_batch(self, p, **kwargs):
        for script in self.alwayson_scripts:
            script.before_process_batch(p, *p.script_args[script.args_from:script.args_to], **kwargs)

    def process_batch(self, p, **kwargs):
        for script in self.alwayson_scripts:
            script.process_batch(p, *p.script_args[script.args_from:script.args_to], **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        for script in self.alwayson_scripts:
            script.process_before_every_sampling(p, *p.script_args[script.args_from:script.args_to], **kwargs)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        for script in self.alwayson_scripts:
            script.postprocess_batch_list(p, pp, *p.script_args[script.args_from:script.args_to], **kwargs)

    def postprocess(self, p, processed):
        for script in self.alwayson_scripts:
            script.postprocess(p, processed, *p.script_args[script.args_from:script.args_to])
