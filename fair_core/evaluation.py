"""``fair eval``: generate images with stable per-image seeds, score them, cache results per image, summarise.

Image ``j`` of prompt ``P`` gets the noise seed ``stable_seed(P, j, base_seed)`` in every run, process and
machine. Results go to ``<out>/cache/<variant>.jsonl``, one line per image, appended per batch, so a killed run
resumes without regenerating finished images.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fair_core.metrics import BiasSummary, Predictions, compare_bias, summarise_bias
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


def image_seed(prompt: str, index: int, base_seed: int) -> int:
    """Noise seed of image ``index`` of ``prompt``: ``stable_seed(prompt, index, base_seed)``."""
    return stable_seed(prompt, index, base_seed)


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


def score_records(scorer: AttributeScorer, images: torch.Tensor, prompts: Sequence[str], indices: Sequence[int],
                  seeds: Sequence[int | None]) -> list[dict]:
    """One JSON-ready record per image of ``images`` ``(N, 3, H, W)`` in ``[-1, 1]``."""
    with torch.no_grad():
        scores = scorer(images)
    probabilities = scores.probabilities()
    boxes = scores.boxes.cpu().numpy() if scores.boxes is not None else None
    records = []
    for i, (prompt, index, seed) in enumerate(zip(prompts, indices, seeds)):
        box = None if boxes is None or np.isnan(boxes[i]).any() else [round(float(v), 2) for v in boxes[i]]
        records.append({
            "prompt": prompt, "index": int(index), "seed": seed, "has_face": bool(scores.has_face[i]), "box": box,
            "probs": {a.name: [round(float(v), 6) for v in p[i]] for a, p in zip(scorer.attributes, probabilities)},
        })
    return records


def generate_and_score(parts: DiffusionParts, scorer: AttributeScorer, prompts: Sequence[str], settings: EvalSettings,
                       cache_path: Path, soft_prompt=None, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Records of every (prompt, image) in prompt-then-index order; images already in the cache are not redone."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_cache(cache_path)
    jobs = [(p, j) for p in prompts for j in range(settings.images_per_prompt)]
    missing = [job for job in jobs if job not in done]
    with cache_path.open("a", encoding="utf-8") as cache:
        for start in range(0, len(missing), settings.batch_size):
            batch = missing[start : start + settings.batch_size]
            batch_prompts = [p for p, _ in batch]
            seeds = [image_seed(p, j, settings.seed) for p, j in batch]
            images = generate_images(parts, batch_prompts, seeds, settings.num_steps, settings.guidance_scale,
                                     soft_prompt=soft_prompt, batch_size=settings.batch_size, device=settings.device)
            for record in score_records(scorer, images.to(settings.device), batch_prompts, [j for _, j in batch], seeds):
                cache.write(json.dumps(record) + "\n")
                done[(record["prompt"], record["index"])] = record
            cache.flush()
            if progress is not None:
                progress(start + len(batch), len(missing))
    return [done[job] for job in jobs]


def predictions_of(records: Sequence[dict], target: TargetDistribution) -> dict[str, Predictions]:
    """Per prompt, :class:`Predictions` in ``target``'s attribute order."""
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"], []).append(record)
    result = {}
    for prompt, rows in by_prompt.items():
        missing = [n for n in target.names if n not in rows[0]["probs"]]
        if missing:
            raise ValueError(f"the classifier does not predict {missing} (it has {list(rows[0]['probs'])})")
        probs = [np.array([r["probs"][n] for r in rows]) for n in target.names]
        result[prompt] = Predictions(probs, np.array([r["has_face"] for r in rows], dtype=bool))
    return result


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
    summaries: dict[str, BiasSummary] = {n: summarise_bias(p, target, reference, seed=seed) for n, p in predictions.items()}
    first = next(iter(predictions))
    changes = {n: compare_bias(predictions[first], p, target, reference, seed=seed)
               for n, p in predictions.items() if n != first}
    return {"target": target.to_json(), "summaries": {n: s.to_json() for n, s in summaries.items()},
            "changes": {n: c.to_json() for n, c in changes.items()}, "baseline": first}


def write_report(out: Path, summary: dict) -> Path:
    """``report.html`` (offline: charts embedded as base64 PNG) plus ``chart_<group>.png`` per attribute group."""
    import base64
    import html

    from fair_core.plots import distribution_chart

    summaries = summary["summaries"]
    groups = next(iter(summaries.values()))["overall"]["groups"]
    rows, charts = [], []
    for group, figures in groups.items():
        series = {v: [x if x is not None else 0.0 for x in s["overall"]["groups"][group]["frequencies"]["estimate"]]
                  for v, s in summaries.items()}
        series["target"] = figures["target"]
        path = distribution_chart(out / f"chart_{group.replace(' ', '')}.png", figures["classes"], series, title=group)
        charts.append(f'<h3>{html.escape(group)}</h3><img src="data:image/png;base64,'
                      f'{base64.b64encode(path.read_bytes()).decode()}">')
        for variant, s in summaries.items():
            bias = s["overall"]["groups"][group]["bias"]
            rows.append(f"<tr><td>{html.escape(variant)}</td><td>{html.escape(group)}</td>"
                        f"<td>{bias['estimate']:.3f} [{bias['low']:.3f}, {bias['high']:.3f}]</td></tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>fair eval</title><h1>fair eval report</h1>"
            "<table border=1><tr><th>variant</th><th>group</th><th>bias (95% CI)</th></tr>" + "".join(rows) + "</table>"
            + "".join(charts))
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report
