"""Stand-in for ``modules/shared.py`` (A1111 1.10): ``cmd_opts`` (``--lora-dir``), ``opts`` and ``OptionInfo``.

``Options.add_option(key, info)`` and attribute reads mirror ``modules/options.py``: a registered option reads as
its saved value, else its default; an unknown name raises ``AttributeError``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class OptionInfo:
    """``modules/options.py`` ``OptionInfo.__init__`` (the arguments a settings page needs)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh, self.category_id = onchange, section, refresh, category_id


class Options:
    """``modules/options.py`` ``Options``: ``data`` (saved values) and ``data_labels`` (registered options)."""

    def __init__(self) -> None:
        self.__dict__["data"] = {}
        self.__dict__["data_labels"] = {}

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default

    def __getattr__(self, item: str) -> Any:
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value


cmd_opts = SimpleNamespace(lora_dir="models/Lora")
opts = Options()
