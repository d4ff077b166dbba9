"""Prompt sets and stable per-image seeds.

A *prompt set* is a named, ordered tuple of prompts. It comes from a text file (one entry per line, UTF-8;
blank lines and lines starting with ``#`` are skipped) or from one of the built-in occupation lists in
``fair_core/data/prompts``. An entry is either a whole prompt or an occupation that is put into a template,
by default Shen et al.'s (ICLR 2024, §6.1)::

    A photo of the face of a {occupation}, a person

The article is always "a", even before a vowel, as in the paper's prompts.

Built-in sets (see :data:`BUILTIN_PROMPT_SETS`):

* ``occupations-test``: the paper's 50 test occupations, in the paper's order;
* ``occupations-val``: 10 common occupations (our choice; the paper's validation set is not public);
* ``occupations-train``: over 300 further occupations (our choice; the paper's 1000 are not public).

The three lists are disjoint (case-insensitively).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_TEMPLATE = "A photo of the face of a {occupation}, a person"
PLACEHOLDER = "{occupation}"

# Built-in set name -> file in fair_core/data/prompts.
BUILTIN_PROMPT_SETS: dict[str, str] = {
    "occupations-train": "occupations_train.txt",
    "occupations-val": "occupations_val.txt",
    "occupations-test": "occupations_test.txt",
}


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered tuple of prompts (each a non-empty string)."""

    name: str
    prompts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)


def parse_lines(text: str) -> list[str]:
    """The entries of a prompt file's text: stripped lines, without blank lines and ``#`` comment lines.

    Only whole lines are comments, so a ``#`` inside a prompt is kept.
    """
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def apply_template(entries: list[str], template: str | None) -> tuple[str, ...]:
    """Put each entry into ``template`` at ``{occupation}``; with ``template=None`` the entries are the prompts.

    Only ``{occupation}`` is replaced, so other braces in a template (e.g. dynamic-prompt syntax) are kept.
    """
    if template is None:
        return tuple(entries)
    if PLACEHOLDER not in template:
        raise ValueError(f"prompt template {template!r} has no {PLACEHOLDER} placeholder")
    return tuple(template.replace(PLACEHOLDER, entry) for entry in entries)


def _prompt_set(name: str, text: str, template: str | None, source: str) -> PromptSet:
    entries = parse_lines(text)
    if not entries:
        raise ValueError(f"prompt file {source} has no prompts (only blank or '#' comment lines)")
    return PromptSet(name=name, prompts=apply_template(entries, template))


def load_prompt_file(path: str | Path, template: str | None = None) -> PromptSet:
    """Read a prompt set from a UTF-8 text file; the set is named after the file's stem.

    Args:
        path: one prompt (``template=None``) or one occupation (``template`` given) per line.
        template: a string containing ``{occupation}``, into which each line is put.

    Raises:
        ValueError: the file does not exist, is not UTF-8, has no entries, or the template has no placeholder.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {err}") from None
    return _prompt_set(path.stem, text, template, str(path))


def builtin_prompt_set(name: str, template: str | None = DEFAULT_TEMPLATE) -> PromptSet:
    """One of the built-in occupation sets, each occupation put into ``template``.

    With ``template=None`` the prompts are the bare occupations. Unknown names raise ``ValueError``
    listing the known ones.
    """
    if name not in BUILTIN_PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r} (known: {', '.join(BUILTIN_PROMPT_SETS)})")
    resource = resources.files("fair_core").joinpath("data", "prompts", BUILTIN_PROMPT_SETS[name])
    return _prompt_set(name, resource.read_text(encoding="utf-8"), template, f"{name} ({resource})")


def resolve_prompt_set(spec: str, template: str | None = None) -> PromptSet:
    """A prompt set from a built-in name or a file path.

    A built-in name uses ``template``, or :data:`DEFAULT_TEMPLATE` when it is ``None``. A file's lines are
    the prompts themselves when ``template`` is ``None``, occupations put into it otherwise.
    """
    if spec in BUILTIN_PROMPT_SETS:
        return builtin_prompt_set(spec, DEFAULT_TEMPLATE if template is None else template)
    if not Path(spec).is_file():
        raise ValueError(
            f"prompt set {spec!r} is neither a built-in set ({', '.join(BUILTIN_PROMPT_SETS)}) nor an existing file"
        )
    return load_prompt_file(spec, template)


def stable_seed(*parts: str | int) -> int:
    """A seed in ``[0, 2**63)`` derived from ``parts``, the same in every run, process and machine.

    Replaces Python's ``hash()``, which is salted per process (PYTHONHASHSEED). The parts are encoded as
    compact JSON (so ``"1"`` and ``1`` differ, as do ``("ab", "c")`` and ``("a", "bc")``), hashed with
    SHA-256, and the first 8 bytes read big-endian and shifted right by one bit. Typical use: the noise
    seed of one image, ``stable_seed(prompt, image_index, base_seed)``.
    """
    if not parts:
        raise ValueError("stable_seed needs at least one part")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise TypeError(f"stable_seed parts must be str or int, got {type(part).__name__}: {part!r}")
    encoded = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return int.from_bytes(hashlib.sha256(encoded).digest()[:8], "big") >> 1
