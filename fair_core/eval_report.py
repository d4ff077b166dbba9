"""The ``fair eval`` report folder: paired image grids and an offline ``report.html``.

``report.html`` has the overall table (bias, distance to the target, face rate, classifier
uncertainty, 95% bootstrap intervals), the paired change of every variant against the first, a
per-prompt change table, the class-share charts (embedded PNG) and, per prompt, the paired grid (same
seeds, one row per variant; linked from ``grids/``, so the folder opens offline as it is).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

from fair_core.evaluation import prompt_slug
from fair_core.plots import distribution_chart

LABEL_WIDTH = 110
GAP = 2


def write_paired_grids(out: Path, variants: Sequence[str], prompts: Sequence[str]) -> dict[str, Path]:
    """``out/grids/<slug>.png`` per prompt: row ``v`` holds ``out/images/<v>/<slug>/<j>.png``, ``j = 0, 1, ...``
    (the same seeds in every row). Prompts without thumbnails are left out. Grids an earlier run into ``out`` wrote
    for prompts this run does not have are removed (they are listed in ``grids/written.json``); nothing else is."""
    grids = {}
    record = out / "grids" / "written.json"
    earlier = json.loads(record.read_text()) if record.is_file() else []
    for prompt in prompts:
        slug = prompt_slug(prompt)
        rows = []
        for variant in variants:
            folder = out / "images" / variant / slug
            files = sorted(folder.glob("*.png"), key=lambda f: int(f.stem)) if folder.is_dir() else []
            rows.append((variant, [Image.open(f).convert("RGB") for f in files]))
        columns = max((len(tiles) for _, tiles in rows), default=0)
        if columns == 0:
            continue
        size = max(t.size[0] for _, tiles in rows for t in tiles)
        canvas = Image.new("RGB", (LABEL_WIDTH + columns * (size + GAP) + GAP, len(rows) * (size + GAP) + GAP), "white")
        draw = ImageDraw.Draw(canvas)
        for r, (variant, tiles) in enumerate(rows):
            top = GAP + r * (size + GAP)
            draw.text((4, top + size // 2 - 6), variant[:16], fill="black")
            for c, tile in enumerate(tiles):
                canvas.paste(tile.resize((size, size), Image.Resampling.NEAREST), (LABEL_WIDTH + GAP + c * (size + GAP), top))
        path = out / "grids" / f"{slug}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
        grids[prompt] = path
    for name in set(earlier) - {path.name for path in grids.values()}:
        (out / "grids" / Path(name).name).unlink(missing_ok=True)
    if grids:
        record.write_text(json.dumps(sorted(path.name for path in grids.values())))
    return grids


def _interval(figure: Mapping | None, signed: bool = False) -> str:
    if not figure or figure.get("estimate") is None:
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    low, high = figure.get("low"), figure.get("high")
    bounds = f" [{fmt.format(low)}, {fmt.format(high)}]" if low is not None and high is not None else ""
    return fmt.format(figure["estimate"]) + bounds


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(out: Path, summary: dict, grids: Mapping[str, Path] | None = None, notes: Sequence[str] = ()) -> Path:
    """Write ``chart_<group>.png`` per attribute group and ``report.html``; returns the HTML path."""
    summaries, changes, baseline = summary["summaries"], summary.get("changes", {}), summary["baseline"]
    groups = list(summaries[baseline]["overall"]["groups"])
    overall_rows, charts = [], []
    for group in groups:
        figures = summaries[baseline]["overall"]["groups"][group]
        series = {v: [x if x is not None else 0.0 for x in s["overall"]["groups"][group]["frequencies"]["estimate"]]
                  for v, s in summaries.items()}
        series["target"] = figures["target"]
        chart = distribution_chart(out / f"chart_{prompt_slug(group)}.png", figures["classes"], series,
                                   title=f"{group}: class shares (mean over prompts)")
        charts.append(f'<h3>{html.escape(group)}</h3><img alt="{html.escape(group)} chart" '
                      f'src="data:image/png;base64,{base64.b64encode(chart.read_bytes()).decode()}">')
        for variant, s in summaries.items():
            o = s["overall"]
            g = o["groups"][group]
            uncertainty = "; ".join(f"{k} {_interval(v)}" for k, v in o.get("uncertainty", {}).items())
            overall_rows.append([variant, group, _interval(g.get("distance")), _interval(g["bias"]),
                                 _interval(o["face_rate"]), uncertainty or "–", str(o["num_faces"])])
    change_rows, prompt_rows = [], []
    for variant, change in changes.items():
        for group in groups:
            c = change["overall"]["groups"][group]
            change_rows.append([f"{variant} − {baseline}", group, _interval(c.get("distance"), True), _interval(c["bias"], True)])
        for prompt, figures in change["prompts"].items():
            for group in groups:
                before = summaries[baseline]["prompts"][prompt]["groups"][group]["bias"]
                after = summaries[variant]["prompts"][prompt]["groups"][group]["bias"]
                prompt_rows.append([prompt, group, f"{variant} − {baseline}", _interval(before), _interval(after),
                                    _interval(figures["groups"][group]["bias"], True)])
    if not changes:  # one variant: per-prompt bias
        for prompt, figures in summaries[baseline]["prompts"].items():
            for group in groups:
                prompt_rows.append([prompt, group, baseline, _interval(figures["groups"][group]["bias"]), "", ""])
    grid_html = "".join(
        f"<details><summary>{html.escape(p)}</summary><img alt='grid' src='{html.escape(path.relative_to(out).as_posix())}'></details>"
        for p, path in (grids or {}).items())
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;font-size:13px}th{background:#eee}"
             "img{max-width:100%}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fair eval</title><style>{style}</style></head><body>"
        "<h1>fair eval report</h1>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + "<h2>Overall (mean over prompts, 95% bootstrap intervals)</h2>"
        + _table(["variant", "group", "distance to target (TV)", "bias (distance from uniform)", "face rate", "uncertain",
                  "faces"], overall_rows)
        + ("<h2>Paired change (same seeds)</h2>" + _table(["change", "group", "distance to target", "bias"], change_rows)
           if change_rows else "")
        + "<h2>Per prompt</h2>"
        + _table(["prompt", "group", "variant", "bias before", "bias after", "change (95% paired)"], prompt_rows)
        + "<h2>Class shares</h2>" + "".join(charts)
        + ("<h2>Paired grids (rows: variants; columns: the same seeds)</h2>" + grid_html if grid_html else "")
        + "</body></html>"
    )
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report
