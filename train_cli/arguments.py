"""Argument parsing shared by the ``fair`` sub-commands."""

from __future__ import annotations


def parse_int_list(text: str, option: str, meaning: str = "integers") -> list[int]:
    """``"1, 2,3"`` -> ``[1, 2, 3]`` (empty items skipped). A bad item raises ValueError naming ``option``, which
    ``fair`` prints as one line with exit code 2."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated {meaning}, got {text!r}") from None
