"""The run report: one self-contained HTML page a clinician or reviewer can trust.

No external assets (works offline; images are inlined). Every number and
every plotted point comes from metrics.json (and tsne.csv for the map), so
the page can be checked against the files next to it.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

from covidscan import atomic
from covidscan.config import RunConfig

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222;line-height:1.4}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.6rem 1rem}
.note{background:#eef5fb;border-left:4px solid #3c7dbf;padding:.6rem 1rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.external{background:#fff8f0}.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs figure{margin:0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem}
.gallery figure{margin:0;font-size:.8rem}.gallery img{width:100%;image-rendering:pixelated}
figcaption{font-size:.85rem;color:#444}
"""
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
METRIC_ROWS = (
    ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"), ("precision", "Precision (PPV)"), ("npv", "NPV"), ("f1", "F1"),
    ("fpr", "False positive rate"), ("fnr", "False negative rate"), ("fdr", "False discovery rate"),
    ("auc", "AUC-ROC"), ("auc_pr", "AUC-PR"), ("mcc", "MCC"), ("kappa", "Cohen's kappa"),
    ("brier", "Brier score"), ("ece", "Expected calibration error"),
)
SUMMARY_KEYS = ("accuracy", "sensitivity", "specificity", "f1", "auc")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _e(value: object) -> str:
    return html.escape(str(value))


def _interval(ci: dict[str, dict[str, float]], key: str) -> str:
    if key not in ci:
        return ""
    return f"{_fmt(ci[key]['low'])} – {_fmt(ci[key]['high'])}"


def _xy_chart(series: list[tuple[str, list[list[float]]]], x_label: str, y_label: str, title: str, diagonal: bool = True) -> str:
    """Line chart on [0,1]² as inline SVG (ROC, PR, reliability)."""
    size, pad = 260, 36
    span = size - 2 * pad

    def xy(point: list[float]) -> str:
        return f"{pad + point[0] * span:.1f},{size - pad - point[1] * span:.1f}"

    parts = [f'<svg width="{size}" height="{size}" role="img" aria-label="{_e(title)}">',
             f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="#999"/>']
    if diagonal:
        parts.append(f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="#bbb" stroke-dasharray="4 3"/>')
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{pad + tick * span:.0f}" y="{size - pad + 14}" font-size="10" text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{pad - 4}" y="{size - pad - tick * span + 3:.0f}" font-size="10" text-anchor="end">{tick:g}</text>')
    for i, (label, points) in enumerate(series):
        if points:
            color = _COLORS[i % len(_COLORS)]
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(xy(p) for p in points)}"/>')
            parts.append(f'<text x="{pad + 4}" y="{pad + 14 + 13 * i}" font-size="11" fill="{color}">{_e(label)}</text>')
    parts.append(f'<text x="{size / 2}" y="{size - 6}" font-size="11" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text x="10" y="{size / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 10 {size / 2})">{_e(y_label)}</text>')
    parts.append("</svg>")
    return f'<figure>{"".join(parts)}<figcaption>{_e(title)}</figcaption></figure>'


def _loss_svg(history: list[dict[str, float]]) -> str:
    """Train/val loss per epoch."""
    if not history:
        return ""
    top = max([r["train_loss"] for r in history] + [r["val_loss"] for r in history]) * 1.05 or 1.0
    n = max(len(history) - 1, 1)
    series = [(name, [[i / n, r[key] / top] for i, r in enumerate(history)]) for key, name in (("train_loss", "train loss"), ("val_loss", "validation loss"))]
    return _xy_chart(series, f"epoch 1 … {len(history)}", f"loss (max {top:.2f})", "Loss per epoch", diagonal=False)


def _tsne_svg(table: pd.DataFrame, column: str) -> str:
    size, pad = 300, 10
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    if len(x) == 0:
        return ""
    sx = (x - x.min()) / (float(x.max() - x.min()) or 1.0)
    sy = (y - y.min()) / (float(y.max() - y.min()) or 1.0)
    values = sorted(table[column].astype(str).unique())
    parts = [f'<svg width="{size}" height="{size + 16 * len(values)}" role="img" aria-label="t-SNE coloured by {_e(column)}">']
    for i, value in enumerate(values):
        color = _COLORS[i % len(_COLORS)]
        mask = (table[column].astype(str) == value).to_numpy()
        parts += [f'<circle cx="{pad + a * (size - 2 * pad):.1f}" cy="{pad + (1 - b) * (size - 2 * pad):.1f}" r="2.2" fill="{color}" fill-opacity=".7"/>' for a, b in zip(sx[mask], sy[mask])]
        parts.append(f'<text x="{pad}" y="{size + 12 + 16 * i}" font-size="11" fill="{color}">● {_e(value)} ({int(mask.sum())})</text>')
    parts.append("</svg>")
    return f'<figure>{"".join(parts)}<figcaption>coloured by {_e(column)}</figcaption></figure>'


def _leakage_html(split: dict[str, object]) -> str:
    leak = split.get("leakage_test")
    if not isinstance(leak, dict):
        return ""
    css = "warn" if leak["flagged"] or split.get("warning") else "note"
    verdict = "LEAKY SPLIT: test figures overstate performance on new patients." if leak["flagged"] else "No sign of leakage at this threshold."
    return (
        f'<p class="{css}"><strong>Leakage figure:</strong> {leak["near_duplicates"]} of {leak["test_images"]} test images '
        f'({leak["share"]:.1%}) have a near duplicate (cosine similarity ≥ {float(leak.get("threshold", 0.92)):.3f} of ImageNet features; '
        f'0.92, or higher where patients of this data set are alike) '
        f'in the training part; median nearest-neighbour similarity test→train {leak["median_nn_similarity"]:.3f}. {verdict}'
        + (f" {_e(split['warning'])}" if split.get("warning") else "")
        + "</p>"
    )


def _metric_table(m: dict[str, object], ci: dict[str, dict[str, float]], ci_unit: str) -> str:
    rows = "".join(
        f'<tr><td>{name}</td><td data-metric="{key}">{_fmt(m[key])}</td><td>{_interval(ci, key)}</td></tr>'
        for key, name in METRIC_ROWS if key in m
    )
    return (f"<table><tr><th>Metric (threshold 0.5)</th><th>Value</th><th>95% CI (bootstrap over {_e(ci_unit)})</th></tr>"
            f"{rows}<tr><td>Images</td><td>{m['n']}</td><td></td></tr></table>")


def _confusion(m: dict[str, object], negative: str, positive: str, caption: str) -> str:
    return (
        f"<table><caption>{_e(caption)}</caption><tr><th>true \\ predicted</th><th>{_e(negative)}</th><th>{_e(positive)}</th></tr>"
        f"<tr><th>{_e(negative)}</th><td>{m['tn']}</td><td>{m['fp']}</td></tr>"
        f"<tr><th>{_e(positive)}</th><td>{m['fn']}</td><td>{m['tp']}</td></tr></table>"
    )


def _set_section(name: str, result: dict[str, object], classes: list[str], run_dir: Path | None, index: int) -> str:
    m = result["metrics"]
    assert isinstance(m, dict)
    kind = str(result.get("kind", ""))
    head = (f'<section id="set-{index}" class="{"external" if kind == "external" else ""}"><h3>{_e(name)} '
            f'<small>({_e(kind)}; sources: {_e(", ".join(result.get("sources", [])))})</small></h3>')  # type: ignore[arg-type]
    if "per_class" in m:
        rows = "".join(f"<tr><td>{_e(c)}</td>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in ("precision", "sensitivity", "specificity", "f1", "auc")) + "</tr>"
                       for c, v in m["per_class"].items())
        return (head + f"<p>Accuracy {_fmt(m['accuracy'])}, macro F1 {_fmt(m['macro_f1'])}, weighted F1 {_fmt(m['weighted_f1'])}, kappa {_fmt(m['kappa'])}.</p>"
                "<table><tr><th>Class (one vs rest)</th><th>Precision</th><th>Sensitivity</th><th>Specificity</th><th>F1</th><th>AUC</th></tr>"
                f"{rows}</table></section>")
    negative, positive = classes[0], classes[-1]
    parts = [head, _metric_table(m, result.get("ci", {}), str(result.get("ci_unit", "groups"))),  # type: ignore[arg-type]
             _confusion(m, negative, positive, "Confusion matrix at the default threshold 0.5")]
    points = result.get("operating_points", {})
    assert isinstance(points, dict)
    rows = "".join(
        f"<tr><td>{_e(p)}</td><td>{_fmt(v['threshold'])}</td>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in ("sensitivity", "specificity", "precision", "npv", "f1")) + "</tr>"
        for p, v in points.items()
    )
    parts.append("<h4>Operating points (thresholds chosen on the validation part, applied here)</h4>"
                 "<table><tr><th>Operating point</th><th>Threshold</th><th>Sensitivity</th><th>Specificity</th><th>PPV</th><th>NPV</th><th>F1</th></tr>"
                 f"{rows}</table>")
    cal = result["calibration"]
    curves = result["curves"]
    assert isinstance(cal, dict) and isinstance(curves, dict)
    reliability = [[b["mean_predicted"], b["observed"]] for b in cal["reliability"]]
    parts.append('<div class="figs">'
                 + _xy_chart([("ROC", curves["roc"])], "false positive rate", "sensitivity", f"ROC curve (AUC {_fmt(m['auc'])})")
                 + _xy_chart([("precision-recall", curves["pr"])], "recall", "precision", f"Precision-recall curve (AUC-PR {_fmt(m['auc_pr'])})", diagonal=False)
                 + _xy_chart([("observed vs predicted", reliability)], "mean predicted probability", "observed COVID rate",
                             f"Reliability diagram (ECE {_fmt(cal['ece_after'])} after, {_fmt(cal['ece_before'])} before temperature {_fmt(cal['temperature'])})")
                 + "</div>")
    patient = result.get("patient_level", {})
    assert isinstance(patient, dict)
    if "metrics" in patient:
        pm = patient["metrics"]
        parts.append(f"<h4>Patient level ({patient['patients']} patients, slice probabilities aggregated by {_e(patient['aggregation'])})</h4>"
                     "<table><tr><th>Metric</th><th>Value</th><th>95% CI (bootstrap over patients)</th></tr>"
                     + "".join(f"<tr><td>{k}</td><td>{_fmt(pm[k])}</td><td>{_interval(patient['ci'], k)}</td></tr>" for k in SUMMARY_KEYS) + "</table>")
    else:
        parts.append(f"<p>Patient level: {_e(patient.get('note', 'not computed'))}.</p>")
    parts.append(_gallery(result.get("explain"), run_dir))  # type: ignore[arg-type]
    parts.append("</section>")
    return "".join(parts)


def _gallery(explain: dict[str, object] | None, run_dir: Path | None) -> str:
    if not explain:
        return ""
    plaus = explain["plausibility"]
    assert isinstance(plaus, dict)
    figures = []
    for item in explain["gallery"]:  # type: ignore[union-attr]
        source = (run_dir / item["file"]) if run_dir is not None else None
        if source is None or not source.is_file():
            continue
        data = base64.b64encode(source.read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(explain["method"])} heat map, {item["cell"]}, true {_e(item["label"])}">'
            f'<figcaption><strong>{item["cell"]}</strong> true {_e(item["label"])}, P(COVID) {item["p_positive"]:.2f}, '
            f'lung energy {_fmt(item["lung_energy"])}</figcaption></figure>'
        )
    return (
        f'<h4>Heat maps ({_e(explain["method"])}; most confident true/false positives/negatives)</h4>'
        f'<p>Plausibility: on {plaus["images"]} sampled images ({plaus["with_lung_mask"]} with a lung mask found), '
        f'mean share of heat-map energy inside the lungs {_fmt(plaus["mean_lung_energy"])} (median {_fmt(plaus["median_lung_energy"])}); '
        f'the lung mask covers {_fmt(plaus["mean_lung_area"])} of the image on average, which is what a map blind to anatomy would score.</p>'
        f'<div class="gallery">{"".join(figures) or "<p>No heat maps.</p>"}</div>'
    )


def write_report(
    path: str | Path, metrics: dict[str, object], history: list[dict[str, float]], config: RunConfig, run_dir: Path | None = None
) -> Path:
    classes = metrics["classes"]
    assert isinstance(classes, list)
    positive = classes[-1]
    split = metrics["split"]
    assert isinstance(split, dict)
    evaluation = metrics.get("evaluation") or {}
    assert isinstance(evaluation, dict)
    sets: dict[str, dict[str, object]] = evaluation.get("sets", {})  # type: ignore[assignment]
    counts = split["counts"]
    assert isinstance(counts, dict)

    summary_rows = "".join(
        f'<tr class="{"external" if r.get("kind") == "external" else ""}"><td>{_e(name)}</td><td>{_e(r.get("kind"))}</td><td>{r["n"]}</td>'
        + "".join(f'<td>{_fmt(r["metrics"].get(k, math.nan))}' + (f'<br><small>{_interval(r.get("ci", {}), k)}</small>' if r.get("ci") else "") + "</td>" for k in SUMMARY_KEYS)  # type: ignore[union-attr]
        + "</tr>"
        for name, r in sets.items()
    )
    externals = [n for n, r in sets.items() if r.get("kind") == "external"]
    verdicts = []
    home = next((r for r in sets.values() if r.get("kind") == "in-domain"), None)
    for name in externals:
        m, ci = sets[name]["metrics"], sets[name].get("ci", {})
        if home is None or "auc" not in m:  # type: ignore[operator]
            continue
        auc, home_auc = float(m["auc"]), float(home["metrics"]["auc"])  # type: ignore[index]
        chance = isinstance(ci, dict) and "auc" in ci and ci["auc"]["low"] <= 0.5 <= ci["auc"]["high"]
        verdicts.append(
            f"On <strong>{_e(name)}</strong> the AUC is {_fmt(auc)} against {_fmt(home_auc)} in-domain "
            f"({(auc - home_auc) * 100:+.1f} points)" + ("; its 95% CI includes 0.5: <strong>no better than chance</strong> on these images." if chance else ".")
        )
    verdict_html = f'<p class="warn">{" ".join(verdicts)}</p>' if verdicts else ""
    data = metrics.get("data", {})
    assert isinstance(data, dict)
    provenance = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in data.get("by_source_and_class", {}).items())
    audit = data.get("audit", {})
    audit_line = (f"Audited: {audit.get('flagged_images')} images carry audit flags (see the audit report)."
                  if audit.get("checked") else _e(audit.get("note", "No audit information.")))
    calibration = evaluation.get("calibration", {})
    tsne = evaluation.get("tsne", {})
    tsne_html = ""
    if run_dir is not None and isinstance(tsne, dict) and (run_dir / str(tsne.get("file", ""))).is_file():
        table = pd.read_csv(run_dir / tsne["file"], keep_default_na=False)
        sil = tsne["silhouette"]
        tsne_html = (
            '<div class="figs">' + "".join(_tsne_svg(table, c) for c in ("label", "source", "set")) + "</div>"
            f"<p>Silhouette in embedding space (cosine; 0 = mixed, 1 = separated): class {_fmt(sil['label'])}, "
            f"source data set {_fmt(sil['source'])}, evaluation set {_fmt(sil['set'])}. "
            "If sources separate more clearly than classes, the model may have learnt the hospital, not the disease.</p>"
        )
    external_line = (f"External results on {', '.join(externals)}: see the table above; they are the figures to expect elsewhere."
                     if externals else "No external data set evaluated yet: performance on another hospital's images is unknown.")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>covidscan report</title><style>{_STYLE}</style></head><body>
<h1>covidscan run report</h1>
<p id="intended-use" class="warn" role="note"><strong>{_e(metrics['decision_support'])}</strong>
In-domain figures are measured on held-out patients of the training data set; external figures on data sets the model never saw.</p>
<section id="summary"><h2>Results: in-domain vs external</h2>
<table><tr><th>Evaluation set</th><th>Kind</th><th>Images</th>{"".join(f"<th>{k}</th>" for k in SUMMARY_KEYS)}</tr>{summary_rows}</table>
{verdict_html}
<p>Default threshold 0.5 (stated, not tuned); 95% bootstrap CIs under each value.
Probabilities are temperature-scaled (T = {_fmt(calibration.get('temperature', 1.0))}, fitted on the validation part).</p></section>
<section id="provenance"><h2>Data provenance</h2><p>{data.get('images', '?')} images, {data.get('patients_known', '?')} known patients,
{data.get('images_without_patient_id', '?')} images without a patient ID.</p>
<table><tr><th>Source / class</th><th>Images</th></tr>{provenance}</table><p>{audit_line}</p></section>
<section id="split"><h2>Split protocol</h2><p>By <strong>{_e(split['by'])}</strong> (seed {split['seed']}): no group (patient or similarity cluster) appears in more than one part.
Images: train {counts.get('train')}, validation {counts.get('val')}, test {counts.get('test')}.
Model selection, early stopping, temperature and operating points used the validation part only.</p>
{_leakage_html(split)}</section>
<section id="details"><h2>Results per evaluation set</h2>{"".join(_set_section(n, r, classes, run_dir, i) for i, (n, r) in enumerate(sets.items()))}</section>
<section id="tsne"><h2>Embedding map (t-SNE)</h2>{tsne_html or "<p>Not computed.</p>"}</section>
<section id="training"><h2>Training</h2>{_loss_svg(history)}
<p>Best epoch {metrics['training']['best_epoch']} of {metrics['training']['epochs_run']} (lowest validation loss).</p></section>
<section id="model-card"><h2>Model card</h2><table>
<tr><td>Intended use</td><td>{_e(metrics['decision_support'])} Second reader for chest CT slices; not for screening without a clinician, not for children, not validated prospectively.</td></tr>
<tr><td>Backbone</td><td>{_e(config.model.backbone)} ({_e(config.model.weights)} weights, transfer '{_e(config.model.transfer)}')</td></tr>
<tr><td>Input</td><td>{config.data.image_size or 'backbone default'} px grey, classes {_e(', '.join(classes))} (positive: {_e(positive)})</td></tr>
<tr><td>Training data</td><td>{data.get('images', '?')} images from {_e(', '.join(sorted({k.split(' / ')[0] for k in data.get('by_source_and_class', {})})))}</td></tr>
<tr><td>External results</td><td>{_e(external_line)}</td></tr>
<tr><td>Limitations</td><td>Public data sets of uncertain provenance; slice-level labels; CIs resample whole groups and are wide with few test patients (that is the honest answer);
heat maps show where the model looked, not where disease is.</td></tr></table></section>
</body></html>
"""
    return atomic.write_text(path, page)
