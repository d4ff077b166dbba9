"""The Bias Audit chart as a user sees it: headless Chromium opens the real server's page, loads the image-audit
example workflow (UI format), queues it, and the chart drawn by web/fair_audit_chart.js is read back and
screenshotted. Needs a Chromium binary (Debian: apt-get install chromium); skipped without one.

Set FAIR_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from harness import HERE
from pack_files import FACE_IMAGE, TIMINGS
from workflow_format import EXAMPLES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
OBSERVED_BAR = (0x4A, 0x78, 0xC2)  # COLOURS.observed in web/fair_audit_chart.js


def _pixels_of(picture: Image.Image, colour: tuple[int, int, int]) -> int:
    rgb = np.asarray(picture.convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(colour)).sum(axis=-1) <= 6).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")
def test_the_chart_is_drawn_in_the_bias_audit_node_in_a_real_browser(comfy, comfy_venv, tmp_path):
    workflow = json.loads((EXAMPLES / "audit_an_image.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "LoadImage":
            node["widgets_values"][0] = FACE_IMAGE
    workflow_file = tmp_path / "workflow.json"
    workflow_file.write_text(json.dumps(workflow))
    out = os.environ.get("FAIR_SCREENSHOT") or str(tmp_path / "bias_audit_node.png")
    import time

    started = time.monotonic()
    result = subprocess.run([str(comfy_venv / "bin" / "python"), str(HERE / "browser_driver.py"), CHROMIUM,
                             comfy.server.url, str(workflow_file), out], capture_output=True, text=True, timeout=600)
    TIMINGS["browser: load, queue, screenshot"] = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["report"]["summary"]["num_faces"] == 1  # the payload reached the node in the page
    chart = Image.open(io.BytesIO(base64.b64decode(seen["chart"].split(",", 1)[1])))
    assert chart.size == (360, 190)
    assert _pixels_of(chart, OBSERVED_BAR) > 200  # observed-share bars were drawn, not just the placeholder text
    screenshot = Image.open(out)
    assert _pixels_of(screenshot, OBSERVED_BAR) > 200  # ... and are on screen inside the node
