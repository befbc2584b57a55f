"""A first self-contained HTML report of a run: what was trained, on what, and how well.

No external assets (works offline); every figure shown comes from metrics.json.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from covidscan import atomic
from covidscan.config import RunConfig

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.6rem 1rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.3rem .7rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
"""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _curve_svg(history: list[dict[str, float]]) -> str:
    """Train/val loss per epoch as an inline SVG polyline."""
    if not history:
        return ""
    width, height, pad = 480, 200, 30
    losses = [r["train_loss"] for r in history] + [r["val_loss"] for r in history]
    top = max(losses) * 1.05 or 1.0
    n = max(len(history) - 1, 1)

    def points(key: str) -> str:
        return " ".join(
            f"{pad + i * (width - 2 * pad) / n:.1f},{height - pad - r[key] / top * (height - 2 * pad):.1f}"
            for i, r in enumerate(history)
        )

    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="loss per epoch">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points("train_loss")}"/>'
        f'<polyline fill="none" stroke="#d62728" stroke-width="2" points="{points("val_loss")}"/>'
        f'<text x="{width - pad}" y="{pad}" text-anchor="end" font-size="12">'
        f'<tspan fill="#1f77b4">train loss</tspan> <tspan fill="#d62728">validation loss</tspan></text>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">epoch 1</text>'
        f'<text x="{width - pad}" y="{height - 8}" font-size="11" text-anchor="end">epoch {len(history)}</text></svg>'
    )


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
        + (f" {html.escape(str(split['warning']))}" if split.get("warning") else "")
        + "</p>"
    )


def write_report(path: str | Path, metrics: dict[str, object], history: list[dict[str, float]], config: RunConfig) -> Path:
    test = metrics["test"]
    assert isinstance(test, dict)
    classes = metrics["classes"]
    assert isinstance(classes, list)
    positive, negative = classes[-1], classes[0]
    split = metrics["split"]
    assert isinstance(split, dict)
    ci = metrics.get("test_ci") or {}
    assert isinstance(ci, dict)

    def interval(key: str) -> str:
        if key not in ci:
            return ""
        return f"{_fmt(ci[key]['low'])} – {_fmt(ci[key]['high'])}"

    rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(test[key])}</td><td>{interval(key)}</td></tr>"
        for key, name in (
            ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("sensitivity", "Sensitivity (recall)"),
            ("specificity", "Specificity"), ("precision", "Precision (PPV)"), ("npv", "NPV"), ("f1", "F1"),
            ("auc", "AUC-ROC"), ("auc_pr", "AUC-PR"), ("mcc", "MCC"), ("kappa", "Cohen's kappa"),
            ("brier", "Brier score"), ("ece", "Expected calibration error"),
        )
        if key in test
    )
    confusion = ""
    if "tp" in test:
        confusion = (
            "<h2>Confusion matrix (test, threshold 0.5)</h2><table>"
            f"<tr><th>true \\ predicted</th><th>{html.escape(negative)}</th><th>{html.escape(positive)}</th></tr>"
            f"<tr><th>{html.escape(negative)}</th><td>{test['tn']}</td><td>{test['fp']}</td></tr>"
            f"<tr><th>{html.escape(positive)}</th><td>{test['fn']}</td><td>{test['tp']}</td></tr></table>"
        )
    counts = split["counts"]
    assert isinstance(counts, dict)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>covidscan report</title><style>{_STYLE}</style></head><body>
<h1>covidscan run report</h1>
<p class="warn" role="note"><strong>{html.escape(str(metrics['decision_support']))}</strong>
Figures below are measured on held-out patients of <em>this</em> data set only; they do not show how the model does on another hospital's images.</p>
<h2>Model</h2><table>
<tr><td>Backbone</td><td>{html.escape(config.model.backbone)}</td></tr>
<tr><td>Pretrained weights</td><td>{html.escape(config.model.weights)}</td></tr>
<tr><td>Transfer mode</td><td>{html.escape(config.model.transfer)}</td></tr>
<tr><td>Input size</td><td>{config.data.image_size or 'backbone default'} px</td></tr>
<tr><td>Classes</td><td>{html.escape(', '.join(classes))}</td></tr></table>
<h2>Split</h2><p>By <strong>{html.escape(str(split['by']))}</strong> (seed {split['seed']}): no group (patient or similarity cluster) appears in more than one part.
Images: train {counts.get('train')}, validation {counts.get('val')}, test {counts.get('test')}.
Model selection and early stopping used the validation part only.</p>
{_leakage_html(split)}
<h2>Test metrics (positive class: {html.escape(positive)}, threshold 0.5)</h2>
<table><tr><th>Metric</th><th>Value</th><th>95% CI (bootstrap over test groups)</th></tr>{rows}<tr><td>Images</td><td>{test['n']}</td><td></td></tr></table>
{confusion}
<h2>Training</h2>{_curve_svg(history)}
<p>Best epoch {metrics['training']['best_epoch']} of {metrics['training']['epochs_run']} (lowest validation loss).</p>
<h2>Limitations</h2><ul>
<li>Confidence intervals resample whole test groups (patients or similarity clusters), stratified by class; with few test patients they are wide, and that is the honest answer.</li>
<li>Slice-level metrics; neighbouring slices of one patient are not independent.</li>
</ul></body></html>
"""
    return atomic.write_text(path, page)
