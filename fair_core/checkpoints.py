"""Training checkpoints: ``<output_dir>/checkpoints/iter_XXXXXXX/`` written atomically, pruned, and read back with a
fallback to the newest checkpoint that loads.

A checkpoint folder holds ``trainable.safetensors`` and ``ema.safetensors`` (the trained tensors ``p0..pN`` in the
trainer's parameter order), ``optimizer.pt`` and ``lr_schedule.pt`` (tensors and plain values only, read with
``weights_only=True``) and ``state.json``. It is written into ``iter_XXXXXXX.tmp-<pid>`` and renamed, so a
finished name is always complete; temp folders left by a killed run are removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "iter_"
TEMPORARY_MARK = ".tmp-"
DAMAGED_MARK = ".damaged"
_FINISHED = re.compile(rf"{CHECKPOINT_PREFIX}\d{{7}}")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read back (CPU tensors)."""

    path: Path
    trainable: list[torch.Tensor]
    ema: list[torch.Tensor]
    optimizer: dict[str, Any]
    lr_schedule: dict[str, Any]
    state: dict[str, Any]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def finished_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders (no temp folders), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _FINISHED.fullmatch(p.name))


def write_checkpoint(output_dir: str | Path, iteration: int, trainable: Sequence[torch.Tensor],
                     ema: Sequence[torch.Tensor], optimizer: dict, lr_schedule: dict, state: dict,
                     keep: int) -> Path:
    """Write ``iter_<iteration>`` atomically (temp folder + rename), then delete all but the newest ``keep``
    finished checkpoints. Returns the folder."""
    directory = checkpoint_root(output_dir) / f"{CHECKPOINT_PREFIX}{iteration:07d}"
    temporary = directory.with_name(directory.name + f"{TEMPORARY_MARK}{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file({f"p{i}": t.detach().cpu().contiguous() for i, t in enumerate(trainable)}, temporary / "trainable.safetensors")
    save_file({f"p{i}": t.detach().cpu().contiguous() for i, t in enumerate(ema)}, temporary / "ema.safetensors")
    torch.save(optimizer, temporary / "optimizer.pt")
    torch.save(lr_schedule, temporary / "lr_schedule.pt")
    (temporary / "state.json").write_text(json.dumps(state))
    if directory.exists():
        shutil.rmtree(temporary)
        raise ValueError(f"{directory} already exists: {output_dir} holds another run; resume it or use a new output_dir")
    os.replace(temporary, directory)
    for old in finished_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def read_checkpoint(directory: Path, count: int) -> Checkpoint:
    """Read one checkpoint of ``count`` trained tensors; ``ValueError`` naming the folder and the problem."""
    try:
        trainable, ema = load_file(directory / "trainable.safetensors"), load_file(directory / "ema.safetensors")
        optimizer = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        lr_schedule = torch.load(directory / "lr_schedule.pt", weights_only=True)
        state = json.loads((directory / "state.json").read_text())
    except (OSError, SafetensorError, RuntimeError, EOFError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"checkpoint {directory} is damaged: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if len(trainable) != count or len(ema) != count:
        raise ValueError(f"checkpoint {directory} holds {len(trainable)} tensors, this run trains {count}: different config?")
    return Checkpoint(directory, [trainable[f"p{i}"] for i in range(count)], [ema[f"p{i}"] for i in range(count)],
                      optimizer, lr_schedule, state)


def read_latest_checkpoint(output_dir: str | Path, count: int, log=print) -> Checkpoint | None:
    """The newest checkpoint that reads, None when there is none. Temp folders of killed runs are removed; a
    damaged checkpoint is reported with ``log``, kept as ``iter_XXXXXXX.damaged`` (so the run can write that
    iteration again) and the one before it is tried. A checkpoint of another configuration (tensor count) is an
    error, not a fallback."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for stale in root.glob(f"{CHECKPOINT_PREFIX}*{TEMPORARY_MARK}*"):
            shutil.rmtree(stale, ignore_errors=True)
    for directory in reversed(finished_checkpoints(output_dir)):
        try:
            return read_checkpoint(directory, count)
        except ValueError as error:
            if "different config" in str(error):
                raise
            kept = directory.with_name(directory.name + DAMAGED_MARK)
            os.replace(directory, kept)
            log(f"{error}; kept as {kept.name}, trying the previous checkpoint")
    return None


RUN_CONFIG = "run_config.json"
RESUMABLE_CHANGES = frozenset({"output_dir", "log_with", "device", "checkpoint_every", "keep_checkpoints",
                               "validate_every", "val_images_per_prompt", "val_steps", "val_max_prompts"})
"""Config keys a resumed run may change: where and how often it reports, not what it learns."""


def check_run_folder(output_dir: str | Path, settings: dict[str, Any], resume: bool) -> None:
    """The run-folder guard, before any model loads.

    A fresh run into a folder holding another run's checkpoints is refused (its ``validation_before.json`` and
    checkpoints would be mixed into the new run). A resumed run must have the settings the folder's run started
    with (``run_config.json``), except :data:`RESUMABLE_CHANGES`; the changed keys are named. A fresh run records
    its settings there.
    """
    path = Path(output_dir) / RUN_CONFIG
    found = finished_checkpoints(output_dir)
    if not resume:
        if found:
            raise ValueError(f"{output_dir} holds another run (checkpoints up to {found[-1].name}); "
                             "pass --resume to continue it, or set output_dir to a new folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str))
        return
    if not path.is_file():
        if found:
            raise ValueError(f"{output_dir} has checkpoints but no {RUN_CONFIG}: cannot check that --resume "
                             "continues the same run; start a new output_dir")
        return check_run_folder(output_dir, settings, resume=False)
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged ({error.msg}); start a new output_dir") from None
    current = json.loads(json.dumps(settings, default=str))
    changed = sorted(k for k in set(stored) | set(current)
                     if k not in RESUMABLE_CHANGES and stored.get(k) != current.get(k))
    if changed:
        shown = ", ".join(f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in changed)
        raise ValueError(f"--resume with other settings than the run in {output_dir}: {shown}; "
                         "resume with the same settings or start a new output_dir")
