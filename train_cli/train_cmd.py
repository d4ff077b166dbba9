"""`fair train`: train a fair adaptor (one process, or many through `accelerate launch`)."""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from fair_core.train_config import TrainConfig, config_help


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a fair adaptor (LoRA and/or soft tokens) with the distributional alignment loss",
        description="Train a fair adaptor. Many GPUs / machines: `accelerate launch --num_processes K -m train_cli train ...`.",
        epilog="config keys (YAML, or --set key=value):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see examples/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value parsed as YAML), repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=_run)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values = dataclasses.asdict(TrainConfig.from_yaml(args.config)) if args.config else {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(text)
    return TrainConfig.from_mapping(values)


def _run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        return 0
    from fair_core.checkpoints import check_run_folder
    from fair_core.run_setup import load_training_setup
    from fair_core.trainer import FairTrainer, make_accelerator

    check_run_folder(config.output_dir, dataclasses.asdict(config), args.resume)

    # The scorer and the preservation encoders must sit where the trainer puts the diffusion model.
    accelerator = make_accelerator(config)
    setup = load_training_setup(config, device=str(accelerator.device))
    trainer = FairTrainer(config, setup.parts, setup.scorer, setup.target, setup.train_prompts, setup.val_prompts,
                          accelerator=accelerator, preservation=setup.preservation)
    result = trainer.fit(resume=args.resume)
    if trainer.accelerator.is_main_process:
        print(f"adaptor: {result.adaptor_path}  ({result.state.iteration} iterations, "
              f"{result.state.skipped_steps} skipped, {result.seconds:.0f} s)")
    return 0
