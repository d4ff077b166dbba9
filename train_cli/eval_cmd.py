"""`fair eval`: audit a model, with or without fair adaptors, over a prompt set (see fair_core.evaluation)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fair_core.evaluation import EvalSettings, generate_and_score, summarise_variants, write_csv, write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="measure bias of a model / adaptors over a prompt set")
    parser.add_argument("--model", required=True, help="diffusers directory, .safetensors checkpoint, or 'toy'")
    parser.add_argument("--adaptor", action="append", default=[], help="fair adaptor (repeat to compare several)")
    parser.add_argument("--prompts", required=True, help="prompt file or built-in set (e.g. occupations-test)")
    parser.add_argument("--classifier", required=True, help="classifier .onnx/.safetensors, or 'toy'")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default=None, help="target expression (default: uniform over all attributes)")
    parser.add_argument("--reference", default=None, help="reference distribution for amplification")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.set_defaults(func=_run)


def _load(args: argparse.Namespace):
    from fair_core.toyworld import load_toy_world

    if args.model == "toy":

        def load_parts():
            return load_toy_world(device=args.device).parts()
    else:
        from fair_core.models import load_diffusion_parts

        def load_parts():
            return load_diffusion_parts(args.model, device=args.device)
    if args.classifier == "toy":
        scorer = load_toy_world(device=args.device).eval_scorer
    else:
        from fair_core.classifiers import load_classifier
        from fair_core.faces import FaceAttributeScorer

        scorer = FaceAttributeScorer(None, load_classifier(args.classifier, device=args.device))
    return load_parts, scorer


def _soft_prompt(adaptor, families):
    import torch

    from fair_core.trainable import SoftPrompt

    if not adaptor.tokens:
        return None
    return SoftPrompt([torch.cat([t.vectors[f] for t in adaptor.tokens]) for f in families])


def _run(args: argparse.Namespace) -> int:
    from fair_core.adaptor import apply_adaptor, read_adaptor
    from fair_core.prompts import resolve_prompt_set
    from fair_core.targets import TargetDistribution

    prompts = list(resolve_prompt_set(args.prompts))
    load_parts, scorer = _load(args)
    schema = {a.name: a for a in scorer.attributes}
    target = TargetDistribution.parse(args.target, schema) if args.target else TargetDistribution.uniform(scorer.attributes)
    reference = TargetDistribution.parse(args.reference, schema) if args.reference else None
    settings = EvalSettings(args.images_per_prompt, args.steps, args.guidance, args.seed, args.batch_size, args.device)
    out = Path(args.out)
    variants = {}
    for adaptor_path in [None, *args.adaptor]:
        parts = load_parts()
        families = ("te",) if parts.text_encoder_2 is None else ("te1", "te2")
        soft_prompt = None
        name = "base" if adaptor_path is None else Path(adaptor_path).stem
        if adaptor_path is not None:
            adaptor = read_adaptor(adaptor_path, expected_base=parts.base)
            apply_adaptor(adaptor, unet=parts.unet, text_encoders=dict(zip(families, parts.text_encoders)))
            soft_prompt = _soft_prompt(adaptor, families)
        print(f"[eval] {name}: {len(prompts)} prompts x {settings.images_per_prompt} images")
        variants[name] = generate_and_score(parts, scorer, prompts, settings, out / "cache" / f"{name}.jsonl", soft_prompt)
    write_csv(out / "images.csv", variants)
    summary = summarise_variants(variants, target, reference, seed=args.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary)
    print(f"[eval] wrote {out}/summary.json and images.csv")
    return 0
