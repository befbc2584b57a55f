"""Write an audit: audit.json (the summary), audit.html (for people), audited manifest (per-image flags)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from covidscan import atomic
from covidscan.data.audit import AuditResult
from covidscan.data.io import read_image
from covidscan.errors import ImageReadError

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
.warn{background:#fdecea;border-left:4px solid #c62828;padding:.5rem 1rem;margin:.4rem 0}
.ok{background:#e8f5e9;border-left:4px solid #2e7d32;padding:.5rem 1rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;font-size:.92rem}
th{background:#f3f3f3}figure{display:inline-block;margin:.3rem;text-align:center;font-size:.75rem;max-width:140px;word-break:break-all}
img{border:1px solid #999}
"""


def _thumbnail(path: str, size: int = 128) -> str:
    try:
        pixels = read_image(path).pixels
    except ImageReadError:
        return ""
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(path: str) -> str:
    src = _thumbnail(path)
    name = html.escape(Path(path).name)
    img = f'<img src="{src}" alt="{name}">' if src else "(unreadable)"
    return f"<figure>{img}<figcaption>{name}</figcaption></figure>"


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(result: AuditResult, title: str, dropped: dict[str, int] | None = None) -> str:
    s = result.summary
    warnings = s["warnings"]
    assert isinstance(warnings, list)
    warn_html = "".join(f'<p class="warn" role="alert">{html.escape(w)}</p>' for w in warnings) or '<p class="ok">No warnings.</p>'
    risks = s["shortcut_risks"]
    assert isinstance(risks, list)
    risk_rows = [
        [r["property"], f"{r['origin']} ({r['kind']})", f"{r['auc']:.3f}", r["distinct_values"],
         "; ".join(f"{x['value'] or '(missing)'} → {x['class']}: {x['purity']:.0%} of {x['images']}" for x in r["rules"]),
         "WARNING" if r["warning"] else ""]
        for r in risks
    ]
    dups = s["exact_duplicates"]
    assert isinstance(dups, list)
    dup_html = "".join(
        f"<div><strong>{'CONFLICTING LABELS ' if d['cross_class'] else ''}{', '.join(d['labels'])}</strong> "
        f"({', '.join(d['sources'])})<br>{''.join(_figure(p) for p in d['paths'][:4])}</div>"
        for d in dups[:12]
    ) or "<p>None.</p>"
    near = s["near_duplicates"]
    assert isinstance(near, dict)
    near_examples = "".join(f"<div>{_figure(a)}{_figure(b)}</div>" for a, b in near["examples_across_classes"][:6])
    by_source = s["by_source"]
    assert isinstance(by_source, dict)
    patients = s["patients"]
    assert isinstance(patients, dict)
    quality = s["quality_outliers"]
    corrupt = s["corrupt"]
    assert isinstance(quality, list) and isinstance(corrupt, list)
    dropped_html = ""
    if dropped is not None:
        dropped_html = "<h2>Excluded from later stages</h2>" + _table(["reason", "images dropped"], [[k, v] for k, v in dropped.items()])
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>covidscan audit: {html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>Data audit: {html.escape(title)}</h1>
<p>{s['images']} images, {s['readable']} readable; audited in {s['seconds']} s.</p>
<h2 id="warnings">Warnings</h2>{warn_html}
<h2 id="balance">Class balance</h2>{_table(["source / class", "images"], [[k, v] for k, v in by_source.items()])}
<p>Patient IDs: {patients['with_id']} images with, {patients['without_id']} without.
Patients per class: {html.escape(str(patients['per_class']))}.</p>
<h2 id="shortcuts">Shortcut risks</h2>
<p>How well each property <em>alone</em> separates the classes (AUC of a one-property classifier, out-of-fold for
categories; 0.5 = no information). File properties above {s['thresholds']['shortcut_auc']} (or values that are
≥{s['thresholds']['purity']:.0%} one class) are warnings; image statistics (mean, contrast) are shown for context,
since disease itself changes them.</p>
{_table(["property", "origin", "AUC", "values", "pure values", ""], risk_rows)}
<h2 id="duplicates">Exact duplicates (identical pixels)</h2>{dup_html}
<h2 id="near-duplicates">Near duplicates (perceptual hash ≤ {near['max_hamming_bits']} of 256 bits)</h2>
<p>{near['pairs']} pairs: {near['within_class']} within a class, {near['across_classes']} across classes,
{near['across_sources']} across sources; {near['images_involved']} images involved. Near duplicates within a class
are usually neighbouring slices of one patient: harmless in training, leakage when they straddle train and test.</p>
{near_examples}
<h2 id="quality">Quality outliers</h2>{_table(["path", "label", "flags"], [[q['path'], q['label'], q['audit_flags']] for q in quality[:50]]) if quality else "<p>None.</p>"}
<h2 id="corrupt">Unreadable files</h2>{_table(["path", "problem"], [[c['path'], c['error']] for c in corrupt[:50]]) if corrupt else "<p>None.</p>"}
{dropped_html}
</body></html>
"""


def write_audit(result: AuditResult, out_dir: str | Path, title: str, dropped: dict[str, int] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "audit.json",
        "html": out_dir / "audit.html",
        "manifest": out_dir / "manifest.audited.csv",
    }
    summary = dict(result.summary)
    if dropped is not None:
        summary["dropped"] = dropped
    atomic.write_json(paths["json"], summary)
    atomic.write_text(paths["html"], render_html(result, title, dropped))
    atomic.write_with(paths["manifest"], lambda tmp: result.properties.to_csv(tmp, index=False))
    return paths
