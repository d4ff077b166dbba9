"""`fair adaptor`: inspect fair-adaptor files, convert the paper's released checkpoints.

    fair adaptor inspect FILE [--base sd15|sdxl] [--json]
    fair adaptor convert-paper SRC... -o OUT [--base sd15] [--token-name NAME] [--target EXPR] [--name NAME]

An invalid file is reported as one line ``error: <reason>`` with exit code 2 (by train_cli.main).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fair_core.adaptor import BASES, FairAdaptor, SoftTokens, convert_paper_checkpoints, read_adaptor, save_adaptor
from fair_core.targets import TargetDistribution

_MAX_VALUE_CHARS = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adaptor", help="inspect fair-adaptor files; convert the paper's checkpoints")
    actions = parser.add_subparsers(dest="adaptor_command", metavar="ACTION", required=True)

    inspect = actions.add_parser("inspect", help="validate a fair-adaptor .safetensors file and describe it")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--base", choices=BASES, help="fail unless the adaptor is for this base model")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(func=_inspect)

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
    convert.set_defaults(func=_convert)


def _inspect(args: argparse.Namespace) -> int:
    adaptor = read_adaptor(args.file, expected_base=args.base)
    summary = adaptor.summary()
    print(json.dumps(summary, indent=2) if args.json else _describe(args.file, adaptor, summary))
    return 0


def _convert(args: argparse.Namespace) -> int:
    target = TargetDistribution.load(args.target) if args.target else None
    adaptor = convert_paper_checkpoints(
        args.sources, name=args.name or args.output.stem, token_name=args.token_name, target=target
    )
    save_adaptor(adaptor, args.output)
    print(f"wrote {args.output}: {_modules_line(adaptor)}; tokens: {_tokens_line(adaptor) or 'none'}")
    return 0


def _describe(path: Path, adaptor: FairAdaptor, summary: dict) -> str:
    metadata = adaptor.metadata
    attributes = "; ".join(f"{a.name} ({', '.join(a.classes)})" for a in metadata.attributes)
    target = metadata.target.describe().replace("\n", "; ") if metadata.target is not None else ""
    classifier = metadata.classifier
    classifier_text = f"{classifier['name']} (sha256 {classifier['sha256'][:12]})" if classifier else ""
    lines = [
        f"file:        {path}",
        f"name:        {metadata.name or '-'}",
        f"base model:  {metadata.base_model or 'unknown'}",
        f"rank:        {_joined(summary['ranks'])} (alpha {_joined(summary['alphas'])})",
        f"modules:     {_modules_line(adaptor)}",
        f"tokens:      {_tokens_line(adaptor) or 'none'}",
        f"attributes:  {attributes or '-'}",
        f"target:      {target or '-'}",
        f"classifier:  {classifier_text or '-'}",
        "metadata:",
    ]
    for key, value in sorted(adaptor.header.items()):
        shown = value if len(value) <= _MAX_VALUE_CHARS else value[:_MAX_VALUE_CHARS] + "..."
        lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def _modules_line(adaptor: FairAdaptor) -> str:
    return ", ".join(f"{family} {count}" for family, count in adaptor.family_counts().items()) or "no LoRA"


def _tokens_line(adaptor: FairAdaptor) -> str:
    def widths(tokens: SoftTokens) -> str:
        return ", ".join(f"{family} width {vectors.shape[1]}" for family, vectors in tokens.vectors.items())

    return ", ".join(f"{t.name} ({t.num_vectors} vectors; {widths(t)})" for t in adaptor.tokens)


def _joined(values: list) -> str:
    return ", ".join(f"{v:g}" for v in values) or "-"
