"""Stand-in for ``modules/infotext_utils.py`` (A1111 1.10): ``quote``/``unquote``, ``parse_generation_parameters``
(prompt, negative prompt and the ``Key: value`` last line) and ``paste_values``, the body of ``connect_paste``'s
``paste_func``: ``on_infotext_pasted`` callbacks, then per ``(component, key)`` the value converted to the type of the
component's current value (``"False"`` -> False for booleans), or an unchanged ``gr.update()`` when the key is
absent or the conversion fails."""

from __future__ import annotations

import json
import re

import gradio as gr
from modules import script_callbacks

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def paste_values(paste_fields, infotext: str) -> list:
    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    res = []
    for output, key in paste_fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            res.append(gr.update())
            continue
        try:
            valtype = type(output.value)
            if valtype == bool and v == "False":
                val = False
            elif valtype == int:
                val = float(v)
            else:
                val = valtype(v)
            res.append(gr.update(value=val))
        except Exception:
            res.append(gr.update())
    return res
