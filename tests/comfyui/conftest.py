"""Session fixtures of the real-ComfyUI layer: the ComfyUI venv, a random SD1.5 checkpoint, the files the nodes
read (made with fair_core), and a running server with this pack linked into ``custom_nodes``.

See ``harness.py`` for how the venv is built (torchvision there is an import-only stand-in). If the venv cannot
be built (no package index), these tests FAIL; set ``FAIR_COMFYUI_ALLOW_SKIP=1`` to skip them instead, which is
refused when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import skimage.data
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

from fair_core.adaptor import save_adaptor  # noqa: E402
from pack_files import ADAPTOR, CHECKPOINT, FACE_IMAGE, TIMINGS, TOKEN, sd15_adaptor, sdxl_adaptor  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "real ComfyUI layer timings")
        for name, value in TIMINGS.items():
            unit = "GB" if name.endswith("RSS") else "s"
            terminalreporter.write_line(f"{name:<45} {value:7.1f} {unit}")


def _unavailable(reason: str):
    if os.environ.get("FAIR_COMFYUI_ALLOW_SKIP") == "1" and not harness.running_in_ci():
        pytest.skip(f"ComfyUI test server unavailable (FAIR_COMFYUI_ALLOW_SKIP=1): {reason}")
    pytest.fail(f"ComfyUI test server unavailable: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def comfy_venv() -> Path:
    started = time.monotonic()
    try:
        venv = harness.ensure_venv()
    except (RuntimeError, OSError) as error:
        _unavailable(str(error))
    TIMINGS["venv (cached after the first build)"] = time.monotonic() - started
    return venv


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_venv) -> Path:
    started = time.monotonic()
    path = harness.ensure_checkpoint(comfy_venv)
    TIMINGS["random SD1.5 checkpoint (cached)"] = time.monotonic() - started
    return path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, sd15_checkpoint) -> Path:
    """ComfyUI's working folder: the checkpoint, adaptors (a good one in fair_adaptors and the same file in loras
    for the stock LoraLoader; an SDXL one; a truncated one; a non-safetensors one; one outside the models folder),
    the soft token as an ``embeddings`` file, the CC0 classifiers as files, and the two packs."""
    from fair_core.classifiers.pretrained import write_pretrained

    root = tmp_path_factory.mktemp("comfyui")
    models = root / "models"
    for folder in ("checkpoints", "fair_adaptors", "loras", "embeddings", "attribute_classifiers"):
        (models / folder).mkdir(parents=True)
    (models / "checkpoints" / CHECKPOINT).symlink_to(sd15_checkpoint)
    good = save_adaptor(sd15_adaptor(), models / "fair_adaptors" / ADAPTOR)
    shutil.copy(good, models / "loras" / ADAPTOR)
    shutil.copy(good, root / "outside.safetensors")
    save_adaptor(sdxl_adaptor(), models / "fair_adaptors" / "xl_fair.safetensors")
    data = good.read_bytes()
    (models / "fair_adaptors" / "truncated.safetensors").write_bytes(data[: len(data) - 4096])
    (models / "fair_adaptors" / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    # The soft token as a textual-inversion file, read straight from the adaptor file's A1111 bundled-embedding
    # tensor (not through fair_core), for ComfyUI's own `embedding:` loader.
    bundled = {k: v for k, v in load_file(str(good)).items() if k.startswith(f"bundle_emb.{TOKEN}.")}
    assert len(bundled) == 1, bundled.keys()
    embedding = {"clip_l": next(iter(bundled.values())).contiguous()}
    save_file(embedding, str(models / "embeddings" / f"{TOKEN}.safetensors"))
    write_pretrained(models / "attribute_classifiers")
    (models / "attribute_classifiers" / "broken.onnx").write_bytes(b"\x08\x07 this is not an onnx model")
    (root / "input").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(root / "input" / FACE_IMAGE)
    nodes = root / "custom_nodes"
    nodes.mkdir()
    (nodes / "fair_adaptors").symlink_to(harness.REPO, target_is_directory=True)
    (nodes / "fair_probe").symlink_to(harness.HERE / "probe_pack", target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def comfy(comfy_venv, workspace):
    """A running ComfyUI server over ``workspace``; yields a :class:`harness.Client` (``.server`` on it)."""
    server = harness.ComfyServer(comfy_venv, workspace)
    try:
        TIMINGS["server start"] = server.start()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    client = harness.Client(server.url)
    client.server = server
    yield client
    rss = subprocess.run(["ps", "-o", "rss=", "-p", str(server.process.pid)], capture_output=True, text=True).stdout
    if rss.strip():
        TIMINGS["server memory at the end: RSS"] = int(rss) / 1e6
    server.stop()
