"""The ComfyUI nodes' logic through fair_core, without ComfyUI (fast): names -> files inside model folders, soft
tokens into ComfyUI-format token lists, face boxes, the audit payload; and the node classes' declarations.

The real server runs them in tests/comfyui. Token lists here are written in ComfyUI's ``clip.tokenize`` format
(per encoder key, 77-entry chunks of ``(token, weight)`` or ``(token, weight, word_id)``; checked against
comfy/sd1_clip.py ``SDTokenizer.tokenize_with_weights``).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from fair_core.adaptor import FairMetadata, SoftTokens, read_adaptor, save_adaptor, soft_token_vectors
from fair_core.adaptor.container import FairAdaptor
from fair_core.audit import audit_images
from fair_core.host_helpers import (PLACEHOLDER_WORD, draw_boxes, placeholder_prompt, resolve_in_folders,
                                    splice_soft_tokens)
from fair_core.images import from_bhwc01
from fair_core.models import clip_tokenizer
from fair_core.scoring import WholeImageScorer
from fair_core.targets import Attribute, TargetDistribution

BOS, EOS = 49406, 49407


def comfy_tokens(ids: list[int], weight: float = 1.0, word_ids: bool = False) -> list[list[tuple]]:
    """One 77-entry chunk as ComfyUI's SD1 tokenizer lays it out: BOS, the ids, EOS, EOS padding."""
    body = [BOS, *ids, EOS] + [EOS] * (75 - len(ids))
    return [[(t, weight, i) if word_ids else (t, weight) for i, t in enumerate(body)]]


# -- names from node inputs resolve inside their folders only -------------------------------------------------

def test_names_resolve_in_the_first_folder_that_has_them(tmp_path):
    first, second = tmp_path / "fair_adaptors", tmp_path / "loras"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    (first / "sub" / "a.safetensors").write_bytes(b"1")
    (second / "a.safetensors").write_bytes(b"2")
    (second / "b.safetensors").write_bytes(b"3")
    assert resolve_in_folders(os.path.join("sub", "a.safetensors"), [first, second]) == first / "sub" / "a.safetensors"
    assert resolve_in_folders("a.safetensors", [first, second]) == second / "a.safetensors"
    assert resolve_in_folders("b.safetensors", [first, second], "adaptor").read_bytes() == b"3"


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/hostname", ""])
def test_names_that_leave_the_folders_are_refused_even_if_the_file_exists(tmp_path, name):
    folder = tmp_path / "models" / "fair_adaptors"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "models" / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError) as error:
        resolve_in_folders(name, [folder], "adaptor")
    assert "adaptor" in str(error.value)
    assert ("outside the model folders" in str(error.value)) == bool(name)


def test_a_missing_name_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"classifier 'x\.onnx' not found in .*attribute_classifiers"):
        resolve_in_folders("x.onnx", [tmp_path / "attribute_classifiers"], "classifier")


# -- soft tokens right after BOS of the positive prompt ---------------------------------------------------------

def test_the_placeholder_is_one_clip_token_and_lands_right_after_bos():
    tokenizer = clip_tokenizer()
    ids = tokenizer(placeholder_prompt("a photo of a nurse", 3))["input_ids"]
    placeholder = tokenizer(PLACEHOLDER_WORD)["input_ids"][1:-1]
    assert len(placeholder) == 1
    assert ids[0] == tokenizer.bos_token_id and ids[1:4] == placeholder * 3
    assert ids[4:-1] == tokenizer("a photo of a nurse")["input_ids"][1:-1]
    assert placeholder_prompt("text", 0) == "text"


def test_splice_puts_the_vectors_in_the_placeholder_slots_and_nothing_else():
    vectors = {"clip_l": torch.randn(3, 768)}
    tokens = {"l": comfy_tokens([320, 320, 320, 1125, 539], weight=1.0, word_ids=True)
              + comfy_tokens([1929], word_ids=True)}
    spliced = splice_soft_tokens(tokens, vectors)
    first = spliced["l"][0]
    assert first[0] == (BOS, 1.0, 0)
    for i in range(3):
        assert torch.equal(first[1 + i][0], vectors["clip_l"][i]) and first[1 + i][1:] == (1.0, 1 + i)
    assert first[4:] == tokens["l"][0][4:] and spliced["l"][1] == tokens["l"][1]
    assert all(isinstance(entry[0], int) for entry in tokens["l"][0])  # the input is left as it was
    assert len(first) == 77


def test_splice_fills_each_sdxl_encoder_with_its_own_vectors():
    vectors = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    tokens = {"g": comfy_tokens([320, 320, 2368]), "l": comfy_tokens([320, 320, 2368])}
    spliced = splice_soft_tokens(tokens, vectors)
    assert torch.equal(spliced["g"][0][2][0], vectors["clip_g"][1])
    assert torch.equal(spliced["l"][0][1][0], vectors["clip_l"][0])


def test_splice_refuses_vectors_for_other_encoders_and_missing_placeholders():
    with pytest.raises(ValueError, match="soft tokens are for clip_l, the text encoder has clip_g, clip_l"):
        splice_soft_tokens({"g": comfy_tokens([320]), "l": comfy_tokens([320])}, {"clip_l": torch.randn(1, 768)})
    with pytest.raises(ValueError, match="expected BOS and 3 placeholder tokens"):
        splice_soft_tokens({"l": comfy_tokens([320, 1125, 539])}, {"clip_l": torch.randn(3, 768)})
    plain = comfy_tokens([1125])
    assert splice_soft_tokens({"l": plain}, {}) == {"l": plain}  # an adaptor without tokens changes nothing


def test_the_vectors_a_node_splices_are_the_files_tokens_in_file_order(tmp_path):
    first, second = torch.randn(2, 768), torch.randn(1, 768)
    adaptor = FairAdaptor(FairMetadata(base_model="sd15", name="t"),
                          tokens=[SoftTokens("one", {"te": first}), SoftTokens("two", {"te": second})])
    path = save_adaptor(adaptor, tmp_path / "t.safetensors")
    vectors = soft_token_vectors(read_adaptor(path))
    spliced = splice_soft_tokens({"l": comfy_tokens([320, 320, 320, 1125])}, vectors)
    got = torch.stack([entry[0] for entry in spliced["l"][0][1:4]])
    assert torch.equal(got, torch.cat([first, second]))


# -- the audit's outputs ------------------------------------------------------------------------------------------

def test_boxes_are_drawn_on_a_copy():
    images = torch.zeros(2, 20, 30, 3)
    boxes = np.array([[5.0, 4.0, 14.0, 12.0], [math.nan] * 4])
    drawn = draw_boxes(images, boxes, colour=(0.0, 1.0, 0.0), thickness=1)
    assert torch.count_nonzero(images) == 0  # the input is untouched
    assert drawn[0, 4, 5:15, 1].eq(1).all() and drawn[0, 12, 5:15, 1].eq(1).all()  # top and bottom edges
    assert drawn[0, 4:13, 5, 1].eq(1).all() and drawn[0, 4:13, 14, 1].eq(1).all()  # left and right edges
    assert drawn[0, 8, 9].eq(0).all() and torch.count_nonzero(drawn[1]) == 0  # inside, and the faceless image
    assert torch.equal(draw_boxes(images, None), images)
    with pytest.raises(ValueError, match="1 boxes for 2 images"):
        draw_boxes(images, boxes[:1])


def test_the_bias_audit_payload_is_json_for_the_history_and_the_web_chart():
    colour = Attribute("colour", ("dark", "light"))
    classifier = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        classifier[2].weight.copy_(torch.tensor([[-4.0, -4.0, -4.0], [4.0, 4.0, 4.0]]))
        classifier[2].bias.zero_()
    images = torch.cat([torch.full((3, 8, 8, 3), 0.9), torch.full((1, 8, 8, 3), 0.1)])  # ComfyUI IMAGE, 0..1
    result = audit_images(from_bhwc01(images), WholeImageScorer(classifier, [colour]),
                          TargetDistribution.uniform((colour,)))
    report = {key: value for key, value in result.to_json().items() if key != "records"}
    group = json.loads(json.dumps(report))["summary"]["groups"]["colour"]
    assert group["classes"] == ["dark", "light"] and group["target"] == [0.5, 0.5]
    assert group["frequencies"]["estimate"] == pytest.approx([0.25, 0.75])
    assert "colour" in result.describe()


# -- the node classes ---------------------------------------------------------------------------------------------

def test_node_classes_are_declared_for_comfyui():
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Fair") and cls.CATEGORY == "fairness" and cls.DESCRIPTION
        assert callable(getattr(cls, cls.FUNCTION)) and isinstance(cls.RETURN_TYPES, tuple)
