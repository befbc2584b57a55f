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

import numpy as np
import pandas as pd

from covidscan import atomic
from covidscan.config import RunConfig
from covidscan.decision import EvidenceRule, rule_name
from covidscan.explain.overlay import colorize

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
.text td{text-align:left}
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


Tick = tuple[float, str]  # (position in [0, 1], label)


def _xy_chart(
    series: list[tuple[str, list[list[float]]]], x_label: str, y_label: str, title: str, diagonal: bool = True,
    x_ticks: list[Tick] | None = None, y_ticks: list[Tick] | None = None, marks: list[tuple[float, str]] | None = None,
    dots: list[tuple[float, float, float, str]] | None = None,
) -> str:
    """Line chart on [0,1]² as inline SVG (ROC, PR, reliability, loss).

    Ticks carry the real axis values; `marks` are labelled vertical lines
    (e.g. the best epoch); `dots` are (x, y, radius, label) points.
    """
    size, pad = 280, 40
    span = size - 2 * pad

    def xy(point: list[float]) -> str:
        return f"{pad + point[0] * span:.1f},{size - pad - point[1] * span:.1f}"

    parts = [f'<svg width="{size}" height="{size}" role="img" aria-label="{_e(title)}">',
             f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="#999"/>']
    if diagonal:
        parts.append(f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="#bbb" stroke-dasharray="4 3"/>')
    for tick, label in x_ticks or [(t, f"{t:g}") for t in (0.0, 0.5, 1.0)]:
        parts.append(f'<text x="{pad + tick * span:.0f}" y="{size - pad + 14}" font-size="10" text-anchor="middle">{_e(label)}</text>')
    for tick, label in y_ticks or [(t, f"{t:g}") for t in (0.0, 0.5, 1.0)]:
        parts.append(f'<text x="{pad - 4}" y="{size - pad - tick * span + 3:.0f}" font-size="10" text-anchor="end">{_e(label)}</text>')
    for x, label in marks or []:
        parts.append(f'<line x1="{pad + x * span:.1f}" y1="{pad}" x2="{pad + x * span:.1f}" y2="{size - pad}" stroke="#2ca02c" stroke-dasharray="3 3"/>'
                     f'<text x="{pad + x * span + 3:.1f}" y="{pad + span - 4}" font-size="10" fill="#2ca02c">{_e(label)}</text>')
    for i, (label, points) in enumerate(series):
        if points:
            color = _COLORS[i % len(_COLORS)]
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(xy(p) for p in points)}"/>')
            parts.append(f'<text x="{pad + 4}" y="{pad + 14 + 13 * i}" font-size="11" fill="{color}">{_e(label)}</text>')
    for x, y, radius, label in dots or []:
        cx, cy = xy([x, y]).split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="{radius:.1f}" fill="#1f77b4" fill-opacity=".55"/>'
                     f'<text x="{float(cx) + radius + 2:.1f}" y="{float(cy) + 3:.1f}" font-size="9">{_e(label)}</text>')
    parts.append(f'<text x="{size / 2}" y="{size - 8}" font-size="11" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text x="10" y="{size / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 10 {size / 2})">{_e(y_label)}</text>')
    parts.append("</svg>")
    return f'<figure>{"".join(parts)}<figcaption>{_e(title)}</figcaption></figure>'


def _loss_svg(history: list[dict[str, float]], best_epoch: int | None = None) -> str:
    """Train/val loss per epoch with real axis values and the best epoch (lowest validation loss) marked."""
    if not history:
        return ""
    top = max([r["train_loss"] for r in history] + [r["val_loss"] for r in history]) * 1.05 or 1.0
    n = max(len(history) - 1, 1)
    series = [(name, [[i / n, r[key] / top] for i, r in enumerate(history)]) for key, name in (("train_loss", "train loss"), ("val_loss", "validation loss"))]
    epochs = sorted({1, (len(history) + 1) // 2, len(history)})
    x_ticks = [((e - 1) / n, str(e)) for e in epochs]
    y_ticks = [(f, f"{f * top:.2f}") for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    marks = [((best_epoch - 1) / n, f"best epoch {best_epoch}")] if best_epoch and 1 <= best_epoch <= len(history) else []
    return _xy_chart(series, "epoch", "cross-entropy loss", "Loss per epoch", diagonal=False, x_ticks=x_ticks, y_ticks=y_ticks, marks=marks)


RELIABLE_BIN = 4  # bins with fewer images are drawn as dots only, never joined by a line


def _reliability_svg(bins: list[dict[str, float]], title: str) -> str:
    """Observed vs predicted per bin: dots sized and labelled by image count; lines only between well-filled bins."""
    segments: list[list[list[float]]] = [[]]
    for b in bins:
        if b["count"] >= RELIABLE_BIN:
            segments[-1].append([b["mean_predicted"], b["observed"]])
        elif segments[-1]:
            segments.append([])
    series = [("observed vs predicted" if i == 0 else "", seg) for i, seg in enumerate(s for s in segments if len(s) > 1)]
    dots = [(b["mean_predicted"], b["observed"], 2.0 + 4.0 * min(1.0, b["count"] / 50.0) ** 0.5, f"n={b['count']}") for b in bins]
    return _xy_chart(series, "mean predicted probability", "observed COVID rate", title, dots=dots)


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
    return (f"<table><tr><th>Metric (threshold 0.5)</th><th>Value</th><th>95% CI ({_e(ci_unit)} as clusters)</th></tr>"
            f"{rows}<tr><td>Images</td><td>{m['n']}</td><td></td></tr></table>")


def _with_interval(value: object, ci: dict[str, float] | None) -> str:
    return _fmt(value) + (f"<br><small>{_fmt(ci['low'])} – {_fmt(ci['high'])}</small>" if ci else "")


def _gate_html(result: dict[str, object]) -> str:
    gate = result.get("gate")
    if not isinstance(gate, dict):
        return ""
    rate = gate.get("refusal_rate") or {}
    total = int(gate["accepted"]) + int(gate["refused"])
    by_class = ", ".join(f"{_e(c)} {n}" for c, n in gate.get("refused_by_class", {}).items())
    css = "warn" if total and gate["refused"] / total > 0.1 else "note"
    limit = f"distance above {_fmt(gate['threshold'])}" if gate.get("threshold") is not None else "no gate (older run)"
    return (f'<p class="{css}"><strong>Input gate</strong> ({limit}): {gate["refused"]} of {total} images refused'
            + (f" ({_fmt(rate['value'])}, 95% CI {_fmt(rate['low'])} – {_fmt(rate['high'])})" if rate else "")
            + f"; refused by class: {by_class}. The service gives no answer for refused images, so the figures below are on the "
            f"{gate['accepted']} accepted images; the same metrics on all images are shown beside them.</p>")


def _accepted_vs_all(result: dict[str, object]) -> str:
    everything = result.get("all_images")
    if not isinstance(everything, dict):
        return ""
    m, ci, am, aci = result["metrics"], result.get("ci") or {}, everything["metrics"], everything.get("ci") or {}
    assert isinstance(m, dict) and isinstance(am, dict) and isinstance(ci, dict) and isinstance(aci, dict)
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_with_interval(m.get(k, math.nan), ci.get(k))}</td><td>{_with_interval(am.get(k, math.nan), aci.get(k))}</td></tr>"
                   for k in SUMMARY_KEYS)
    patient, all_patient = result.get("patient_level") or {}, everything.get("patient_level") or {}
    assert isinstance(patient, dict) and isinstance(all_patient, dict)
    if "metrics" in patient or "metrics" in all_patient:
        for k in ("sensitivity", "specificity", "auc"):
            rows += (f"<tr><td>study {_e(k)}</td><td>{_with_interval(patient.get('metrics', {}).get(k, math.nan), patient.get('ci', {}).get(k))}</td>"
                     f"<td>{_with_interval(all_patient.get('metrics', {}).get(k, math.nan), all_patient.get('ci', {}).get(k))}</td></tr>")
    return (f"<table><tr><th>Metric</th><th>Accepted by the gate ({result['n']} images; as served)</th>"
            f"<th>All images ({everything['n']}; ungated)</th></tr>{rows}</table>")


def _operating_points(points: dict[str, object], prevalence: float) -> str:
    rows = ""
    for name, point in points.items():
        assert isinstance(point, dict)
        v, ci, at = point["metrics"], point.get("ci", {}), point.get("at_stated_prevalence", {})
        rows += (f"<tr><td>{_e(name)}</td><td>{_fmt(point['threshold'])}</td>"
                 f"<td>{_with_interval(v['sensitivity'], ci.get('sensitivity'))}</td><td>{_with_interval(v['specificity'], ci.get('specificity'))}</td>"
                 f"<td>{_with_interval(v['precision'], ci.get('precision'))}</td><td>{_with_interval(v['npv'], ci.get('npv'))}</td>"
                 f"<td>{_with_interval(at.get('ppv', {}).get('value', math.nan), at.get('ppv'))}</td>"
                 f"<td>{_with_interval(at.get('npv', {}).get('value', math.nan), at.get('npv'))}</td></tr>")
    return ("<h4>Operating points (thresholds chosen on the validation part, applied here; 95% CIs)</h4>"
            "<table><tr><th>Operating point</th><th>Threshold</th><th>Sensitivity</th><th>Specificity</th>"
            f"<th>PPV (this set)</th><th>NPV (this set)</th><th>PPV at prevalence {_fmt(prevalence)}</th><th>NPV at prevalence {_fmt(prevalence)}</th></tr>"
            f"{rows}</table><p>PPV and NPV depend on prevalence: those of this set reflect its own class mix, rarely the clinic's. "
            f"The stated prevalence {_fmt(prevalence)} is set by evaluate.prevalence; its intervals come from the ends of the sensitivity and specificity intervals.</p>")


def _subgroups_html(groups: dict[str, object]) -> str:
    if not groups:
        return ""
    parts = ["<h4>Subgroups (threshold 0.5; 95% CIs)</h4>"]
    for column, rows in groups.items():
        assert isinstance(rows, list)
        body = "".join(f"<tr><td>{_e(r['value'])}</td><td>{r['images']}</td><td>{r['patients_or_groups']}</td><td>{r['positives']}</td>"
                       + "".join(f"<td>{_with_interval(r[k]['value'], r[k])}</td>" for k in ("sensitivity", "specificity", "auc")) + "</tr>"
                       for r in rows)
        parts.append(f"<table><tr><th>{_e(column)}</th><th>Images</th><th>Patients/groups</th><th>Positive images</th>"
                     f"<th>Sensitivity</th><th>Specificity</th><th>AUC</th></tr>{body}</table>")
    return "".join(parts)


def _duplicates_html(report: object) -> str:
    if not isinstance(report, dict):
        return ""
    css = "warn" if report.get("near_duplicates") else "note"
    return (f'<p class="{css}"><strong>Overlap with the training data:</strong> {report["near_duplicates"]} of {report["test_images"]} images '
            f'({report["share"]:.1%}) have a near duplicate (cosine ≥ {float(report["threshold"]):.3f}) among the model\'s '
            f'{_e(report.get("compared_with", "training images"))}; median nearest-neighbour similarity {_fmt(report["median_nn_similarity"])}. '
            + ("Those images are not independent of training: this set is not fully external." if report.get("near_duplicates") else "No image of this set was seen in training.")
            + "</p>")


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
        def auc(v: dict) -> str:
            ci = v.get("auc_ci") or {}
            return f"{_fmt(v['auc'])} [{_fmt(ci['low'])}–{_fmt(ci['high'])}]" if ci.get("low") is not None else _fmt(v["auc"])

        rows = "".join(f"<tr><td>{_e(c)}</td>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in ("precision", "sensitivity", "specificity", "f1"))
                       + f"<td>{auc(v)}</td></tr>" for c, v in m["per_class"].items())
        return (head + _gate_html(result) + f"<p>Accuracy {_fmt(m['accuracy'])}, macro F1 {_fmt(m['macro_f1'])}, weighted F1 {_fmt(m['weighted_f1'])}, "
                f"kappa {_fmt(m['kappa'])} (decision: the most probable class; images the gate accepts).</p>"
                "<table><tr><th>Class (one vs rest)</th><th>Precision</th><th>Sensitivity</th><th>Specificity</th><th>F1</th><th>AUC [95 % CI]</th></tr>"
                f"{rows}</table></section>")
    negative, positive = classes[0], classes[-1]
    parts = [head, _description_html(result.get("description")), _gate_html(result)]
    if not _evaluable(result):
        parts.append(f'<p class="warn not-evaluable"><strong>Not evaluable with this model</strong>: '
                     f'{_e("; ".join(result["evaluable"]["reasons"]))} ({_e(result["evaluable"]["rule"])}). '  # type: ignore[index]
                     "The figures below describe only the images the gate let through, not the model on this set.</p>")
    parts += [_duplicates_html(result.get("training_duplicates")), _accepted_vs_all(result)]
    if result.get("reference_standard"):
        parts.append("<p>Reference standard: " + ", ".join(f"{_e(k)} ({v} images)" for k, v in result["reference_standard"].items()) + ".</p>")  # type: ignore[union-attr]
    if not result["n"]:
        parts.append("<p class=\"warn\">The gate refused every image of this set: the service would answer nothing here.</p></section>")
        return "".join(parts)
    parts += [f"<h4>Slices accepted by the gate ({result['n']} images)</h4>", _metric_table(m, result.get("ci", {}), str(result.get("ci_unit", "groups"))),  # type: ignore[arg-type]
              f"<p><small>{_e(result.get('ci_method', ''))}.</small></p>",
              _confusion(m, negative, positive, "Confusion matrix at the default threshold 0.5")]
    points = result.get("operating_points", {})
    assert isinstance(points, dict)
    prevalence = float((result.get("prevalence") or {}).get("stated", 0.1))  # type: ignore[union-attr]
    parts.append(_operating_points(points, prevalence))
    cal = result["calibration"]
    curves = result["curves"]
    assert isinstance(cal, dict) and isinstance(curves, dict)
    calibration_note = (f"after temperature {_fmt(cal['temperature'])}, {_fmt(cal['ece_before'])} before" if cal.get("kept")
                        else "uncalibrated: temperature scaling did not help on held-out validation patients")
    parts.append('<div class="figs">'
                 + _xy_chart([("ROC", curves["roc"])], "false positive rate", "sensitivity", f"ROC curve (AUC {_fmt(m['auc'])})")
                 + _xy_chart([("precision-recall", curves["pr"])], "recall", "precision", f"Precision-recall curve (AUC-PR {_fmt(m['auc_pr'])})", diagonal=False)
                 + _reliability_svg(cal["reliability"], f"Reliability diagram (ECE {_fmt(cal['ece_after'])} {calibration_note}); "
                                    f"dots sized by images per bin, bins under {RELIABLE_BIN} images not joined")
                 + "</div>")
    parts.append(_subgroups_html(result.get("subgroups") or {}))  # type: ignore[arg-type]
    patient = result.get("patient_level", {})
    assert isinstance(patient, dict)
    if "metrics" in patient:
        pm = patient["metrics"]
        warning = f'<p class="warn">{_e(patient["warning"])}.</p>' if patient.get("warning") else ""
        at = patient.get("at_stated_prevalence", {})
        parts.append(f"<h4>Study level: {patient['patients']} patients ({patient['class_counts']['positive']} positive), "
                     f"{_e(patient['aggregation'])}, study threshold {_fmt(patient['threshold'])} (the service's study answer)</h4>{warning}"
                     "<table><tr><th>Metric</th><th>Value</th><th>95% CI (Wilson; Newcombe for AUC)</th></tr>"
                     + "".join(f"<tr><td>{k}</td><td>{_fmt(pm[k])}</td><td>{_interval(patient['ci'], k)}</td></tr>" for k in SUMMARY_KEYS)
                     + "".join(f"<tr><td>{k.upper()} at prevalence {_fmt(prevalence)}</td><td>{_fmt(at[k]['value'])}</td><td>{_fmt(at[k]['low'])} – {_fmt(at[k]['high'])}</td></tr>"
                               for k in ("ppv", "npv") if k in at)
                     + "</table>")
    else:
        parts.append(f"<p>Study level: {_e(patient.get('note', 'not computed'))}.</p>")
    parts.append(_evidence_html(result.get("study_evidence")))
    parts.append(_errors_html(result.get("errors")))
    parts.append(_gallery(result.get("explain"), run_dir))  # type: ignore[arg-type]
    parts.append("</section>")
    return "".join(parts)


def _evidence_html(evidence: object) -> str:
    """How many studies the service would answer, and how many it withholds as refused or not evaluable."""
    if not isinstance(evidence, dict) or "studies" not in evidence:
        return ""
    withheld = int(evidence["not_evaluable"]) + int(evidence["refused"])
    css = "warn" if withheld else "note"
    examples = "".join(f"<li>{_e(e)}</li>" for e in evidence.get("examples") or [])
    return (f'<div class="{css} study-evidence"><p><strong>Studies answered</strong>: {evidence["answered"]} of {evidence["studies"]}; '
            f'{evidence["not_evaluable"]} not evaluable with this model and {evidence["refused"]} refused (no slice accepted). '
            f"A study is {_e(evidence['rule'])} (the model card's evidence rule, {_e(evidence.get('chosen_on', ''))}). "
            + ("The study figures above are on the answered studies only." if evidence["not_evaluable"] else "")
            + (f"</p><ul>{examples}</ul></div>" if examples else "</p></div>"))


def _errors_html(errors: object) -> str:
    """Error analysis: whether the errors are spread or sit in a few patients, and the most confident wrong slices."""
    if not isinstance(errors, dict):
        return ""
    if not errors["errors"]:
        return f"<h4>Error analysis</h4><p>No wrong slice at threshold {_fmt(errors['threshold'])} among the {errors['images']} accepted images.</p>"
    unit = "patient" if errors["unit"] == "patients" else "group" if errors["unit"] == "split groups" else "image"
    confident = "".join(f"<tr><td>{_e(c['image'])}</td><td>{_e(c['true'])}</td><td>{c['p_positive']:.3f}</td><td>{_e(c['unit'])}</td></tr>"
                        for c in errors["confident_errors"])
    confident_table = (f'<table class="text"><caption>Most confident wrong slices</caption><tr><th>Image</th><th>True class</th>'
                       f"<th>P(positive class)</th><th>{'' if unit == 'image' else unit.capitalize()}</th></tr>{confident}</table>")
    head = (f'<h4 id="errors">Error analysis ({errors["errors"]} wrong of {errors["images"]} accepted images at threshold '
            f'{_fmt(errors["threshold"])})</h4>')
    if unit == "image":
        return (head + "<p>This set has no patient IDs or split groups: its errors cannot be grouped by patient. "
                "Its most confident errors:</p>" + confident_table)
    def wrong_slices(w: dict[str, object]) -> str:
        return "; ".join(f"{x['image']} ({x['p_positive']:.2f})" for x in w["wrong_slices"])  # type: ignore[attr-defined]

    worst = "".join(
        f"<tr><td>{_e(w['unit'])}</td><td>{_e(w['true'])}</td><td>{w['images']}</td><td>{w['errors']}</td><td>{w['share']:.0%}</td>"
        f"<td>{_e(wrong_slices(w))}</td></tr>" for w in errors["worst"])
    return (head + f"<p>The errors fall in {errors['units_with_errors']} of {errors['units']} {_e(errors['unit'])}; the {len(errors['worst'])} "
            f"{unit}s below hold {errors['errors_in_listed']} of them ({errors['errors_in_listed'] / errors['errors']:.0%}). "
            "Errors concentrated in a few patients say more about those patients (or their labels) than about the model's rate of error.</p>"
            f'<table class="text"><tr><th>{unit.capitalize()}{" (keyed hash)" if unit == "patient" else ""}</th><th>True class</th><th>Images</th><th>Wrong</th><th>Share wrong</th>'
            f"<th>Its most confident wrong slices (P(COVID))</th></tr>{worst}</table>" + confident_table)


def _description_html(description: object) -> str:
    """What a set is: each source's origin and reference standard (known sets) or its owner's description and columns."""
    if not isinstance(description, dict):
        return ""
    provenance = description.get("provenance") or {}
    assert isinstance(provenance, dict)
    rows = "".join(
        f"<tr><td>{_e(source)}</td><td>{_e(d['description'])}</td><td>{_e(d['label_source'])}</td><td>{_e(d['country'])}</td>"
        f"<td>{_e(d['period'])}</td><td>{_e(d['unknown'])}</td></tr>" for source, d in provenance.items())
    columns = ", ".join(str(c) for c in description.get("columns") or [])  # type: ignore[union-attr]
    return ('<table class="text data-description"><tr><th>Source</th><th>Origin</th><th>Reference standard (label source)</th>'
            f"<th>Country</th><th>Period</th><th>Not known</th></tr>{rows}</table>"
            + (f"<p><small>Manifest columns: {_e(columns)}.</small></p>" if columns else "")
            + (f"<p>{_e(description['cannot_check'])}</p>" if description.get("cannot_check") else ""))


def _colour_scale() -> str:
    """The heat-map colour bar (the overlay's own table), 0 = no attention, 1 = the map's maximum."""
    stops = colorize(np.linspace(0.0, 1.0, 11)[None, :])[0]
    gradient = ", ".join(f"rgb({r},{g},{b}) {i * 10}%" for i, (r, g, b) in enumerate(stops))
    return (f'<div aria-label="heat-map colour scale" style="display:flex;align-items:center;gap:.4rem;font-size:.8rem">low (0)'
            f'<span style="display:inline-block;width:12rem;height:.8rem;background:linear-gradient(to right, {gradient})"></span>'
            "high (1: the map's maximum on that image)</div>")


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
        f'{_colour_scale()}<div class="gallery">{"".join(figures) or "<p>No heat maps.</p>"}</div>'
    )


def _withheld_line(evidence: EvidenceRule) -> str:
    check = evidence.validation
    if "patients" not in check:
        return "not checked on validation patients"
    return f"it would have withheld {check['withheld']} of the {check['patients']} validation patients' studies"


def _deployed_html(evaluation: dict[str, object]) -> str:
    """What the service does with an image and a study, as recorded in model.json."""
    evidence = EvidenceRule.from_json(evaluation.get("evidence_rule"))
    calibration, rule, gate = evaluation.get("calibration") or {}, evaluation.get("study_rule") or {}, evaluation.get("gate") or {}
    assert isinstance(calibration, dict) and isinstance(rule, dict) and isinstance(gate, dict)
    points = ", ".join(f"{_e(k)} at {_fmt(v)}" for k, v in (calibration.get("operating_points") or {}).items())
    return (
        '<section id="deployed"><h2>The deployed decision (model.json)</h2><table class="text">'
        f"<tr><td>Input gate</td><td>refuses images whose feature statistics lie further than {_fmt(gate.get('threshold', math.nan))} "
        f"from the training images' ({_fmt(gate.get('quantile_of_validation', math.nan))} quantile of validation distances)</td></tr>"
        f"<tr><td>Calibration</td><td>{_e(calibration.get('reason', 'not recorded'))}; T = {_fmt(float(calibration.get('temperature', 1.0)))}</td></tr>"
        f"<tr><td>Test-time augmentation</td><td>{'mirror-averaged probabilities (evaluated, calibrated and served alike)' if evaluation.get('tta') else 'none'}</td></tr>"
        f"<tr><td>Slice operating points</td><td>{points}</td></tr>"
        f"<tr><td>Study rule</td><td>{_e(rule_name(rule))}, study threshold {_fmt(float(rule.get('threshold', 0.5)))} "
        f"(chosen on the {_e(rule.get('chosen_on', 'default'))})</td></tr>"
        f"<tr><td>When a study is answered</td><td>{_e(evidence.describe())}; otherwise \"not evaluable with this model\" "
        f"({_e(evidence.chosen_on)}; {_e(_withheld_line(evidence))})</td></tr>"
        "</table><p>Validation images served three purposes (early stopping, calibration check, thresholds); with few validation "
        "patients these choices are noisy, which the test-set intervals include only in part.</p></section>"
    )


def _model_html(metrics: dict[str, object], config: RunConfig) -> str:
    """What the model is: one network, a decomposed one (DeTraC sub-classes) or an ensemble, with each weight source."""
    card = metrics.get("model_card") or {}
    training = metrics.get("training") or {}
    assert isinstance(card, dict) and isinstance(training, dict)
    members, combiner, decomposition = card.get("members"), card.get("combiner") or {}, card.get("decomposition")
    if members:
        rows = "".join(f"<tr><td>{_e(m['name'])}</td><td>{_e(m.get('backbone'))}</td><td>{_e(m.get('pretrained_from'))}</td>"
                       f"<td>{_fmt(float(m.get('weight', math.nan)))}</td></tr>" for m in members)  # type: ignore[union-attr]
        seconds = (training.get("ensemble") or {}).get("member_training_seconds", {})  # type: ignore[union-attr]
        return ('<section id="model"><h2>Model: an ensemble of members</h2>'
                f"<p>Combiner: <strong>{_e(combiner.get('method'))}</strong>, fitted on the {_e(combiner.get('fitted_on'))} "  # type: ignore[union-attr]
                f"(validation log loss {_e(combiner.get('validation_log_loss'))}); no test prediction reaches the fit. "  # type: ignore[union-attr]
                "An image is accepted only when every member's input gate accepts it; the heat map is the weighted mean of the members' maps.</p>"
                '<table class="text"><tr><th>Member</th><th>Backbone</th><th>Weights it started from</th><th>Heat-map weight</th></tr>'
                f"{rows}</table><p>Members' training time (s): {_e(', '.join(f'{k} {v}' for k, v in seconds.items()))}.</p></section>")
    text = f"{_e(config.model.backbone)}, started from {_e(config.model.weights)} weights, transfer '{_e(config.model.transfer)}'."
    if isinstance(decomposition, dict):
        per_class = decomposition.get("per_class") or {}
        assert isinstance(per_class, dict)
        parts = "; ".join(f"{_e(c)}: {v['sub_classes']} sub-classes of {'/'.join(map(str, v['sizes']))} training images" for c, v in per_class.items())
        text += (f" <strong>Class decomposition (DeTraC)</strong>: {parts} ({_e(decomposition.get('method'))}; {_e(decomposition.get('k_choice'))}). "
                 "The network learnt the sub-classes; their probabilities are summed per class for every decision, metric, calibration and heat map.")
    adaptation = card.get("adaptation")
    if isinstance(adaptation, dict):
        text += (f" <strong>Adapted</strong> to {adaptation.get('unlabelled_images')} unlabelled images of {_e(adaptation.get('data'))} "
                 f"({_e(adaptation.get('method'))}, from run {_e(adaptation.get('source_run'))}): the input gate was refitted on those images "
                 "and calibration and thresholds reset to 0.5, as no labelled image of that hospital was used.")
    return f'<section id="model"><h2>Model</h2><p>{text}</p>{_methods_html(card, training, config)}</section>'


def _methods_html(card: dict[str, object], training: dict[str, object], config: RunConfig) -> str:
    """Which of the methods against a change of hospital (issue 14) this network used, each stated, used or not."""
    t, selection, finetune = config.train, training.get("selection") or {}, card.get("local_finetune")
    assert isinstance(selection, dict)
    kept = (f"{_e(selection.get('on'))}: epoch {_e(selection.get('kept_epoch'))} kept (validation AUC {_fmt(selection.get('kept_val_auc', math.nan))}; "
            f"best validation AUC {_fmt(selection.get('best_val_auc', math.nan))} at epoch {_e(selection.get('best_auc_epoch'))})"
            if selection else "validation loss (recorded before train.select existed)")
    if selection.get("warning"):
        kept += f' <strong class="warn">{_e(selection["warning"])}</strong>'
    rows = {
        "Preprocessing": config.data.preprocess,
        "Standard augmentation": (f"rotation ±{t.rotation_deg:g}°, zoom ±{t.zoom:g}, shift ±{t.shift:g}, flip, brightness/contrast/gamma, noise"
                                  if t.augment else "off"),
        "Small-data regularisers": (f"mixup α = {t.mixup:g}; " if t.mixup > 0 else "mixup off; ")
                                   + (f"label smoothing {t.label_smoothing:g}; " if t.label_smoothing > 0 else "label smoothing off; ")
                                   + f"learning rate {t.schedule}",
        "Source-imitating augmentation": (f"each step with p = {t.source_augment:g}: resolution loss, JPEG, window/level, figure borders and crops, "
                                          "arrows and letters, blur, noise") if t.source_augment > 0 else "off",
        "Source-balanced sampling": "on: every source drawn equally often" if t.balance_sources else "off",
        "Epoch selection": kept,
        "Class decomposition (DeTraC)": "on" if card.get("decomposition") else "off",
        "Started from": _e(card.get("pretrained_from", config.model.weights)),
        "Local fine-tuning": (f"{_e(finetune.get('patients'))} patients ({_e(finetune.get('images'))} images) of {_e(finetune.get('data'))}, "  # type: ignore[union-attr]
                              f"+ {_e(finetune.get('replayed_source_images'))} replayed images of run {_e(finetune.get('source_run'))}"  # type: ignore[union-attr]
                              if isinstance(finetune, dict) else "none"),
        "Test-time adaptation (AdaBN / TENT)": "on (see above)" if card.get("adaptation") else "off",
        "Test-time augmentation": "mirror-averaged" if card.get("tta") else "off",
    }
    body = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows.items())
    return f'<h3>Methods against a change of hospital</h3><table class="text" id="methods">{body}</table>'


def _audit_html(audit: object) -> str:
    """The data audit made before training: its warnings (shortcuts, duplicates, conflicts), or that it was skipped."""
    if not isinstance(audit, dict) or not audit.get("checked"):
        note = audit.get("note", "No audit information.") if isinstance(audit, dict) else "No audit information."
        return f'<p class="warn" id="audit">{_e(note)}</p>'
    warnings = audit.get("warnings") or []
    assert isinstance(warnings, list)
    head = (f"<strong>Data audit</strong> (before training, {_fmt(float(audit.get('seconds', 0.0)))} s; RUN/{_e(audit.get('file', 'audit.json'))}): "  # type: ignore[arg-type]
            f"{audit['flagged_images']} of {audit['images']} images flagged, {audit['exact_duplicate_groups']} groups of identical images, "
            f"{audit['conflicts']} images duplicated across classes.")
    if not warnings:
        return f'<p class="note" id="audit">{head} No shortcut risk or label conflict found.</p>'
    return f'<div class="warn" id="audit"><p>{head}</p><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>"


def _split_line(split: dict[str, object]) -> str:
    if split.get("by") == "given in the manifest":
        return "By <strong>the split given in the manifest</strong> (its split column, e.g. a data set's official lists)"
    return f"By <strong>{_e(split['by'])}</strong> (seed {_e(split['seed'])})"


def _units_line(data: dict[str, object]) -> str:
    by_split = data.get("by_split") or {}
    assert isinstance(by_split, dict)
    if not by_split:
        return ""
    return "; patients or groups: " + ", ".join(f"{part} {by_split[part]['patients_or_groups']}" for part in ("train", "val", "test") if part in by_split)


def _backbone_line(metrics: dict[str, object], config: RunConfig) -> str:
    members = (metrics.get("model_card") or {}).get("members")  # type: ignore[union-attr]
    if members:
        return "ensemble of " + ", ".join(f"{m['backbone']} ({m.get('pretrained_from')})" for m in members)
    return f"{config.model.backbone} ({config.model.weights} weights, transfer '{config.model.transfer}')"


def _model_card_html(
    metrics: dict[str, object], evaluation: dict[str, object], config: RunConfig, classes: list[str], externals: list[str]
) -> str:
    """The model card, every line derived from the run's data (no fixed claims)."""
    data = metrics.get("data") or {}
    assert isinstance(data, dict)
    by_split = data.get("by_split") or {}
    train = by_split.get("train", {}) if isinstance(by_split, dict) else {}
    provenance = data.get("provenance") or {}
    assert isinstance(provenance, dict)
    sources = ", ".join(sorted(provenance)) or ", ".join(sorted({k.split(" / ")[0] for k in data.get("by_source_and_class", {})}))  # type: ignore[union-attr]
    training = (f"{train['images']} images of {train['patients_or_groups']} patients/groups from {_e(sources)} "
                f"(validation {by_split['val']['images']} and test {by_split['test']['images']} images held out)"
                if train else f"{data.get('images', '?')} images from {_e(sources)} (train, validation and test parts together)")
    limitations = []
    uncertain = [s for s, p in provenance.items() if isinstance(p, dict) and p.get("uncertain")]
    if uncertain:
        limitations.append(f"training data of uncertain provenance ({_e(', '.join(uncertain))})")
    if any(isinstance(p, dict) and p.get("uncertain") is None for p in provenance.values()):
        limitations.append("provenance of the user's own data as documented by its owner")
    if any(isinstance(p, dict) and "synthetic" in str(p.get("description")) for p in provenance.values()):
        limitations.append("trained on synthetic images: a demonstration, not a medical model")
    if data.get("images_without_patient_id"):
        limitations.append("images without patient IDs were grouped by image similarity")
    limitations.append("slice-level labels")
    sets = evaluation.get("sets") or {}
    assert isinstance(sets, dict)
    small = [n for n, r in sets.items() if isinstance(r.get("patient_level"), dict) and r["patient_level"].get("warning")]
    if small:
        limitations.append(f"fewer than 30 patients per class in {_e(', '.join(small))}: wide intervals")
    limitations.append("heat maps show where the model looked, not where disease is")
    audit = data.get("audit") or {}
    assert isinstance(audit, dict)
    for shortcut in audit.get("shortcuts") or []:  # type: ignore[union-attr]
        limitations.append(f"the data audit found a shortcut: the file property '{_e(shortcut['property'])}' alone separates "
                           f"the classes (AUC {float(shortcut['auc']):.2f}); the model may have learnt it instead of the disease")
    if audit.get("conflicts"):
        limitations.append(f"{audit['conflicts']} training images are duplicates across classes (label conflicts)")
    if not audit.get("checked"):
        limitations.append("the training data were not audited for shortcuts and duplicates")
    home = next((r for r in sets.values() if r.get("kind") == "in-domain"), None)
    if isinstance(home, dict) and (home.get("gate_check") or {}).get("miscalibrated"):  # type: ignore[union-attr]
        limitations.append("the input gate refuses more in-domain images than it was set for (miscalibrated)")
    for name in externals:
        if name not in sets:
            continue
        gate = sets[name].get("gate") or {}
        assert isinstance(gate, dict)
        limitations.append(f"the input gate refused {_refused(gate)} of {_e(name)}'s images"
                           + ("; that set is not evaluable with this model" if not _evaluable(sets[name]) else ""))
    if data.get("cannot_check"):
        limitations.append("no age or sex recorded: fairness across demographic groups cannot be checked")
    if externals:
        lines = []
        for name in externals:
            result = sets.get(name) or {}
            if not result:
                lines.append(f"{_e(name)}: see the summary")
                continue
            gate = result.get("gate") or {}
            assert isinstance(gate, dict)
            if _evaluable(result):
                auc = float(result["metrics"].get("auc", math.nan))  # type: ignore[union-attr]
                lines.append(f"{_e(name)}: slice AUC {_fmt(auc)} on the accepted images, {_refused(gate)} refused by the gate")
            else:
                lines.append(f"{_e(name)}: not evaluable with this model ({_refused(gate)} of its images refused by the gate)")
        external_line = (f"Measured on {len(externals)} external set(s): {'; '.join(lines)}. "
                         + ("One external set cannot say how the model will do in another hospital." if len(externals) == 1 else
                            "Their spread, not any one of them, is the best guide to another hospital."))
    else:
        external_line = "No external data set evaluated yet: performance on another hospital's images is unknown."
    points = list(((evaluation.get("calibration") or {}).get("operating_points") or {}))  # type: ignore[union-attr]
    return (
        '<section id="model-card"><h2>Model card</h2><table class="text">'
        f"<tr><td>Intended use</td><td>{_e(metrics['decision_support'])} A second reader for adult chest CT slices and studies, "
        f"beside a radiologist's own reading; not a stand-alone test, not for children, not validated prospectively. "
        f"Offered operating points: {_e(', '.join(points))}; a high-sensitivity point flags slices for a closer look, it does not rule disease out.</td></tr>"
        f"<tr><td>Model</td><td>{_e(_backbone_line(metrics, config))}</td></tr>"
        f"<tr><td>Input</td><td>{config.data.image_size or 'backbone default'} px grey, classes {_e(', '.join(classes))} (positive: {_e(classes[-1])})</td></tr>"
        f"<tr><td>Training data</td><td>{training}</td></tr>"
        f"<tr><td>External results</td><td>{external_line}</td></tr>"
        f"<tr><td>Limitations</td><td>{'; '.join(limitations)}.</td></tr></table></section>"
    )


def _silhouette_verdict(sil: dict[str, float]) -> str:
    """Sources that separate more clearly than classes: the model may have learnt the hospital, not the disease."""
    label, source = (float(v) if isinstance(v, (int, float)) else math.nan for v in (sil.get("label"), sil.get("source")))
    if math.isnan(label) or math.isnan(source):
        return "<p>With one source (or one class) in the map, sources and classes cannot be compared.</p>"
    if source > label:
        return (f'<p class="warn" id="source-warning">The model\'s embedding separates the data sources ({_fmt(source)}) more clearly '
                f"than the classes ({_fmt(label)}): it may have learnt the hospital, not the disease.</p>")
    return f'<p class="note">Classes separate more clearly ({_fmt(label)}) than sources ({_fmt(source)}).</p>'


def _evaluable(result: dict[str, object]) -> bool:
    evaluable = result.get("evaluable")
    return not isinstance(evaluable, dict) or evaluable.get("evaluable") is not False


def _refused(gate: dict[str, object]) -> str:
    """Refusals with their share: the headline of a set the gate mostly refuses."""
    total = int(gate.get("accepted", 0)) + int(gate.get("refused", 0))  # type: ignore[call-overload]
    refused = int(gate.get("refused", 0))  # type: ignore[call-overload]
    return f"{refused} ({refused / total:.0%})" if total else str(refused)


def _miscalibrated(check: dict[str, object]) -> str:
    return (f"The input gate is miscalibrated: it refused {float(check['refusal_rate']):.1%} of the in-domain test images "  # type: ignore[arg-type]
            f"(95% CI from {float(check['ci_low']):.1%}), above its target of {float(check['target']):.1%} "  # type: ignore[arg-type]
            "(the validation quantile it was set at). It refuses images of the very kind the model was trained on; "
            "refusal rates elsewhere in this report overstate how unfamiliar those images are.")


def _verdict(name: str, result: dict[str, object], home: dict[str, object] | None) -> str:
    """One external set against in-domain: a gain or loss only where the set is evaluable; else its refusal rate."""
    gate = result.get("gate") or {}
    assert isinstance(gate, dict)
    if not _evaluable(result):
        everything = result.get("all_images") or {}
        assert isinstance(everything, dict)
        all_auc = float((everything.get("metrics") or {}).get("auc", math.nan))  # type: ignore[union-attr]
        others = [r for r in result["evaluable"]["reasons"] if not r.startswith("the gate accepted")]  # type: ignore[index]
        total = int(gate.get("accepted", 0)) + int(gate.get("refused", 0))  # type: ignore[call-overload]
        return (f"<strong>{_e(name)}</strong> is <strong>not evaluable with this model</strong>: the gate refused "
                f"{gate.get('refused')} of its {total} images ({int(gate.get('refused', 0)) / max(total, 1):.0%})"  # type: ignore[call-overload]
                + "".join(f"; {_e(r)}" for r in others)
                + ". Figures on the few accepted images are no measure of the model on this set"
                + (f"; on all its images (ungated) the slice AUC is {_fmt(all_auc)}." if not math.isnan(all_auc) else "."))
    m, ci = result["metrics"], result.get("ci", {})
    assert isinstance(m, dict)
    if home is None or "auc" not in m or "auc" not in home["metrics"]:  # type: ignore[operator]
        return ""
    auc, home_auc = float(m["auc"]), float(home["metrics"]["auc"])  # type: ignore[index]
    if math.isnan(auc) or math.isnan(home_auc):
        return ""
    chance = isinstance(ci, dict) and "auc" in ci and ci["auc"]["low"] <= 0.5 <= ci["auc"]["high"]
    accepted = f" on the {gate.get('accepted')} images the gate accepted ({_refused(gate)} refused)" if gate.get("refused") else ""
    return (f"On <strong>{_e(name)}</strong> the slice AUC is {_fmt(auc)}{accepted} against {_fmt(home_auc)} in-domain "
            f"({(auc - home_auc) * 100:+.1f} points)"
            + ("; its 95% CI includes 0.5: <strong>no better than chance</strong> on these images." if chance else "."))


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

    def cell(block: dict[str, object] | None, key: str) -> str:
        if not isinstance(block, dict) or "metrics" not in block:
            return "<td>n/a</td>"
        return f"<td>{_with_interval(block['metrics'].get(key, math.nan), (block.get('ci') or {}).get(key))}</td>"  # type: ignore[union-attr]

    summary_rows = ""
    for name, r in sets.items():
        gate = r.get("gate") or {}
        patient = r.get("patient_level") or {}
        assert isinstance(gate, dict) and isinstance(patient, dict)
        total = int(gate.get("accepted", r["n"])) + int(gate.get("refused", 0))
        row = f'<tr class="{"external" if r.get("kind") == "external" else ""}"><td>{_e(name)}</td><td>{_e(r.get("kind"))}</td><td>{total}</td><td>{_refused(gate)}</td>'
        if _evaluable(r):
            row += cell(r, "auc") + cell(r.get("all_images"), "auc")  # type: ignore[arg-type]
            row += f'<td>{patient.get("patients", "n/a")}</td>' + "".join(cell(patient, k) for k in ("sensitivity", "specificity", "auc"))
        else:
            row += ('<td class="not-evaluable">not evaluable</td>' + cell(r.get("all_images"), "auc")  # type: ignore[arg-type]
                    + '<td colspan="4">not evaluable with this model: ' + _e("; ".join(r["evaluable"]["reasons"])) + "</td>")  # type: ignore[index]
        summary_rows += row + "</tr>"
    externals = [n for n, r in sets.items() if r.get("kind") == "external"]
    home = next((r for r in sets.values() if r.get("kind") == "in-domain"), None)
    verdicts = [_verdict(name, sets[name], home) for name in externals]
    verdict_html = f'<p class="warn">{" ".join(v for v in verdicts if v)}</p>' if any(verdicts) else ""
    gate_check = (home or {}).get("gate_check") or {}
    assert isinstance(gate_check, dict)
    if gate_check.get("miscalibrated"):
        verdict_html += f'<p class="warn" id="gate-miscalibrated">{_e(_miscalibrated(gate_check))}</p>'
    data = metrics.get("data", {})
    assert isinstance(data, dict)
    provenance = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in data.get("by_source_and_class", {}).items())
    audit_html = _audit_html(data.get("audit"))
    tsne = evaluation.get("tsne", {})
    tsne_html = ""
    if run_dir is not None and isinstance(tsne, dict) and (run_dir / str(tsne.get("file", ""))).is_file():
        table = pd.read_csv(run_dir / tsne["file"], keep_default_na=False)
        sil = tsne["silhouette"]
        tsne_html = (
            '<div class="figs">' + "".join(_tsne_svg(table, c) for c in ("label", "source", "set")) + "</div>"
            f"<p>Silhouette in embedding space (cosine; 0 = mixed, 1 = separated): class {_fmt(sil['label'])}, "
            f"source data set {_fmt(sil['source'])}, evaluation set {_fmt(sil['set'])}.</p>" + _silhouette_verdict(sil)
        )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>covidscan report</title><style>{_STYLE}</style></head><body>
<h1>covidscan run report</h1>
<p id="intended-use" class="warn" role="note"><strong>{_e(metrics['decision_support'])}</strong>
In-domain figures are measured on held-out patients of the training data set; external figures on data sets the model never saw.
Every figure is of the decision as deployed: the input gate, the calibration and the study rule that the service applies.</p>
<section id="summary"><h2>Results: in-domain vs external</h2>
<table><tr><th>Evaluation set</th><th>Kind</th><th>Images</th><th>Refused by the gate</th><th>Slice AUC (accepted)</th><th>Slice AUC (all images)</th>
<th>Patients</th><th>Study sensitivity</th><th>Study specificity</th><th>Study AUC</th></tr>{summary_rows}</table>
{verdict_html}
<p>95% CIs under each value: Wilson (proportions) and Newcombe (AUC) intervals with patients as clusters; they stay valid at 0 % and 100 %.
Study figures use the study rule and threshold below, one answer per patient.</p></section>
{_deployed_html(evaluation)}
<section id="provenance"><h2>Data provenance</h2><p>{data.get('images', '?')} images, {data.get('patients_known', '?')} known patients,
{data.get('images_without_patient_id', '?')} images without a patient ID.</p>
<table><tr><th>Source / class</th><th>Images</th></tr>{provenance}</table>{_description_html(data)}{audit_html}</section>
<section id="split"><h2>Split protocol</h2><p>{_split_line(split)}: no group (patient or similarity cluster) appears in more than one part.
Images: train {counts.get('train')}, validation {counts.get('val')}, test {counts.get('test')}{_units_line(data)}.
Model selection, early stopping, calibration, operating points, study rule and gate threshold used the training and validation parts only.</p>
{_leakage_html(split)}</section>
<section id="details"><h2>Results per evaluation set</h2>{"".join(_set_section(n, r, classes, run_dir, i) for i, (n, r) in enumerate(sets.items()))}</section>
<section id="tsne"><h2>Embedding map (t-SNE)</h2>{tsne_html or "<p>Not computed.</p>"}</section>
{_model_html(metrics, config)}
<section id="training"><h2>Training</h2>{_loss_svg(history, int(metrics['training'].get('best_epoch') or 0))}
<p>{f"Kept epoch {metrics['training']['best_epoch']} of {metrics['training']['epochs_run']} (selected on {_e((metrics['training'].get('selection') or {}).get('on', 'loss'))})." if 'best_epoch' in metrics['training'] else "Trained as members (see Model)."}</p></section>
{_model_card_html(metrics, evaluation, config, classes, externals)}
</body></html>
"""
    return atomic.write_text(path, page)
