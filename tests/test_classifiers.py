"""Classifier files: metadata, torch <-> ONNX parity, the CC0 wrappers, label readers, training + report, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fair_core.classifiers.metadata import ClassifierFileError, ClassifierSpec, FaceCropSpec
from fair_core.classifiers.model import AttributeClassifier, build_classifier
from fair_core.classifiers.onnx_export import export_onnx
from fair_core.classifiers.pretrained import age_groups, dlib_age_classifier, dlib_gender_classifier, model_file
from fair_core.classifiers.runtime import OnnxClassifier, load_classifier, select_providers
from fair_core.classifiers.train import accuracy_report, read_labels
from fair_core.targets import DEFAULT_SCHEMA, Attribute
from train_cli.main import main

SHAPE = Attribute("shape", ("horizontal", "vertical"))
TINT = Attribute("tint", ("cool", "warm"))

# the legacy ONNX exporter (dynamo=False) warns on every call; it is the documented choice here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


def tiny_classifier(backbone: str = "tiny", size: int = 32, **overrides) -> AttributeClassifier:
    torch.manual_seed(0)
    return build_classifier(ClassifierSpec((SHAPE, TINT), size, FaceCropSpec("box", expand=0.5)), backbone, overrides).eval()


# ----------------------------------------------------------------------------- metadata
def test_spec_metadata_round_trip():
    spec = ClassifierSpec((DEFAULT_SCHEMA["gender"], DEFAULT_SCHEMA["race"]), 96, FaceCropSpec("aligned", padding=0.25), {"note": "x"})
    metadata = spec.to_metadata()
    assert json.loads(metadata["fair.attributes"]) == [
        {"name": "gender", "classes": ["female", "male"]},
        {"name": "race", "classes": ["White", "Black", "Indian", "Asian"]},
    ]
    assert json.loads(metadata["fair.input"]) == {"size": 96, "range": [-1, 1], "layout": "NCHW", "channels": "RGB"}
    assert ClassifierSpec.from_metadata(metadata, "f") == spec
    assert spec.num_logits == 6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fair.attributes": None}, "metadata fair.attributes missing"),
        ({"fair.face_crop": None, "fair.input": None}, "fair.input, fair.face_crop missing"),
        ({"fair.attributes": "[oops"}, "not valid JSON"),
        ({"fair.input": json.dumps({"size": 64, "range": [0, 1]})}, r"only NCHW RGB input in \[-1, 1\]"),
        ({"fair.face_crop": json.dumps({"method": "ellipse"})}, "unknown face crop"),
        ({"fair.format_version": "7"}, "format version '7'"),
    ],
)
def test_bad_metadata_is_rejected(change, message):
    metadata = ClassifierSpec((SHAPE,), 32).to_metadata()
    for key, value in change.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    with pytest.raises(ClassifierFileError, match=message):
        ClassifierSpec.from_metadata(metadata, "file.onnx")


def test_files_without_metadata_are_rejected(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(plain))
    with pytest.raises(ClassifierFileError, match="plain.safetensors: not a Fair Adaptors classifier file"):
        AttributeClassifier.load(plain)
    bare_onnx = tmp_path / "bare.onnx"
    torch.onnx.export(torch.nn.Flatten(), (torch.zeros(1, 3, 8, 8),), str(bare_onnx), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    with pytest.raises(ClassifierFileError, match="bare.onnx: not a Fair Adaptors classifier file"):
        OnnxClassifier(bare_onnx)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ClassifierFileError, match="not a readable ONNX file"):
        load_classifier(garbage)
    with pytest.raises(ClassifierFileError, match="end in .onnx or .safetensors"):
        load_classifier(tmp_path / "x.pt")


# ----------------------------------------------------------------------------- torch <-> ONNX
@pytest.mark.parametrize("backbone, overrides", [("tiny", {}), ("mobilenet_v2", {"depth_multiplier": 0.35})])
def test_export_parity_through_our_runtime(tmp_path, backbone, overrides):
    classifier = tiny_classifier(backbone, **overrides)
    path = tmp_path / "c.onnx"
    reported = export_onnx(classifier, path)
    assert reported <= 1e-4
    runtime = OnnxClassifier(path, device="cpu", batch_size=2)  # 5 crops -> 3 onnxruntime calls
    assert runtime.spec == classifier.spec
    crops = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = classifier(crops)
    assert float((runtime(crops) - expected).abs().max()) <= 1e-4
    assert runtime(torch.zeros(0, 3, 32, 32)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"expects crops \(N, 3, 32, 32\)"):
        runtime(torch.zeros(1, 3, 64, 64))


def test_safetensors_round_trip_is_exact(tmp_path):
    classifier = tiny_classifier()
    path = classifier.save(tmp_path / "c.safetensors")
    loaded = load_classifier(path, device="cpu")
    crops = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(crops), classifier(crops))
    assert loaded.spec == classifier.spec
    assert loaded.identity["name"] == "c.safetensors" and len(loaded.identity["sha256"]) == 64


def test_backbone_from_a_local_pretrained_folder(tmp_path):
    """A local transformers folder initialises the backbone and brings its own input normalisation."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(1)
    pretrained = AutoModel.from_config(AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    pretrained.save_pretrained(tmp_path / "resnet")
    (tmp_path / "resnet" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    classifier = build_classifier(ClassifierSpec((SHAPE,), 32), str(tmp_path / "resnet")).eval()
    torch.testing.assert_close(classifier.net.backbone.state_dict(), pretrained.state_dict())
    crops = torch.rand(2, 3, 32, 32) * 2 - 1
    imagenet = ((crops + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = pretrained.eval()(pixel_values=imagenet).pooler_output.flatten(1)
        torch.testing.assert_close(classifier(crops), classifier.net.head(features))
    with pytest.raises(ValueError, match="neither a preset"):
        build_classifier(ClassifierSpec((SHAPE,), 32), str(tmp_path / "missing"))


def test_providers_are_chosen_explicitly():
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert select_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="no CUDA provider"):
            select_providers("cuda")
    assert select_providers("cpu") == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- the CC0 gender/age nets
def test_pretrained_twins_match_the_original_onnx_models():
    """Our torch twins (graph interpreter + input conversion) against the wheel's ONNX files."""
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([122.781998, 117.000999, 104.297997]).view(1, 3, 1, 1)  # from the wheel's manifest
    for name, classifier in (("gender-v1.onnx", dlib_gender_classifier()), ("age-v1.onnx", dlib_age_classifier((40,)))):
        size = classifier.spec.input_size
        crops = torch.rand(4, 3, size, size, generator=generator) * 2 - 1
        original = ort.InferenceSession(str(model_file(name)), providers=["CPUExecutionProvider"])
        probabilities = original.run(None, {"images": (((crops + 1) * 127.5 - means) / 256).numpy()})[0]
        with torch.no_grad():
            ours = torch.softmax(classifier(crops), dim=-1).numpy()
        if name.startswith("age"):
            probabilities = np.stack([probabilities[:, :40].sum(1), probabilities[:, 40:].sum(1)], axis=1)
        np.testing.assert_allclose(ours, probabilities, atol=1e-5)


def test_age_groups():
    attribute, groups = age_groups((40,))
    assert attribute == DEFAULT_SCHEMA["age"] and groups[0] == list(range(40)) and groups[1] == list(range(40, 81))
    attribute, groups = age_groups((20, 40))
    assert attribute.classes == ("0-19", "20-39", "40+") and [len(g) for g in groups] == [20, 20, 41]
    with pytest.raises(ValueError, match="age cuts"):
        age_groups((0,))


def test_cli_pretrained_writes_loadable_files(tmp_path):
    assert main(["classifier", "pretrained", "-o", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["age-dlib.onnx", "age-dlib.safetensors", "gender-dlib.onnx", "gender-dlib.safetensors"]
    gender = load_classifier(tmp_path / "gender-dlib.onnx", device="cpu")
    assert gender.spec.attributes == (DEFAULT_SCHEMA["gender"],)
    assert gender.spec.face_crop == FaceCropSpec("aligned", padding=0.2) and gender.spec.input_size == 32
    assert gender.spec.info["license"] == "CC0-1.0"
    age = load_classifier(tmp_path / "age-dlib.safetensors", device="cpu")
    assert age.spec.attributes == (DEFAULT_SCHEMA["age"],) and age.spec.input_size == 64


# ----------------------------------------------------------------------------- label readers
def write_png(path, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), colour).save(path)


def test_cli_pretrained_refuses_age_cuts_that_are_not_whole_years(tmp_path, capsys):
    assert main(["classifier", "pretrained", "-o", str(tmp_path), "--age-cuts", "40,old"]) == 2
    assert "--age-cuts must be comma-separated whole years" in capsys.readouterr().err


def test_read_folder_infers_schema_attribute(tmp_path):
    for cls in ("male", "female"):
        for i in range(2):
            write_png(tmp_path / cls / f"{i}.png", (0, 0, 0))
    items = read_labels(tmp_path)
    assert items.attributes == (DEFAULT_SCHEMA["gender"],)
    assert items.labels[:, 0].tolist() == [0, 0, 1, 1]  # female first, in schema order
    (tmp_path / "robot").mkdir()
    with pytest.raises(ValueError, match="pass --attributes"):
        read_labels(tmp_path)
    assert read_labels(tmp_path, ["kind"]).attributes[0].classes == ("female", "male", "robot")


def test_read_fairface_csv_maps_to_paper_schema(tmp_path):
    rows = [
        ("train/1.jpg", "30-39", "Female", "Latino_Hispanic"),
        ("train/2.jpg", "40-49", "Male", "Southeast Asian"),
        ("train/3.jpg", "more than 70", "Male", "Middle Eastern"),
        ("train/4.jpg", "3-9", "Female", "Indian"),
        ("train/5.jpg", "20-29", "Male", "Black"),
        ("train/6.jpg", "0-2", "Female", "East Asian"),
    ]
    label_file = tmp_path / "fairface_label_train.csv"
    with open(label_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "age", "gender", "race", "service_test"])
        writer.writerows([(*row, "True") for row in rows])
    items = read_labels(label_file)
    assert [a.name for a in items.attributes] == ["age", "gender", "race"]
    decoded = [tuple(a.classes[i] for a, i in zip(items.attributes, row)) for row in items.labels]
    assert decoded == [
        ("young", "female", "White"), ("old", "male", "Asian"), ("old", "male", "White"),
        ("young", "female", "Indian"), ("young", "male", "Black"), ("young", "female", "Asian"),
    ]
    assert items.paths[0] == tmp_path / "train" / "1.jpg"
    assert read_labels(label_file, old_from=30).labels[0, 0] == 1
    label_file.write_text("file,gender\na.jpg,Robot\n")
    with pytest.raises(ValueError, match=r"row 2: label 'Robot' is not a class of 'gender'"):
        read_labels(label_file)


def test_read_celeba_attribute_file(tmp_path):
    names = ["5_o_Clock_Shadow", "Male", "Young"]
    text = "2\n" + " ".join(names) + "\n000001.jpg -1 -1  1\n000002.jpg  1  1 -1\n"
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    (tmp_path / "img_align_celeba").mkdir()
    items = read_labels(tmp_path / "list_attr_celeba.txt")
    assert [a.name for a in items.attributes] == ["gender", "age"]
    assert items.labels.tolist() == [[0, 0], [1, 1]]  # (female, young), (male, old)
    assert items.paths[1] == tmp_path / "img_align_celeba" / "000002.jpg"


def test_detected_training_crops_match_the_scorer(tmp_path):
    """With --detect, training sees the crop the scorer makes; images without a face are left out."""
    from skimage import data as skdata

    from fair_core.classifiers.train import CropDataset, find_faces
    from fair_core.faces import DlibLandmarker, FaceFinder, crop_face
    from fair_core.images import image_to_tensor

    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.png")
    Image.fromarray(skdata.astronaut()).save(tmp_path / "astronaut.png")
    finder = FaceFinder(landmarker=DlibLandmarker())
    items = find_faces(read_labels(_csv(tmp_path, [("cat.png", "male"), ("astronaut.png", "female")])), finder, progress=False)
    assert [p.name for p in items.paths] == ["astronaut.png"] and items.labels.tolist() == [[0]]
    spec = FaceCropSpec("aligned", padding=0.25)
    crop, labels = CropDataset(items.subset(np.array([0])), 48, spec)[0]
    expected = crop_face(image_to_tensor(skdata.astronaut()), finder.find(skdata.astronaut()).face, spec, 48)
    torch.testing.assert_close(crop, expected)
    assert labels.tolist() == [0]


def _csv(folder, rows):
    path = folder / "labels.csv"
    path.write_text("file,gender\n" + "".join(f"{f},{g}\n" for f, g in rows))
    return path


def test_accuracy_report_by_hand():
    attributes = (DEFAULT_SCHEMA["gender"], Attribute("race2", ("a", "b")))
    labels = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 1], [-1, 0]])
    predictions = np.array([[0, 0], [1, 1], [1, 1], [1, 1], [0, 1], [1, 0]])
    report = accuracy_report(predictions, labels, attributes)
    gender = report["attributes"]["gender"]
    assert gender["count"] == 5 and gender["accuracy"] == pytest.approx(3 / 5)
    assert gender["confusion"] == [[1, 1], [1, 2]]
    assert gender["per_class_accuracy"] == {"female": 0.5, "male": pytest.approx(2 / 3)}
    # gender accuracy within race2 = a: rows 0, 2 (row 5 has no gender label) -> 2 of 2; b: rows 1, 3, 4 -> 1 of 3
    assert report["per_group"]["gender"]["race2"] == {"a": {"count": 2, "accuracy": 1.0}, "b": {"count": 3, "accuracy": pytest.approx(1 / 3)}}
    assert report["attributes"]["race2"]["accuracy"] == pytest.approx(5 / 6)
    assert report["mean_accuracy"] == pytest.approx((3 / 5 + 5 / 6) / 2)


# ----------------------------------------------------------------------------- training through the CLI
def make_shapes(root, n=240, size=40, seed=0):
    """Horizontal/vertical bars (label ``shape``) in warm/cool colours (label ``tint``) on a noisy
    background, at random positions and sizes.

    Every 7th image is stored as RGBA and every 11th as a palette image: the loader must convert them.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    rows = []
    for i in range(n):
        shape, tint = SHAPE.classes[i % 2], TINT.classes[(i // 2) % 2]
        image = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
        long, short = rng.uniform(10, 16), rng.uniform(3, 5)
        cx, cy = rng.uniform(long + 1, size - long - 1, 2)
        half_x, half_y = (long, short) if shape == "horizontal" else (short, long)
        mask = (abs(xx - cx) <= half_x) & (abs(yy - cy) <= half_y)
        image[mask] = (40, rng.uniform(60, 140), 220) if tint == "cool" else (220, rng.uniform(60, 140), 40)
        picture = Image.fromarray(image)
        if i % 7 == 0:
            picture = picture.convert("RGBA")
        elif i % 11 == 0:
            picture = picture.convert("P")
        (root / "img").mkdir(parents=True, exist_ok=True)
        picture.save(root / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", shape, tint))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "shape", "tint"])
        writer.writerows(rows)
    return root / "labels.csv"


def test_cli_train_reaches_accuracy_and_export_is_usable(tmp_path, capsys):
    labels = make_shapes(tmp_path / "data")
    out = tmp_path / "shapes.safetensors"
    code = main(["classifier", "train", "--data", str(labels), "--attributes", "shape,tint", "--backbone", "tiny",
                 "--size", "32", "--epochs", "8", "--batch-size", "16", "--lr", "3e-3", "--val-fraction", "0.25",
                 "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy by tint" in printed and "confusion" in printed
    report = json.loads(out.with_suffix(".report.json").read_text())["report"]
    # measured 1.0 / 1.0 for seeds 0-3; chance is 0.5
    assert report["attributes"]["tint"]["accuracy"] >= 0.95
    assert report["attributes"]["shape"]["accuracy"] >= 0.95
    assert report["attributes"]["shape"]["count"] == 60
    assert set(report["per_group"]["shape"]["tint"]) == {"cool", "warm"}
    assert out.with_suffix(".report.txt").read_text().startswith("mean validation accuracy")

    classifier = load_classifier(out, device="cpu")
    assert classifier.spec.info["validation_accuracy"]["tint"] == report["attributes"]["tint"]["accuracy"]
    onnx_path = tmp_path / "shapes.onnx"
    assert main(["classifier", "export", str(out), "-o", str(onnx_path)]) == 0
    audit = load_classifier(onnx_path, device="cpu")
    assert isinstance(audit, OnnxClassifier) and audit.spec.attributes == (SHAPE, TINT)
    # the ONNX file gives the torch classifier's predictions on the training images
    from fair_core.classifiers.train import CropDataset

    crops = torch.stack([CropDataset(read_labels(labels, ["shape", "tint"]), 32, classifier.spec.face_crop)[i][0] for i in range(24)])
    with torch.no_grad():
        torch.testing.assert_close(audit(crops), classifier(crops), atol=1e-4, rtol=0)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["classifier", "train", "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "training data not found" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    assert main(["classifier", "export", str(plain), "-o", str(tmp_path / "p.onnx")]) == 2
    assert "not a Fair Adaptors classifier file" in capsys.readouterr().err
    assert main(["classifier", "export", str(plain), "-o", str(tmp_path / "p.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
