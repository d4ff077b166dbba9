"""Stand-in for ``modules/ui_components.py`` (A1111 1.10): ``FormRow``, ``ToolButton`` and ``InputAccordion``.

``InputAccordion(value=None, **kwargs)`` mirrors ``InputAccordionImpl``: a hidden ``gr.Checkbox`` whose value is the
input, and a ``gr.Accordion`` (open when the value is True) that ``with`` enters.
"""

from __future__ import annotations

import gradio as gr


class FormRow(gr.Row):
    pass


class ToolButton(gr.Button):
    pass


class InputAccordionImpl(gr.Checkbox):
    def __init__(self, value=None, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or "input-accordion-0"
        super().__init__(value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=value, elem_id=self.accordion_id)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)


def InputAccordion(value=None, **kwargs):
    return InputAccordionImpl(value=value, **kwargs)
