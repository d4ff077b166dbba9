"""Stand-in for the gradio names the script uses (A1111 1.10 runs gradio 3.41, Forge gradio 4.x).

Mirrors the public constructor keywords of ``gradio.Dropdown``, ``Slider``, ``Checkbox``, ``HTML``, ``Button``,
``Row``, ``Column``, ``Group``, ``Accordion`` and ``gradio.update``; components nest inside ``with`` blocks like
gradio's, keep ``value``/``label``/``elem_id``, and record their ``change``/``click`` listeners so a test can fire
them. Nothing is rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_open_blocks: list["Block"] = []


@dataclass
class Listener:
    """One ``component.change(fn, inputs, outputs)`` / ``.click(...)`` registration."""

    event: str
    fn: Callable | None
    inputs: list
    outputs: list


class Block:
    """``gradio.blocks.Block``: created inside the innermost open ``with`` block, which becomes its parent."""

    def __init__(self, elem_id: str | None = None, visible: bool = True, **kwargs: Any) -> None:
        self.elem_id = elem_id
        self.visible = visible
        self.kwargs = kwargs
        self.children: list[Block] = []
        self.parent = _open_blocks[-1] if _open_blocks else None
        if self.parent is not None:
            self.parent.children.append(self)

    def __enter__(self) -> "Block":
        _open_blocks.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _open_blocks.pop()


class Row(Block):
    pass


class Column(Block):
    pass


class Group(Block):
    pass


class Accordion(Block):
    def __init__(self, label: str = "", open: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label
        self.open = open


class Component(Block):
    """``gradio.components.Component``: ``value``, ``label`` and event listeners."""

    def __init__(self, value: Any = None, label: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value = value
        self.label = label
        self.listeners: list[Listener] = []

    def change(self, fn: Callable | None = None, inputs: list | None = None, outputs: list | None = None,
               **kwargs: Any) -> None:
        self.listeners.append(Listener("change", fn, list(inputs or []), list(outputs or [])))

    def click(self, fn: Callable | None = None, inputs: list | None = None, outputs: list | None = None,
              **kwargs: Any) -> None:
        self.listeners.append(Listener("click", fn, list(inputs or []), list(outputs or [])))

    def fire(self, event: str) -> list:
        """Run this component's ``event`` listeners with their inputs' values; their results, in order."""
        return [listener.fn(*(c.value for c in listener.inputs)) for listener in self.listeners
                if listener.event == event and listener.fn is not None]


class Dropdown(Component):
    def __init__(self, choices: list | None = None, value: Any = None, **kwargs: Any) -> None:
        super().__init__(value=value, **kwargs)
        self.choices = list(choices or [])


class Slider(Component):
    def __init__(self, minimum: float = 0, maximum: float = 100, step: float | None = None, value: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(value=value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Checkbox(Component):
    pass


class HTML(Component):
    pass


class Button(Component):
    pass


class Textbox(Component):
    pass


def update(**kwargs: Any) -> dict:
    """``gradio.update``: a dict of the properties to change, tagged as an update."""
    return {"__type__": "update", **kwargs}
