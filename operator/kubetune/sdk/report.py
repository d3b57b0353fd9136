"""The before/after report: one self-contained HTML page (no network, no JavaScript).

For sample queries it shows the top-k images of the starting model and of the fine-tuned model side by side
(thumbnails embedded as data URIs, relevant ones outlined green), the retrieval metric table, and the loss
and metric curves as inline SVG.

Where the pictures come from: the artifact holds the fine-tuned towers, the run's spec (metadata.json) and
the metrics. The starting model is rebuilt from the spec exactly as the trainer built it (same seed, same
pretrained tag or weights), and both models rank the run's evaluation data (query/eval set, or the same
validation split of the training data). The recomputed "before" metrics are checked against the run's own;
the page says so when they differ. Curves come from ``events.jsonl`` beside a local run's artifact (per
step), else from the per-epoch history in metadata.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.errors import ArtifactMissing
from kubetune.sdk.models import artifact_root

CURVE_METRICS = ("R@1", "R@5", "reciprocal_rank", "image_to_text_R@1")
KEY_METRICS = ("R@1", "R@5", "R@10", "reciprocal_rank", "ndcg_at_k", "average_precision", "precision_at_k",
               "recall_at_k", "hit_at_k", "mean_rank", "median_rank")
LOWER_IS_BETTER = {"mean_rank", "median_rank"}
THUMB = 96
MAX_QUERIES = 6


@dataclass
class QueryResult:
    text: str
    before: list[tuple[int, float, bool]]  # (index position, score, relevant)
    after: list[tuple[int, float, bool]]


@dataclass
class ReportData:
    title: str
    metrics: dict[str, dict[str, float]]
    queries: list[QueryResult]
    thumbnails: list[str]  # data URIs by index position
    curves: dict[str, list[tuple[float, float]]]  # name → (x, y)
    metric_curves: dict[str, list[tuple[float, float]]]
    notes: list[str] = field(default_factory=list)
    frontier: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # WiSE-FT: metric by α
    frontier_title: str = ""
    info: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ compute
def _thumbnail(image: Any) -> str:
    copy = image.copy()
    copy.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    copy.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _local_output(spec: Any) -> Any:
    """``spec.output`` with S3 as this machine sees it (``$KUBETUNE_S3_ENDPOINT``; the spec has the pods' view)."""
    endpoint = os.environ.get("KUBETUNE_S3_ENDPOINT")
    return spec.output.model_copy(update={"endpoint": endpoint}) if endpoint else spec.output


def _mirror_root(start: dict[str, Any]) -> str | None:
    """The model mirror the run's weights came from, as the artifact recorded it, else ``$KUBETUNE_MODEL_MIRROR``."""
    return start.get("mirror") or os.environ.get("KUBETUNE_MODEL_MIRROR") or None


def _load_eval(spec: Any, work: Path) -> tuple[Any, Any]:
    """(query PairSet, index PairSet) as the trainer evaluated them."""
    from kubetune_trainer.data import Fetcher, load_datasets, load_set

    fetcher = Fetcher(work / "cache", _local_output(spec))
    data = spec.data
    if data.query or data.eval:
        query = load_set("query", data.query or data.eval, data, fetcher)
        index = load_set("index", data.index, data, fetcher) if data.index else query
        return query, index
    sets = load_datasets(data, fetcher, spec.training.seed)
    if sets.query is None or sets.index is None:
        raise ArtifactMissing("the run had no evaluation data (no eval/query data and no valSplit)",
                              "pass queries with --query and an eval set in the spec, or use valSplit")
    return sets.query, sets.index


def _before_model(spec: Any, start: dict[str, Any], work: Path) -> Any:
    """The starting model, as the trainer built it; its weights from the mirror the run used, when it used one
    (a cluster without internet has no other source)."""
    import torch
    from kubetune_trainer import model as model_lib
    from kubetune_trainer.data import Fetcher
    from kubetune_trainer.run import fetch_weights

    output = _local_output(spec)
    torch.manual_seed(spec.training.seed)  # as the trainer did: a random init is reproduced exactly
    weights = fetch_weights(spec.model.weights, Fetcher(work / "cache", output), spec, work) \
        if spec.model.weights else None
    mirror = model_lib.mirror_store(_mirror_root(start), output)
    return model_lib.build(spec.model, torch.device("cpu"), "fp32", work, weights, mirror=mirror)


def compute(artifact: str | os.PathLike[str], queries: list[str] | None = None, top_k: int = 5,
            max_queries: int = MAX_QUERIES) -> ReportData:
    import torch
    import torch.nn.functional as F
    from kubetune_trainer import evaluate, export

    from kubetune.api.spec import FinetuneRunSpec

    root = artifact_root(artifact)
    metadata = json.loads((root / "metadata.json").read_text())
    metrics = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").is_file() else {}
    spec = FinetuneRunSpec.model_validate(metadata["spec"])
    limit = spec.callbacks.evaluation.limit
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-report-") as tmp:
        work = Path(tmp)
        query_set, index_set = _load_eval(spec, work)
        queries_kv = query_set.keyed()[: spec.callbacks.evaluation.max_queries or None]
        task = evaluate.RetrievalTask.build(queries_kv, index_set.keyed())
        by_key = {p.image.key: p.image for p in index_set.pairs}
        # only references: the index is decoded a batch at a time while encoding, and again for the thumbnails shown
        images = [by_key[k] for k in task.index_keys]

        def rank(encode_text: Any, tokenizer: Any, encode_image: Any, transform: Any, texts: list[str]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                text = torch.cat([encode_text(tokenizer(texts[i:i + 256])) for i in range(0, len(texts), 256)])
                pixels = (torch.stack([transform(ref.open()) for ref in images[i:i + 128]])
                          for i in range(0, len(images), 128))
                image = torch.cat([encode_image(batch) for batch in pixels])
            return F.normalize(text.float(), dim=-1), F.normalize(image.float(), dim=-1)

        before_bundle = _before_model(spec, metadata.get("start") or {}, work)
        net = before_bundle.model.eval()
        all_texts = task.query_texts
        b_text, b_image = rank(net.encode_text, before_bundle.tokenizer, net.encode_image,
                               before_bundle.preprocess_val, all_texts)
        text_tower = export.load_tower(root / "clip-text")
        vision_tower = export.load_tower(root / "clip-vision")
        a_text, a_image = rank(text_tower, export.load_tokenizer(root / "clip-text"), vision_tower,
                               export.load_image_transform(root / "clip-vision"), all_texts)

        recomputed = evaluate.both_directions(b_text, b_image, task, k=limit,
                                              distance=spec.callbacks.evaluation.distance)
        saved_before = metrics.get("before") or {}
        if saved_before and abs(recomputed.get("R@5", 0.0) - saved_before.get("R@5", 0.0)) > 1e-3:
            notes.append("The starting model rebuilt for this page ranks differently from the run's own "
                         f"evaluation (R@5 {recomputed['R@5']:.3f} here vs {saved_before['R@5']:.3f} in the run): "
                         "the 'before' pictures are indicative only.")
        if not metrics.get("after"):
            metrics["after"] = evaluate.both_directions(a_text, a_image, task, k=limit,
                                                        distance=spec.callbacks.evaluation.distance)
            metrics.setdefault("before", recomputed)

        # sample queries: the user's, else distinct query texts spread over the set
        relevant_by_text: dict[str, set[int]] = {}
        for text, ids in zip(task.query_texts, task.relevant, strict=True):
            relevant_by_text.setdefault(text, set()).update(ids)
        if queries:
            samples = list(dict.fromkeys(queries))
        else:
            distinct = list(dict.fromkeys(task.query_texts))
            step = max(1, len(distinct) // max_queries)
            samples = distinct[::step][:max_queries]
        results = []
        with torch.no_grad():
            sb = F.normalize(net.encode_text(before_bundle.tokenizer(samples)).float(), dim=-1)
            sa = F.normalize(text_tower(export.load_tokenizer(root / "clip-text")(samples)).float(), dim=-1)
        k = min(top_k, len(images))
        for i, text in enumerate(samples):
            rel = relevant_by_text.get(text, set())
            tops = []
            for q, index_emb in ((sb[i], b_image), (sa[i], a_image)):
                scores = index_emb @ q
                values, order = scores.topk(k)
                tops.append([(int(j), float(v), int(j) in rel) for v, j in zip(values, order, strict=True)])
            results.append(QueryResult(text, tops[0], tops[1]))
        used = sorted({j for r in results for j, _, _ in (*r.before, *r.after)})
        thumbnails = [""] * len(images)
        for j in used:
            thumbnails[j] = _thumbnail(images[j].open())

    curves, metric_curves = _curves(root, metadata, metrics)
    run = metadata.get("run", {})
    training = metadata.get("training", {})
    info = {
        "run": f"{run.get('namespace', '?')}/{run.get('name', '?')}",
        "model": spec.model.name + (f" ({spec.model.pretrained})" if spec.model.pretrained else ""),
        "training": f"{training.get('epochs_completed', '?')} epochs, {training.get('steps', '?')} steps, "
                    f"{training.get('device', '?')}, {training.get('precision', '?')}",
        "evaluation": f"{len(task.query_texts)} queries over {len(images)} images, top {limit}",
        "created": str(metadata.get("created", "")),
    }
    frontier, frontier_title = wise_ft_frontier(metrics)
    return ReportData(title=f"kubetune report: {run.get('name', root.name)}", metrics=metrics, queries=results,
                      thumbnails=thumbnails, curves=curves, metric_curves=metric_curves, notes=notes, info=info,
                      frontier=frontier, frontier_title=frontier_title)


Curves = dict[str, list[tuple[float, float]]]


def wise_ft_frontier(metrics: dict[str, Any]) -> tuple[Curves, str]:
    """The WiSE-FT sweep of metrics.json as curves by α (target, reference) and a title naming the chosen α."""
    sweep = metrics.get("wise_ft") or {}
    name = sweep.get("metric", "")
    curves: Curves = {}
    for key, label in (("target", f"{name} target"), ("reference", f"{name} reference"),
                       ("zero_shot", "zero-shot top-1")):
        points = [(float(p["alpha"]), float(p[key])) for p in sweep.get("frontier") or []
                  if isinstance(p.get(key), (int, float))]
        if points:
            curves[label] = points
    title = f"WiSE-FT frontier (α = {sweep['alpha']:g} chosen)" if curves and "alpha" in sweep else ""
    return curves, title


def _curves(root: Path, metadata: dict[str, Any], metrics: dict[str, Any]) -> tuple[Curves, Curves]:
    curves: dict[str, list[tuple[float, float]]] = {}
    metric_curves: dict[str, list[tuple[float, float]]] = {}
    events_path = root.parent / "events.jsonl"
    if events_path.is_file():
        from kubetune.api.events import Event

        for line in events_path.read_text().splitlines():
            try:
                event = Event.model_validate_json(line)
            except ValueError:
                continue
            if event.type == "progress" and event.step is not None and event.loss is not None:
                curves.setdefault("train loss (step)", []).append((event.step, event.loss))
            elif event.type == "evaluation" and event.metrics:
                x = 0.0 if event.stage == "before" else float(event.epoch or 0)
                for name in CURVE_METRICS:
                    if name in event.metrics:
                        metric_curves.setdefault(name, []).append((x, event.metrics[name]))
    if not metric_curves:  # no local event log: the artifact keeps every evaluation (before, epochs, after)
        stages: list[tuple[float, dict[str, Any]]] = [(0.0, metrics.get("before") or {})]
        stages += [(float(e.get("epoch", 0)), e) for e in metrics.get("epochs") or []]
        stages.append((float(metadata.get("training", {}).get("epochs_completed", 0)), metrics.get("after") or {}))
        for x, values in stages:
            for name in CURVE_METRICS:
                if isinstance(values.get(name), (int, float)):
                    metric_curves.setdefault(name, []).append((x, float(values[name])))
    history = metadata.get("training", {}).get("history", [])
    for name in ("train_loss", "val_loss"):
        points = [(float(h["step"]), float(h[name])) for h in history if h.get(name) is not None]
        if points:
            curves[f"{name.replace('_', ' ')} (epoch end)"] = points
    return curves, metric_curves


# ------------------------------------------------------------------------------------------------ render
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")


def svg_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, width: int = 520,
              height: int = 260) -> str:
    """A line chart as inline SVG (axes, ticks, legend); empty string when there is nothing to draw."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return ""
    left, right, top, bottom = 52, 12, 28, 40
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" class="ct">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="ax"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="ax"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" class="tk" text-anchor="end">{yv:.3g}</text>')
        parts.append(f'<line x1="{left}" y1="{sy(yv):.1f}" x2="{width - right}" y2="{sy(yv):.1f}" class="gr"/>')
        xv = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" class="tk" text-anchor="middle">'
                     f'{xv:.3g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" class="tk" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    for n, (name, values) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(finite) <= 30:
            parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in finite)
        parts.append(f'<rect x="{width - right - 170}" y="{top + 4 + 16 * n}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{width - right - 155}" y="{top + 13 + 16 * n}" class="tk">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#111;
padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px}.meta td{padding:1px 12px 1px 0}
table.m{border-collapse:collapse;font-size:14px}table.m th,table.m td{padding:4px 12px;border-bottom:1px solid #eee;
text-align:right}table.m th:first-child,table.m td:first-child{text-align:left}
.up{color:#15803d}.down{color:#b91c1c}
.q{margin:14px 0 22px}.q h3{font-size:15px;margin:0 0 6px}.row{display:flex;align-items:center;gap:8px;margin:4px 0}
.lbl{width:110px;font-size:13px;color:#444;flex:none}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{width:96px;height:96px;object-fit:contain;border:3px solid #d4d4d4;border-radius:4px;display:block;
background:#f5f5f5}figure.hit img{border-color:#16a34a}figure.miss img{border-color:#f87171}
.charts{display:flex;flex-wrap:wrap;gap:16px}.ct{font-size:13px;font-weight:600}.tk{font-size:11px;fill:#444}
.ax{stroke:#333}.gr{stroke:#eee}.note{background:#fff7ed;border:1px solid #fdba74;padding:8px 12px;border-radius:4px}
.legend{font-size:13px;color:#444}
"""


def render(data: ReportData) -> str:
    esc = html.escape
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(data.title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{esc(data.title)}</h1>", '<table class="meta">']
    out += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in data.info.items()]
    out.append("</table>")
    out += [f'<p class="note">{esc(n)}</p>' for n in data.notes]

    before, after = data.metrics.get("before") or {}, data.metrics.get("after") or {}
    out.append('<h2>Retrieval metrics</h2><table class="m" id="metrics"><tr><th>metric</th><th>before</th>'
               "<th>after</th><th>change</th></tr>")
    for name in [m for m in KEY_METRICS if m in before or m in after]:
        b, a = before.get(name), after.get(name)
        change = ""
        if a is not None and b is not None:
            better = (a < b) if name in LOWER_IS_BETTER else (a > b)
            change = f'<span class="{"up" if better else "down"}">{a - b:+.4f}</span>' if a != b else "0"
        out.append(f"<tr><td>{esc(name)}</td><td>{'' if b is None else f'{b:.4f}'}</td>"
                   f"<td>{'' if a is None else f'{a:.4f}'}</td><td>{change}</td></tr>")
    out.append("</table>")

    out.append('<h2>Top results before and after fine-tuning</h2><p class="legend">Green: a relevant image '
               "(same caption as the query in the evaluation data); red: not relevant.</p>")
    for n, q in enumerate(data.queries):
        out.append(f'<div class="q" id="query-{n}"><h3>“{esc(q.text)}”</h3>')
        for label, hits in (("before (start)", q.before), ("after (fine-tuned)", q.after)):
            out.append(f'<div class="row"><span class="lbl">{label}</span>')
            for rank, (j, score, relevant) in enumerate(hits, 1):
                out.append(f'<figure class="{"hit" if relevant else "miss"}"><img src="{data.thumbnails[j]}" '
                           f'alt="result {rank} for {esc(q.text)}"><figcaption>#{rank} · {score:.2f}</figcaption>'
                           "</figure>")
            out.append("</div>")
        out.append("</div>")

    charts = [svg_chart(data.curves, "Loss", "optimizer step"),
              svg_chart(data.metric_curves, "Retrieval during training", "epoch (0 = before)"),
              svg_chart(data.frontier, data.frontier_title, "α (0 = starting model, 1 = fine-tuned)")]
    charts = [c for c in charts if c]
    if charts:
        out.append('<h2>Curves</h2><div class="charts">' + "".join(charts) + "</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(target: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 queries: list[str] | None = None, top_k: int = 5) -> Path:
    """Compute and write the report for an artifact (or a local run directory); returns the HTML path."""
    root = artifact_root(target)
    path = Path(out) if out is not None else root.parent / "report.html"
    data = compute(root, queries=queries, top_k=top_k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    return path
