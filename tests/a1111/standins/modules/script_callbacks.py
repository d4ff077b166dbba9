"""Stand-in for ``modules/script_callbacks.py`` (A1111 1.10): ``on_ui_settings(callback, *, name=None)`` and
``on_infotext_pasted(callback, *, name=None)``, plus the two calls the web UI makes of them
(``ui_settings_callback()``, ``infotext_pasted_callback(infotext, params)``)."""

from __future__ import annotations

from typing import Callable

callbacks_ui_settings: list[Callable] = []
callbacks_infotext_pasted: list[Callable] = []


def on_ui_settings(callback: Callable, *, name: str | None = None) -> None:
    callbacks_ui_settings.append(callback)


def on_infotext_pasted(callback: Callable, *, name: str | None = None) -> None:
    callbacks_infotext_pasted.append(callback)


def ui_settings_callback() -> None:
    for callback in callbacks_ui_settings:
        callback()


def infotext_pasted_callback(infotext: str, params: dict) -> None:
    for callback in callbacks_infotext_pasted:
        callback(infotext, params)
