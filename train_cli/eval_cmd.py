"""`fair eval`: audit a model, with or without fair adaptors, or folders of images, over a prompt set
(see fair_core.evaluation and fair_core.eval_report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fair_core.terminal import escape


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure bias of a model / adaptors / image folders over a prompt set",
        description="Variants: the base model (--model), the base model with each --adaptor, and each --images "
                    "folder (one subfolder per prompt). All generated variants use the same seeds; every variant "
                    "is compared with the first on the same image indices.",
    )
    parser.add_argument("--model", default=None, help="diffusers directory, .safetensors checkpoint, or 'toy'")
    parser.add_argument("--adaptor", action="append", default=[], help="fair adaptor (repeat to compare several)")
    parser.add_argument("--images", action="append", default=[], help="folder of generated images, one subfolder per prompt (repeatable)")
    parser.add_argument("--prompts", default=None, help="prompt file or built-in set (e.g. occupations-test); needed with --model")
    parser.add_argument("--classifier", required=True, help="classifier .onnx/.safetensors, or 'toy'")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default=None, help="target expression (default: uniform over every attribute)")
    parser.add_argument("--reference", default=None, help="reference (training data) distribution for amplification")
    parser.add_argument("--out", required=True, help="report folder; rerunning into it resumes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grid-images", type=int, default=8, help="images per prompt in the paired grids")
    parser.add_argument("--prompt-encoding", choices=["auto", "host", "paper"], default="auto",
                        help="tokenise prompts as the hosts do (77 tokens) or as Shen et al.'s code (short, masked); "
                             "auto: as the adaptors were trained (host without adaptors)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fair_core.adaptor import apply_adaptor_to_parts, read_adaptor
    from fair_core.audit import score_image_folder
    from fair_core.classifiers.metadata import file_identity
    from fair_core.eval_report import write_paired_grids, write_report
    from fair_core.evaluation import (EvalSettings, check_cache_settings, choose_prompt_encoding, generate_and_score,
                                      summarise_variants, thumbnail_saver, write_csv)
    from fair_core.prompts import resolve_prompt_set
    from fair_core.resolve import resolve_model_loader, resolve_scorer, resolve_target

    if args.model is None and not args.images:
        raise ValueError("give --model (to generate) and/or --images DIR (already generated images)")
    if args.adaptor and args.model is None:
        raise ValueError("--adaptor needs --model (the base model it applies to)")
    if args.model is not None and args.prompts is None:
        raise ValueError("--model needs --prompts (a prompt file or a built-in set such as occupations-test)")
    if args.images_per_prompt < 1 or args.batch_size < 1:
        raise ValueError("--images-per-prompt and --batch-size must be at least 1")
    prompts = list(resolve_prompt_set(args.prompts)) if args.prompts else []
    resolved = resolve_scorer(args.classifier, args.device)
    target = resolve_target(args.target, resolved.attributes, "--target")
    reference = resolve_target(args.reference, resolved.attributes, "--reference") if args.reference else None
    load_parts = resolve_model_loader(args.model, device=args.device) if args.model is not None else None
    settings = EvalSettings(args.images_per_prompt, args.steps, args.guidance, args.seed, args.batch_size, args.device,
                            args.grid_images, choose_prompt_encoding(args.prompt_encoding, args.adaptor))
    out = Path(args.out)
    variants: dict[str, list[dict]] = {}
    notes = [f"classifier: {resolved.identity['classifier']}; seed {args.seed}"]
    if load_parts is not None:
        notes.append(f"model: {args.model}; {len(prompts)} prompts x {args.images_per_prompt} images, "
                     f"{args.steps} steps, guidance {args.guidance}, prompt encoding {settings.prompt_encoding}")
        for adaptor_path in [None, *args.adaptor]:
            parts = load_parts()
            parts.prompt_encoding = settings.prompt_encoding
            name, identity = "base", {"model": args.model, **resolved.identity}
            if adaptor_path is not None:
                apply_adaptor_to_parts(read_adaptor(adaptor_path, expected_base=parts.base), parts)
                name = Path(adaptor_path).stem
                identity["adaptor_sha256"] = file_identity(adaptor_path)["sha256"]
            if name in variants:
                raise ValueError(f"two variants named {name!r}: rename one adaptor file")
            cache = out / "cache" / f"{name}.jsonl"
            check_cache_settings(cache, settings.fingerprint(identity))
            saver = thumbnail_saver(out / "images" / name, settings.grid_images)
            variants[name] = generate_and_score(parts, resolved.scorer, prompts, settings, cache, saver, f"eval {name}")
    for folder in args.images:
        name = Path(folder).resolve().name
        if name in variants:
            raise ValueError(f"two variants named {name!r}: rename one image folder")
        saver = thumbnail_saver(out / "images" / name, settings.grid_images)
        records, report = score_image_folder(folder, resolved.scorer, resolved.input_size, args.batch_size,
                                             args.device, saver)
        for line in report.lines():
            print(escape(f"[eval] {name}: {line}"))
        notes += [f"{name}: {line}" for line in report.lines()]
        if not records:
            raise ValueError(f"{folder}: no readable images")
        variants[name] = records
    write_csv(out / "images.csv", variants)
    summary = summarise_variants(variants, target, reference, seed=args.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    all_prompts = list(dict.fromkeys(r["prompt"] for records in variants.values() for r in records))
    grids = write_paired_grids(out, list(variants), all_prompts)
    report = write_report(out, summary, grids, notes)
    print(_headline(summary))
    print(f"[eval] wrote {report}, summary.json, images.csv, grids/")
    return 0


def _headline(summary: dict) -> str:
    """Per variant and group: the distance to the target first (what the user asked for), then Shen et al.'s bias
    (the distance from uniform), with 95% intervals; variants without faces say so."""
    lines = ["distance to target | bias (mean over prompts, 95% interval):"]
    for variant, s in summary["summaries"].items():
        overall, variant = s["overall"], escape(variant)  # variant names come from folder and file names
        if not overall["num_faces"]:
            lines.append(f"  {variant:>20}  no faces in {overall['num_images']} images: no bias figures")
            continue
        for group, g in overall["groups"].items():
            lines.append(f"  {variant:>20}  {escape(group)}: {_figure(g['distance'])} | {_figure(g['bias'])}")
    return "\n".join(lines)


def _figure(figure: dict) -> str:
    if figure.get("estimate") is None:
        return "-"
    return f"{figure['estimate']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"
