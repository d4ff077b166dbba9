"""``fair eval``: generate images with stable per-image seeds (or read a folder), score them, cache results
per image, summarise, and write a report.

Image ``j`` of prompt ``P`` gets the noise seed ``stable_seed(P, j, base_seed)`` in every run, process and
machine. Results go to ``<out>/cache/<variant>.jsonl``, one line per image, appended per batch, so a killed run
resumes without regenerating finished images; ``<variant>.settings.json`` beside it records what the
records depend on, and a rerun with other settings into the same folder is refused. The first
``grid_images`` images of each prompt are kept as PNG thumbnails under ``<out>/images/<variant>/`` for the
paired grids (same seeds, one row per variant).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fair_core.audit import ImageCallback, predictions_of, score_records, summarise_records
from fair_core.metrics import BiasSummary, compare_bias
from fair_core.models import DiffusionParts
from fair_core.prompts import stable_seed
from fair_core.sampling import generate_images
from fair_core.scoring import AttributeScorer
from fair_core.targets import TargetDistribution


@dataclass
class EvalSettings:
    """Generation settings shared by every variant (so all variants use the same seeds)."""

    images_per_prompt: int = 8
    num_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    grid_images: int = 8
    """Images per prompt kept as thumbnails for the paired grids."""
    prompt_encoding: str = "host"
    """How every variant's prompts are tokenised (``host`` or ``paper``, see :func:`choose_prompt_encoding`)."""

    def fingerprint(self, identity: dict) -> dict:
        """What cached records depend on: these settings (not batch size, device or grid size) plus
        ``identity`` (model, adaptor and classifier names/hashes)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "device", "grid_images")}
        return {"settings": settings, **identity}


THUMBNAIL_SIZE = 128


def choose_prompt_encoding(requested: str, adaptor_paths: Sequence[str | Path]) -> str:
    """The prompt encoding of an evaluation: ``host`` or ``paper`` as asked, or for ``auto`` the one the adaptors
    were trained with (their ``training_args``; a converted released checkpoint says ``paper``). Every variant,
    the base model included, uses it, so the comparison stays paired. Adaptors that disagree need a choice."""
    if requested != "auto":
        return requested
    from fair_core.adaptor import FairMetadata
    from fair_core.adaptor.hosts import read_safetensors_header

    recorded = {str(path): FairMetadata.from_metadata(read_safetensors_header(path)[1]).prompt_encoding
                for path in adaptor_paths}
    if len(set(recorded.values())) > 1:
        shown = ", ".join(f"{Path(p).name}: {e}" for p, e in recorded.items())
        raise ValueError(f"the adaptors were trained with different prompt encodings ({shown}); "
                         "choose one with --prompt-encoding host|paper")
    return next(iter(recorded.values()), "host")


def image_seed(prompt: str, index: int, base_seed: int) -> int:
    """Noise seed of image ``index`` of ``prompt``: ``stable_seed(prompt, index, base_seed)``."""
    return stable_seed(prompt, index, base_seed)


def prompt_slug(prompt: str) -> str:
    """A file-name-safe stem for a prompt, unique per prompt: a readable part (lower case ``[a-z0-9_]``, at most
    50 characters) and 8 hex digits of the prompt's sha256, so prompts differing only in case, punctuation,
    non-ASCII letters or past the 50th character never share a file."""
    readable = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:50] or "prompt"
    return f"{readable}_{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"


def check_cache_settings(cache_path: Path, fingerprint: dict) -> None:
    """Write ``<cache>.settings.json`` on first use; raise ValueError if it records other settings."""
    settings_path = cache_path.with_suffix(".settings.json")
    if settings_path.is_file():
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        if stored != fingerprint:
            old, new = _flat(stored), _flat(fingerprint)
            changed = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})"
                                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise ValueError(f"{cache_path} holds results made with other settings (differs in: {changed}); "
                             "use a new --out folder or delete that cache")
    elif cache_path.is_file() and cache_path.stat().st_size > 0:
        raise ValueError(f"{cache_path} has no settings record; use a new --out folder or delete that cache")
    else:
        settings_path.parent.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True), encoding="utf-8")


def _flat(data: dict, prefix: str = "") -> dict:
    """``{"settings": {"seed": 0}}`` -> ``{"settings.seed": 0}``."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def thumbnail_saver(folder: Path, count: int) -> ImageCallback:
    """An ``on_images`` callback writing images ``j < count`` as ``folder/<prompt slug>/<j>.png`` (at most
    :data:`THUMBNAIL_SIZE` px) for :func:`write_paired_grids`."""
    from PIL import Image

    from fair_core.images import tensor_to_uint8

    def save(batch_prompts: Sequence[str], indices: Sequence[int], images: torch.Tensor) -> None:
        tiles = tensor_to_uint8(images)
        for prompt, index, tile in zip(batch_prompts, indices, tiles):
            if index < count:
                picture = Image.fromarray(tile)
                picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                path = folder / prompt_slug(prompt) / f"{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                picture.save(path)

    return save


def _read_cache(path: Path) -> dict[tuple[str, int], dict]:
    records = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that image is redone
                    continue
                records[(record["prompt"], record["index"])] = record
    return records


def generate_and_score(parts: DiffusionParts, scorer: AttributeScorer, prompts: Sequence[str], settings: EvalSettings,
                       cache_path: Path | None = None, on_images: ImageCallback | None = None,
                       description: str = "fair eval") -> list[dict]:
    """Records of every (prompt, image) in prompt-then-index order, with a progress bar.

    With ``cache_path``, finished images are read from it and not redone, new ones appended per batch.
    ``on_images(prompts, indices, images)`` sees each generated batch (``(n, 3, H, W)`` in [-1, 1]).
    """
    from tqdm.auto import tqdm

    done = _read_cache(cache_path) if cache_path is not None else {}
    jobs = [(p, j) for p in prompts for j in range(settings.images_per_prompt)]
    missing = [job for job in jobs if job not in done]
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        cache = stack.enter_context(cache_path.open("a", encoding="utf-8")) if cache_path is not None else None
        bar = stack.enter_context(tqdm(total=len(jobs), initial=len(jobs) - len(missing), desc=description, unit="img",
                                       dynamic_ncols=True))
        for start in range(0, len(missing), settings.batch_size):
            batch = missing[start : start + settings.batch_size]
            batch_prompts, indices = [p for p, _ in batch], [j for _, j in batch]
            seeds = [image_seed(p, j, settings.seed) for p, j in batch]
            images = generate_images(parts, batch_prompts, seeds, settings.num_steps, settings.guidance_scale,
                                     batch_size=settings.batch_size, device=settings.device)
            if on_images is not None:
                on_images(batch_prompts, indices, images)
            records = score_records(scorer, images.to(settings.device), batch_prompts, indices, seeds)
            done.update({(r["prompt"], r["index"]): r for r in records})
            if cache is not None:
                cache.write("".join(json.dumps(r) + "\n" for r in records))
                cache.flush()
            bar.update(len(batch))
    return [done[job] for job in jobs]


def write_csv(path: Path, variants: dict[str, list[dict]]) -> Path:
    """Per-image CSV: variant, prompt, index, seed, has_face, box, probabilities, predicted class per attribute."""
    first = next(iter(variants.values()))[0]
    names = list(first["probs"])
    header = ["variant", "prompt", "index", "seed", "has_face", "box"]
    header += [f"p_{n}_{k}" for n in names for k in range(len(first["probs"][n]))] + [f"pred_{n}" for n in names]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for variant, records in variants.items():
            for r in records:
                probs = [f"{v:.6f}" for n in names for v in r["probs"][n]]
                preds = [int(np.argmax(r["probs"][n])) if r["has_face"] else -1 for n in names]
                box = " ".join(f"{v:.1f}" for v in r["box"]) if r["box"] else ""
                writer.writerow([variant, r["prompt"], r["index"], r["seed"], int(r["has_face"]), box, *probs, *preds])
    return path


def summarise_variants(variants: dict[str, list[dict]], target: TargetDistribution,
                       reference: TargetDistribution | None = None, seed: int = 0) -> dict:
    """summary.json content: per-variant :class:`BiasSummary` and the paired change of each variant vs the first."""
    predictions = {name: predictions_of(records, target) for name, records in variants.items()}
    summaries: dict[str, BiasSummary] = {n: summarise_records(r, target, reference, seed) for n, r in variants.items()}
    first = next(iter(predictions))
    changes = {n: compare_bias(predictions[first], p, target, reference, seed=seed)
               for n, p in predictions.items() if n != first}
    return {"target": target.to_json(), "summaries": {n: s.to_json() for n, s in summaries.items()},
            "changes": {n: c.to_json() for n, c in changes.items()}, "baseline": first}
