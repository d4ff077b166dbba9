"""The node pack inside a real ComfyUI server (the ``comfyui==0.0.1`` wheel, offline, CPU; torchvision there is an
import-only stand-in, see harness.py): import, /object_info, the example workflows end to end, Load Fair Adaptor
against the stock LoraLoader and ``embedding:``, Mid-Block Bypass against the unpatched model, and the errors.

Sampling runs at 64x64 with 2 steps on a random full-size SD1.5 checkpoint: the images are noise (no faces), which
is enough to run every node; the comparisons are made on patched weights, conditioning and latents.
"""

from __future__ import annotations

import copy
import json

import pytest

from harness import Rejected, execution_error
from pack_files import ADAPTOR, CHECKPOINT, FACE_IMAGE, TOKEN, load_workflow, timed_run
from workflow_format import EXAMPLES, ui_to_api

PACK_NODES = {
    "FairAdaptorLoader": "Load Fair Adaptor",
    "FairTextEncode": "Fair Text Encode (positive prompt)",
    "FairAttributeClassifierLoader": "Load Attribute Classifier",
    "FairTargetDistribution": "Target Distribution",
    "FairBiasAudit": "Bias Audit",
    "FairMidBlockBypass": "Mid-Block Bypass (experimental)",
}
LONG_TEXT = ", ".join(["a portrait photo of a nurse in a hospital corridor with soft window light"] * 9)
CHECKPOINT_NODE = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def probe_reports(entry: dict, node_id: str) -> list[dict]:
    return entry["outputs"][node_id]["fair_probe"]


def assert_ran(entry: dict) -> None:
    error = execution_error(entry)
    assert error is None, f"{error['node_type']}: {error['exception_message']}"


def test_pack_imports_and_object_info_lists_every_node(comfy):
    info = comfy.object_info()
    log = comfy.server.log_tail(400)
    assert "fair_adaptors" in log and "Cannot import" not in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "fair_" in line]
    for node_id, display in PACK_NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["display_name"] == display
        assert info[node_id]["category"] == "fairness"
    assert info["FairBiasAudit"]["output_node"] is True
    adaptors = info["FairAdaptorLoader"]["input"]["required"]["adaptor"][0]
    # fair adaptors from fair_adaptors and loras, each name once; the non-safetensors file is not offered
    assert sorted(adaptors) == sorted([ADAPTOR, "truncated.safetensors", "xl_fair.safetensors"])
    classifiers = info["FairAttributeClassifierLoader"]["input"]["required"]["classifier"][0]
    assert classifiers[0] == "pretrained:gender,age" and "gender-dlib.onnx" in classifiers


def test_the_web_chart_extension_is_served(comfy):
    listed = comfy.get("/extensions")
    assert "/extensions/fair_adaptors/fair_audit_chart.js" in listed
    script = comfy.get_text("/extensions/fair_adaptors/fair_audit_chart.js")
    assert "registerExtension" in script and '"FairBiasAudit"' in script


@pytest.mark.parametrize("api_file", sorted(p.name for p in EXAMPLES.glob("*.api.json")))
def test_each_ui_workflow_is_its_api_workflow(comfy, api_file):
    """The UI-format file users load holds the same graph and values as the API file the tests post."""
    ui = json.loads((EXAMPLES / api_file.replace(".api.json", ".json")).read_text())
    assert ui_to_api(ui, comfy.object_info()) == load_workflow(api_file)


def small(prompt: dict) -> dict:
    """An example workflow at test size on the test files: 64x64, batch 2, 2 steps, the random checkpoint, the
    test adaptor; everything else as shipped."""
    prompt = copy.deepcopy(prompt)
    for item in prompt.values():
        inputs = item["inputs"]
        if item["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif item["class_type"] == "FairAdaptorLoader":
            inputs["adaptor"] = ADAPTOR
        elif item["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=2)
        elif item["class_type"] == "KSampler":
            inputs["steps"] = 2
        elif item["class_type"] == "LoadImage":
            inputs["image"] = FACE_IMAGE
    return prompt


@pytest.mark.parametrize("name", ["fair_adaptor_txt2img_audit.api.json", "mid_block_bypass_audit.api.json"])
def test_example_txt2img_workflow_completes_with_the_audit_in_history(comfy, name):
    prompt = small(load_workflow(name))
    entry = timed_run(comfy, f"workflow {name}", prompt)
    assert_ran(entry)
    audit_id = next(i for i, item in prompt.items() if item["class_type"] == "FairBiasAudit")
    output = entry["outputs"][audit_id]
    assert "0 of 2 images with a face" in output["text"][0]  # random weights draw noise, not faces
    report = output["fair_audit"][0]
    assert report["summary"]["num_images"] == 2 and report["summary"]["num_faces"] == 0
    saved = [i for i, item in prompt.items() if item["class_type"] == "SaveImage"]
    assert saved and all(len(entry["outputs"][i]["images"]) == 2 for i in saved)
    previews = [i for i, item in prompt.items() if item["class_type"] == "PreviewImage"]
    assert previews and all(entry["outputs"][i]["images"] for i in previews)  # the chart (and boxes) rendered


def test_example_audit_workflow_finds_the_face_and_reports_every_attribute(comfy):
    prompt = small(load_workflow("audit_an_image.api.json"))
    entry = timed_run(comfy, "workflow audit_an_image.api.json", prompt)
    assert_ran(entry)
    output = entry["outputs"]["4"]
    assert output["text"][0].startswith("1 of 1 images with a face")
    groups = output["fair_audit"][0]["summary"]["groups"]
    for name, classes in (("gender", ["female", "male"]), ("age", ["young", "old"])):
        assert groups[name]["classes"] == classes and groups[name]["target"] == [0.5, 0.5]
        assert sum(groups[name]["frequencies"]["estimate"]) == pytest.approx(1.0)
    assert entry["outputs"]["5"]["images"] and entry["outputs"]["6"]["images"]  # chart, and the boxed face


def test_load_fair_adaptor_patches_exactly_like_the_stock_lora_loader(comfy):
    strengths = {"strength_model": 0.7, "strength_clip": 1.3}
    prompt = {
        "1": CHECKPOINT_NODE,
        "2": node("FairAdaptorLoader", model=["1", 0], clip=["1", 1], adaptor=ADAPTOR, **strengths),
        "3": node("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=ADAPTOR, **strengths),
        "4": node("FairProbePatchedWeights", model_a=["2", 0], model_b=["3", 0], clip_a=["2", 1], clip_b=["3", 1]),
    }
    entry = timed_run(comfy, "patched weights vs LoraLoader", prompt)
    assert_ran(entry)
    report = probe_reports(entry, "4")[0]
    model, clip = report["model"], report["clip"]
    assert model["keys_a"] == 128 and clip["keys_a"] == 72  # every UNet and text-encoder LoRA module landed
    assert model["same_keys"] and clip["same_keys"]
    assert model["max_diff"] == 0.0 and clip["max_diff"] == 0.0
    assert model["max_delta"] > 1e-4 and clip["max_delta"] > 1e-4  # the patch changes the weights


def test_fair_text_encode_equals_an_embedding_prompt_and_leaves_the_negative_alone(comfy):
    text = "a portrait photo of a nurse"
    prompt = {
        "1": CHECKPOINT_NODE,
        "2": node("FairAdaptorLoader", model=["1", 0], clip=["1", 1], adaptor=ADAPTOR, strength_model=1.0,
                  strength_clip=1.0),
        "3": node("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=ADAPTOR, strength_model=1.0,
                  strength_clip=1.0),
        "10": node("FairTextEncode", clip=["2", 1], fair_adaptor=["2", 2], text=text),
        "11": node("CLIPTextEncode", clip=["3", 1], text=f"embedding:{TOKEN} {text}"),
        "12": node("FairProbeConditioning", a=["10", 0], b=["11", 0], label="short"),
        "20": node("FairTextEncode", clip=["2", 1], fair_adaptor=["2", 2], text=LONG_TEXT),
        "21": node("CLIPTextEncode", clip=["3", 1], text=f"embedding:{TOKEN} {LONG_TEXT}"),
        "22": node("FairProbeConditioning", a=["20", 0], b=["21", 0], label="long"),
        "30": node("CLIPTextEncode", clip=["3", 1], text=text),
        "31": node("FairProbeConditioning", a=["10", 0], b=["30", 0], label="without tokens"),
        "40": node("CLIPTextEncode", clip=["2", 1], text="blurry, lowres"),
        "41": node("CLIPTextEncode", clip=["3", 1], text="blurry, lowres"),
        "42": node("FairProbeConditioning", a=["40", 0], b=["41", 0], label="negative"),
    }
    entry = timed_run(comfy, "conditioning vs embedding:", prompt)
    assert_ran(entry)
    short, long, without, negative = (probe_reports(entry, i)[0] for i in ("12", "22", "31", "42"))
    assert short["shape_a"] == [1, 77, 768] and short["max_diff"] == 0.0 and short["pooled_diff"] == 0.0
    assert long["shape_a"] == long["shape_b"] == [1, 154, 768] and long["max_diff"] == 0.0
    assert without["max_diff"] > 1e-3  # the soft tokens change the conditioning
    assert negative["max_diff"] == 0.0  # the CLIP that feeds the negative prompt carries no tokens


def _rejection_details(result) -> str:
    assert isinstance(result, Rejected), f"expected the server to refuse the prompt, it queued {result}"
    return json.dumps(result.body)


@pytest.mark.parametrize("name", ["../../outside.safetensors", "/etc/hostname", "../loras/" + ADAPTOR])
def test_adaptor_names_outside_the_model_folders_are_refused(comfy, name):
    prompt = {
        "1": CHECKPOINT_NODE,
        "2": node("FairAdaptorLoader", model=["1", 0], clip=["1", 1], adaptor=name, strength_model=1.0,
                  strength_clip=1.0),
        "3": node("FairTextEncode", clip=["2", 1], fair_adaptor=["2", 2], text="x"),
        "4": node("FairProbeConditioning", a=["3", 0], b=["3", 0], label=""),
    }
    details = _rejection_details(comfy.post_prompt(prompt))
    assert "outside the model folders" in details and name in details


def test_classifier_names_outside_the_model_folder_are_refused(comfy):
    prompt = {"1": node("EmptyImage", width=64, height=64, batch_size=1, color=0),
              "2": node("FairAttributeClassifierLoader", classifier="../../outside.safetensors", device="cpu"),
              "3": node("FairBiasAudit", images=["1", 0], classifier=["2", 0])}
    assert "outside the model folders" in _rejection_details(comfy.post_prompt(prompt))


def _adaptor_prompt(adaptor: str) -> dict:
    return {
        "1": CHECKPOINT_NODE,
        "2": node("FairAdaptorLoader", model=["1", 0], clip=["1", 1], adaptor=adaptor, strength_model=1.0,
                  strength_clip=1.0),
        "3": node("FairTextEncode", clip=["2", 1], fair_adaptor=["2", 2], text="x"),
        "4": node("FairProbeConditioning", a=["3", 0], b=["3", 0], label=""),
    }


@pytest.mark.parametrize("adaptor, words", [
    ("truncated.safetensors", "truncated.safetensors"),
    ("xl_fair.safetensors", "is for sdxl, the loaded model is sd15"),
])
def test_bad_adaptors_stop_with_a_node_error_naming_the_problem(comfy, adaptor, words):
    entry = comfy.run(_adaptor_prompt(adaptor))
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "FairAdaptorLoader"
    assert words in error["exception_message"]


def test_a_file_that_is_not_safetensors_is_refused_at_validation(comfy):
    details = _rejection_details(comfy.post_prompt(_adaptor_prompt("garbage.safetensors")))
    assert "garbage.safetensors" in details and "not a safetensors file" in details


def _audit_prompt(classifier: str, target: str | None = None) -> dict:
    prompt = {"1": node("EmptyImage", width=64, height=64, batch_size=2, color=0),
              "2": node("FairAttributeClassifierLoader", classifier=classifier, device="cpu"),
              "3": node("FairBiasAudit", images=["1", 0], classifier=["2", 0])}
    if target is not None:
        prompt["4"] = node("FairTargetDistribution", classifier=["2", 0], target=target)
        prompt["3"]["inputs"]["target"] = ["4", 0]
    return prompt


def test_a_broken_classifier_file_stops_with_a_node_error(comfy):
    error = execution_error(comfy.run(_audit_prompt("broken.onnx")))
    assert error is not None and error["node_type"] == "FairAttributeClassifierLoader"
    assert "broken.onnx" in error["exception_message"]


def test_a_target_naming_an_attribute_the_classifier_lacks_is_explained(comfy):
    error = execution_error(comfy.run(_audit_prompt("pretrained:gender,age", "race=uniform")))
    assert error is not None and error["node_type"] == "FairTargetDistribution"
    message = error["exception_message"]
    assert "race" in message and "gender" in message and "age" in message


def test_an_onnx_classifier_file_audits_against_a_target(comfy):
    entry = comfy.run(_audit_prompt("gender-dlib.onnx", "gender=female:0.3,male:0.7"))
    assert_ran(entry)
    report = entry["outputs"]["3"]["fair_audit"][0]
    assert report["summary"]["num_images"] == 2
    assert report["target"]


def test_mid_block_bypass_changes_sampling_only_when_it_bypasses(comfy):
    sampler = {"seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    bypass = {"start_percent": 0.0, "end_percent": 1.0, "schedule": "step", "apply_to": "both", "match_std": False}
    prompt = {
        "1": CHECKPOINT_NODE,
        "2": node("CLIPTextEncode", clip=["1", 1], text="a portrait photo of a doctor"),
        "3": node("CLIPTextEncode", clip=["1", 1], text=""),
        "4": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "5": node("FairMidBlockBypass", model=["1", 0], lambda_min=1.0, **bypass),
        "6": node("FairMidBlockBypass", model=["1", 0], lambda_min=0.0, **bypass),
        "10": node("KSampler", model=["1", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0], **sampler),
        "11": node("KSampler", model=["5", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0], **sampler),
        "12": node("KSampler", model=["6", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0], **sampler),
        "20": node("FairProbeLatents", a=["10", 0], b=["11", 0], label="lambda 1"),
        "21": node("FairProbeLatents", a=["10", 0], b=["12", 0], label="lambda 0"),
    }
    entry = timed_run(comfy, "mid-block bypass: 3 samplers", prompt)
    assert_ran(entry)
    unchanged, skipped = probe_reports(entry, "20")[0], probe_reports(entry, "21")[0]
    assert unchanged["max_diff"] == 0.0 and unchanged["finite"]
    assert skipped["max_diff"] > 1e-3 and skipped["finite"]


def test_mid_block_bypass_refuses_a_model_without_a_unet(comfy):
    prompt = {
        "1": CHECKPOINT_NODE,
        "2": node("FairProbeNotUNet", model=["1", 0]),
        "3": node("FairMidBlockBypass", model=["2", 0], lambda_min=0.5, start_percent=0.0, end_percent=0.3,
                  schedule="linear", apply_to="both", match_std=False),
        "4": node("CLIPTextEncode", clip=["1", 1], text=""),
        "5": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "6": node("KSampler", model=["3", 0], positive=["4", 0], negative=["4", 0], latent_image=["5", 0], seed=0,
                  steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        "7": node("FairProbeLatents", a=["6", 0], b=["6", 0], label=""),
    }
    error = execution_error(comfy.run(prompt))
    assert error is not None and error["node_type"] == "FairMidBlockBypass"
    assert "needs a UNet with a mid-block" in error["exception_message"] and "Identity" in error["exception_message"]
