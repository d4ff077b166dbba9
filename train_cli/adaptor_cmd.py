"""`fair adaptor`: inspect fair-adaptor files, convert the paper's released checkpoints.

    fair adaptor inspect FILE [--base sd15|sdxl] [--json]
    fair adaptor convert-paper SRC... -o OUT [--base sd15] [--token-name NAME] [--target EXPR] [--name NAME]

An invalid file, or one whose tensor data does not match its ``sshs_model_hash`` (corruption), is reported as one
line ``error: <reason>`` with exit code 2. Everything taken from a file (names, metadata, the file name itself) is
printed escaped (:func:`fair_core.terminal.escape`), and a closed pipe (``fair adaptor inspect X | head``) ends the
command quietly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

from fair_core.adaptor import BASES, FairAdaptor, SoftTokens, convert_paper_checkpoints, read_adaptor, save_adaptor
from fair_core.adaptor.checksum import HASH_KEY
from fair_core.adaptor.errors import AdaptorError
from fair_core.resolve import resolve_target
from fair_core.targets import DEFAULT_SCHEMA
from fair_core.terminal import escape, shown_path

_MAX_VALUE_CHARS = 100
_NO_HASH_REASON = (
    f"written without {HASH_KEY}: damage to the tensor data cannot be detected (files written by fair carry one)"
)
_NO_HASH_NOTE = f"none (note: {_NO_HASH_REASON})"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adaptor", help="inspect fair-adaptor files; convert the paper's checkpoints")
    actions = parser.add_subparsers(dest="adaptor_command", metavar="ACTION", required=True)

    inspect = actions.add_parser("inspect", help="validate a fair-adaptor .safetensors file and describe it")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--base", choices=BASES, help="fail unless the adaptor is for this base model")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(func=_one_line_errors(_inspect))

    convert = actions.add_parser(
        "convert-paper", help="convert the released .pth checkpoints of Shen et al. (2024) into one fair adaptor"
    )
    convert.add_argument(
        "sources", nargs="+", type=Path, help="text_encoder_lora*.pth, unet_lora*.pth, prefix_embedding*.pth"
    )
    convert.add_argument("-o", "--output", type=Path, required=True, help="the .safetensors file to write")
    convert.add_argument("--base", choices=("sd15",), default="sd15", help="the paper's checkpoints are for SD 1.5")
    convert.add_argument("--token-name", default="fairtoken", help="prompt word of the soft tokens")
    convert.add_argument("--target", help="what the checkpoint was trained for, e.g. 'gender=uniform' (metadata)")
    convert.add_argument("--name", help="adaptor name shown by the UIs (default: the output file's stem)")
    convert.set_defaults(func=_one_line_errors(_convert))


def _one_line_errors(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``action``; a bad file, value or OS error becomes ``error: <escaped reason>`` on stderr and exit 2."""

    @functools.wraps(action)
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except (AdaptorError, ValueError) as error:
            reason = str(error)
        except OSError as error:
            where = f"{shown_path(error.filename)}: " if error.filename is not None else ""
            reason = f"{where}{error.strerror or error}"
        print(f"error: {escape(reason)}", file=sys.stderr)
        return 2

    return run


def _inspect(args: argparse.Namespace) -> int:
    adaptor = read_adaptor(args.file, expected_base=args.base)
    summary = adaptor.summary() | {"content_hash": _hash_summary(adaptor)}
    text = json.dumps(summary, indent=2) if args.json else _describe(args.file, adaptor, summary)
    return _print(text)


def _convert(args: argparse.Namespace) -> int:
    _refuse_overwriting_inputs(args.sources, args.output)
    # the released checkpoints were trained on the paper's attributes: that schema is the classifier's here
    target = resolve_target(args.target, tuple(DEFAULT_SCHEMA.values()), "--target") if args.target else None
    adaptor = convert_paper_checkpoints(
        args.sources, name=args.name or args.output.stem, token_name=args.token_name, target=target
    )
    save_adaptor(adaptor, args.output)
    return _print(
        f"wrote {shown_path(args.output)}: {_modules_line(adaptor)}; tokens: {_tokens_line(adaptor) or 'none'}"
    )


def _refuse_overwriting_inputs(sources: list[Path], output: Path) -> None:
    """Outputs never overwrite inputs: refuse an output that is one of the sources (same path after links, or
    the same file under another name)."""
    for source in sources:
        same = output.resolve() == source.resolve()
        if not same and output.exists() and source.exists():
            same = os.path.samefile(output, source)
        if same:
            raise AdaptorError(
                f"refusing to write {shown_path(output)}: it is the input {shown_path(source)}; "
                "choose another output file (outputs never overwrite inputs)"
            )


def _print(text: str) -> int:
    """Print ``text``; when the reader has gone (``| head``), stop quietly with exit 0 instead of a traceback."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter flushes stdout again at exit
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _hash_summary(adaptor: FairAdaptor) -> dict[str, object]:
    """``content_hash`` of ``inspect --json``: the recorded hash (verified on reading), or a note that there is none."""
    recorded = adaptor.header.get(HASH_KEY)
    if recorded is None:
        return {"key": HASH_KEY, "sha256": None, "verified": False, "note": _NO_HASH_REASON}
    return {"key": HASH_KEY, "sha256": recorded, "verified": True}


def _describe(path: Path, adaptor: FairAdaptor, summary: dict) -> str:
    """The text of ``inspect``: every value that comes from the file is escaped."""
    metadata = adaptor.metadata
    attributes = "; ".join(f"{a.name} ({', '.join(a.classes)})" for a in metadata.attributes)
    target = metadata.target.describe().replace("\n", "; ") if metadata.target is not None else ""
    classifier = metadata.classifier
    classifier_text = f"{classifier['name']} (sha256 {classifier['sha256'][:12]})" if classifier else ""
    content_hash = summary["content_hash"]
    hash_text = _NO_HASH_NOTE
    if content_hash["verified"]:
        hash_text = f"sha256 {content_hash['sha256'][:12]}... ({HASH_KEY}; tensor data verified)"
    lines = [
        f"file:        {shown_path(path)}",
        f"name:        {escape(metadata.name) or '-'}",
        f"base model:  {metadata.base_model or 'unknown'}",
        f"rank:        {_joined(summary['ranks'])} (alpha {_joined(summary['alphas'])})",
        f"modules:     {_modules_line(adaptor)}",
        f"tokens:      {_tokens_line(adaptor) or 'none'}",
        f"attributes:  {escape(attributes) or '-'}",
        f"target:      {escape(target) or '-'}",
        f"classifier:  {escape(classifier_text) or '-'}",
        f"checksum:    {escape(hash_text)}",
        "metadata:",
    ]
    for key, value in sorted(adaptor.header.items()):
        shown = value if len(value) <= _MAX_VALUE_CHARS else value[:_MAX_VALUE_CHARS] + "..."
        lines.append(f"  {escape(key)}: {escape(shown)}")
    return "\n".join(lines)


def _modules_line(adaptor: FairAdaptor) -> str:
    return ", ".join(f"{family} {count}" for family, count in adaptor.family_counts().items()) or "no LoRA"


def _tokens_line(adaptor: FairAdaptor) -> str:
    def widths(tokens: SoftTokens) -> str:
        return ", ".join(f"{family} width {vectors.shape[1]}" for family, vectors in tokens.vectors.items())

    return ", ".join(f"{escape(t.name)} ({t.num_vectors} vectors; {widths(t)})" for t in adaptor.tokens)


def _joined(values: list) -> str:
    return ", ".join(f"{v:g}" for v in values) or "-"
