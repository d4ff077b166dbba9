"""`fair demo`: the offline end-to-end toy-world demo (train a fair adaptor, show bias before/after)."""

from __future__ import annotations

import argparse
import inspect

from fair_core.toyworld.demo import DemoSettings
from fair_core.toyworld.depth_sweep import format_depth_sweep, run_depth_sweep
from train_cli.arguments import parse_int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoSettings()
    sweep_defaults = {name: p.default for name, p in inspect.signature(run_depth_sweep).parameters.items()}
    parser = subparsers.add_parser(
        "demo", help="toy world: train a fair adaptor offline and report the bias before and after",
        description="Train a fair adaptor on the built-in toy world (no downloads, CPU) and write a report folder. "
                    "`fair demo depth-sweep` instead trains denoisers of several depths and measures bias amplification.",
    )
    parser.add_argument("mode", nargs="?", choices=["run", "depth-sweep"], default="run")
    parser.add_argument("--target", default=defaults.target,
                        help="target over the toy attributes colour (red, blue) and shape (round, square, triangle), "
                             "e.g. 'colour=red:0.5,blue:0.5;shape=round:0.5,square:0.25,triangle:0.25'")
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--confidence-threshold", type=float, default=defaults.confidence_threshold,
                        help="alignment-loss confidence C: images whose assigned class is less certain get no "
                             "target (the paper's 0.8 leaves a dead zone of +-0.1 per occupation at 24 images)")
    parser.add_argument("--preservation-weight", type=float, default=defaults.preservation_weight,
                        help="weight of the colour-blind image-preservation loss (0: off)")
    parser.add_argument("--keep-weight", type=float, default=defaults.keep_weight,
                        help="weight of the loss that keeps each image's untargeted attributes (the shape, for a "
                             "colour-only target) as the base model drew them (0: off)")
    parser.add_argument("--guidance", type=float, default=defaults.guidance_scale,
                        help="classifier-free guidance scale for training and evaluation")
    parser.add_argument("--eval-images-per-prompt", type=int, default=defaults.eval_images_per_prompt)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None, help="report folder (default reports/demo or reports/depth-sweep)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); summary.json records it and the CPU's "
                             "kernel level, which both change the exact figures")
    sweep = parser.add_argument_group("depth-sweep")
    sweep.add_argument("--depths", default=",".join(map(str, sweep_defaults["depths"])),
                       help="UNet layers_per_block values to compare, comma-separated")
    sweep.add_argument("--train-steps", type=int, default=sweep_defaults["steps"],
                       help="training steps per depth; the default (~10 min on 2 cores for three depths) leaves the "
                            "models under-trained, claims about amplification need thousands")
    sweep.add_argument("--sweep-images", type=int, default=sweep_defaults["images_per_prompt"],
                       help="generated images per occupation and depth")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.mode == "depth-sweep":
        out = args.out or "reports/depth-sweep"
        depths = parse_int_list(args.depths, "--depths")
        summary = run_depth_sweep(depths=depths, steps=args.train_steps, images_per_prompt=args.sweep_images,
                                  out_dir=out, seed=args.seed)
        print(format_depth_sweep(summary))
        print(f"[depth-sweep] wrote {out}/depth_sweep.json")
        return 0
    from fair_core.toyworld.demo import run_demo

    settings = DemoSettings(
        target=args.target, iterations=args.iterations, images_per_prompt=args.images_per_prompt,
        learning_rate=args.learning_rate, confidence_threshold=args.confidence_threshold,
        preservation_weight=args.preservation_weight, keep_weight=args.keep_weight, guidance_scale=args.guidance,
        eval_images_per_prompt=args.eval_images_per_prompt, seed=args.seed, output_dir=args.out or "reports/demo",
        threads=args.threads,
    )
    run_demo(settings)
    return 0
