"""One self-contained report.html for an evaluation (core.evaluate): inline SVG
charts and inline JPEG thumbnails, so the file opens offline and fetches nothing
(no script, no stylesheet, no font from elsewhere). Every user-given text
(class names, paths) is HTML-escaped."""
from __future__ import annotations

import base64
import html
import io
import math

from .calibration import ECE_BINS
from .evaluate import DENSE_MAX, EvalResult
from .images import load_rgb

THUMB = 160  # px, the longer side of a top-losses thumbnail
Esc = html.escape


def thumbnail_uri(path: str, side: int = THUMB, overlay=None) -> str | None:
    """A small JPEG of the image (EXIF-upright) as a data: URI; None if it cannot be read.
    overlay(image) -> image: e.g. a CAM blended over it, at the image's own size."""
    try:
        img = load_rgb(path)
        if overlay is not None:
            img = overlay(img)
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # an image that read at prediction and not now (moved, replaced): the sheet shows its name
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _blue(v: float) -> str:
    """White to dark blue for v in [0, 1]."""
    v = min(max(v, 0.0), 1.0)
    r, g, b = (int(round(255 + (t - 255) * v)) for t in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def confusion_svg(res: EvalResult) -> str:
    """Heatmap: cell colour = share of the true class's images (row-normalised),
    cell text = count; a tooltip names the pair."""
    names, m = res.classes, res.dense_confusion()
    n = len(names)
    cell = max(18, min(64, 520 // n))
    label_w = min(160, 8 * max(len(s) for s in names) + 12)
    top = label_w
    w, h = max(label_w + n * cell + 10, label_w + 240), top + n * cell + 30
    out = [f'<svg id="confusion-svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="{max(9, min(13, cell // 3))}">']
    for i, row in enumerate(m):
        total = sum(row) or 1
        for j, v in enumerate(row):
            x, y = label_w + j * cell, top + i * cell
            share = v / total
            colour = "white" if share > 0.5 else "black"
            out.append(f'<g class="cell"><title>true {Esc(names[i])}, predicted {Esc(names[j])}: {v} '
                       f'({share:.0%} of {Esc(names[i])})</title>'
                       f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_blue(share)}" stroke="#ccc"/>'
                       + (f'<text x="{x + cell / 2}" y="{y + cell / 2}" fill="{colour}" text-anchor="middle" '
                          f'dominant-baseline="central">{v}</text>' if cell >= 24 or v else "") + "</g>")
    for i, name in enumerate(names):
        out.append(f'<text x="{label_w - 4}" y="{top + i * cell + cell / 2}" text-anchor="end" '
                   f'dominant-baseline="central">{Esc(name[:20])}</text>')
        cx = label_w + i * cell + cell / 2
        out.append(f'<text x="{cx}" y="{top - 4}" transform="rotate(-45 {cx} {top - 4})">{Esc(name[:20])}</text>')
    out.append(f'<text x="{label_w}" y="{h - 8}">columns: predicted class; rows: true class</text></svg>')
    return "".join(out)


def _axes(w, h, pad, xlabel, ylabel, lo=0.0) -> list[str]:
    """Frame, grid and labels of a unit-square chart (x and y from lo to 1)."""
    out = [f'<rect x="{pad}" y="10" width="{w - pad - 10}" height="{h - pad - 10}" fill="white" stroke="#888"/>']
    for k in range(6):
        v = lo + (1 - lo) * k / 5
        x = pad + (w - pad - 10) * k / 5
        y = h - pad - (h - pad - 10) * k / 5
        out.append(f'<line x1="{pad}" y1="{y}" x2="{w - 10}" y2="{y}" stroke="#eee"/>')
        out.append(f'<text x="{x}" y="{h - pad + 14}" text-anchor="middle">{(k / 5):.1f}</text>')
        out.append(f'<text x="{pad - 4}" y="{y}" text-anchor="end" dominant-baseline="central">{v:.2f}</text>')
    out.append(f'<text x="{(w + pad) / 2}" y="{h - 4}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="12" y="{(h - pad) / 2}" transform="rotate(-90 12 {(h - pad) / 2})" '
               f'text-anchor="middle">{ylabel}</text>')
    return out


def reliability_svg(res: EvalResult, w: int = 420, h: int = 340, pad: int = 48) -> str:
    """Bars: accuracy per confidence bin; the diagonal is perfect calibration;
    red: the gap to the bin's mean confidence."""
    sx, sy = (lambda v: pad + (w - pad - 10) * v), (lambda v: h - pad - (h - pad - 10) * v)
    out = [f'<svg id="reliability-svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="11">'] + _axes(w, h, pad, "confidence (top-1 probability)", "accuracy")
    for b in res.reliability:
        if not b["count"]:
            continue
        x0, x1 = sx(b["lo"]), sx(b["hi"])
        acc, conf = b["accuracy"], b["confidence"]
        out.append(f'<g><title>{b["lo"]:.2f}-{b["hi"]:.2f}: {b["count"]} images, accuracy {acc:.3f}, '
                   f'mean confidence {conf:.3f}</title><rect x="{x0}" y="{sy(acc)}" width="{x1 - x0}" '
                   f'height="{sy(0) - sy(acc)}" fill="#4c78a8" stroke="white"/>'
                   f'<rect x="{x0}" y="{sy(max(acc, conf))}" width="{x1 - x0}" height="{abs(sy(acc) - sy(conf))}" '
                   f'fill="#e45756" fill-opacity="0.35"/></g>')
    out.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" stroke="#333" stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "".join(out)


def risk_coverage_svg(res: EvalResult, w: int = 420, h: int = 340, pad: int = 48) -> str:
    """Accuracy of the answers kept against the share kept, as the confidence
    threshold rises (right to left); the chosen --min-confidence is marked."""
    pts = res.risk_coverage
    lo = math.floor(min([p["accuracy"] for p in pts] + [res.accuracy]) * 10) / 10
    lo = min(lo, 0.9)
    sx = lambda v: pad + (w - pad - 10) * v  # noqa: E731
    sy = lambda v: h - pad - (h - pad - 10) * (v - lo) / (1 - lo)  # noqa: E731
    out = [f'<svg id="risk-coverage-svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="11">'] + _axes(w, h, pad, "coverage (share of images answered)",
                                                                "accuracy of the answered", lo)
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(p['coverage']):.1f},{sy(p['accuracy']):.1f}" for i, p in enumerate(pts))
    out.append(f'<path d="{path}" fill="none" stroke="#4c78a8" stroke-width="2"/>')
    for p in pts[:: max(1, len(pts) // 40)]:
        out.append(f'<circle cx="{sx(p["coverage"]):.1f}" cy="{sy(p["accuracy"]):.1f}" r="2.5" fill="#4c78a8">'
                   f'<title>P = {p["threshold"]:.4f}: coverage {p["coverage"]:.3f}, accuracy {p["accuracy"]:.3f}'
                   f'</title></circle>')
    if res.at_p and res.at_p["kept"]:
        x, y = sx(res.at_p["coverage"]), sy(res.at_p["accuracy"])
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="#e45756" stroke-width="2"/>'
                   f'<text x="{x + 8:.1f}" y="{y - 10:.1f}" fill="#e45756">'
                   f'P = {res.min_confidence:g}</text>')
    out.append("</svg>")
    return "".join(out)


def per_class_table(res: EvalResult) -> str:
    rows = "".join(f"<tr><td>{Esc(r['class'])}</td><td>{r['precision']:.4f}</td><td>{r['recall']:.4f}</td>"
                   f"<td>{r['f1']:.4f}</td><td>{r['support']}</td></tr>" for r in res.per_class)
    for name, a in (("macro avg", res.macro), ("weighted avg", res.weighted)):
        rows += (f"<tr class='avg'><td>{name}</td><td>{a['precision']:.4f}</td><td>{a['recall']:.4f}</td>"
                 f"<td>{a['f1']:.4f}</td><td>{a['support']}</td></tr>")
    return ("<table id='per-class'><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{rows}</table>")


def loss_sheet(items: list[dict], overlay_for=None) -> str:
    """Thumbnails with true / predicted / p; overlay_for(row) -> overlay function or None (e.g. its CAM)."""
    if not items:
        return "<p>none</p>"
    cards = []
    for r in items:
        uri = thumbnail_uri(r["path"], overlay=overlay_for(r) if overlay_for else None)
        img = f"<img src='{uri}' alt='{Esc(r['path'])}'>" if uri else "<div class='gone'>(unreadable now)</div>"
        cards.append(f"<figure>{img}<figcaption>true <b>{Esc(r['true'])}</b><br>predicted <b>{Esc(r['predicted'])}</b>"
                     f" p={r['p']:.3f}{' (unsure)' if r['unsure'] else ''}<br><small>{Esc(short(r['path']))}</small>"
                     f"</figcaption></figure>")
    return "<div class='sheet'>" + "".join(cards) + "</div>"


def short(path: str, keep: int = 2) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-keep:])


CSS = """body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
td:first-child,th:first-child{text-align:left}tr.avg td{font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:24px}.sheet{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px}figure img{max-width:160px;max-height:160px;display:block}
.gone{width:160px;height:100px;background:#eee}.kv td{text-align:left}"""


def report_html(res: EvalResult, checkpoint: str, overlay_for=None) -> str:
    """The whole page. overlay_for: see loss_sheet (CAMs when available)."""
    n = len(res.rows)
    wrong, unsure_right = res.top_losses()
    kv = [("checkpoint", Esc(checkpoint)), ("data", Esc(res.source)),
          ("images", f"{n}" + (f" ({len(res.unreadable)} unreadable, not counted)" if res.unreadable else "")),
          ("accuracy", f"{res.accuracy:.4f}"),
          ("temperature", f"{res.temperature:.4f}" + (" (none fitted)" if res.temperature == 1.0 else "")),
          (f"ECE ({ECE_BINS} bins)", f"{res.ece:.4f}" + ("" if res.temperature == 1.0 else f" (at T=1: {res.ece_t1:.4f})")),
          ("NLL", f"{res.nll:.4f}" + ("" if res.temperature == 1.0 else f" (at T=1: {res.nll_t1:.4f})"))]
    if res.at_p is not None:
        a = res.at_p
        acc = f"{a['accuracy']:.4f}" if a["accuracy"] is not None else "n/a"
        kv.append((f"at min confidence {res.min_confidence:g}",
                   f"{a['kept']}/{a['total']} answered (coverage {a['coverage']:.4f}), accuracy {acc}; "
                   f"{a['total'] - a['kept']} unsure"))
    with_cams = overlay_for is not None and any(overlay_for(r) for r in wrong + unsure_right)
    cam_note = ("<p>Heatmaps: Grad-CAM of the class the model answered, where it found its evidence "
                "(red: most).</p>" if with_cams else "")
    summary = "<table class='kv'>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv) + "</table>"
    notes = "".join(f"<p><b>Warning:</b> {Esc(x)}</p>" for x in res.warnings) + \
        "".join(f"<p>Note: {Esc(x)}</p>" for x in res.notes)
    if len(res.classes) <= DENSE_MAX:
        matrix = confusion_svg(res)
    else:
        names = res.classes
        off = sorted(((c, t, p) for t, p, c in res.confusion if t != p), reverse=True)[:30]
        matrix = ("<p>Too many classes for a heatmap; the most frequent mistakes:</p><ul>" +
                  "".join(f"<li>{Esc(names[t])} &rarr; {Esc(names[p])}: {c}</li>" for c, t, p in off) + "</ul>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>
<style>{CSS}</style></head><body>
<h1>Evaluation report</h1>
{summary}{notes}
<h2>Confusion matrix</h2>
<p>Rows: the true class (its folder); columns: what the model said. Colour: share of the row.</p>
{matrix}
<h2>Per class</h2>
{per_class_table(res)}
<h2>Calibration and the "unsure" trade-off</h2>
<p>Left: when the model says p, is it right that often? Bars on the dashed diagonal are well calibrated.
Right: keep only answers with p &ge; P and call the rest "unsure": the fewer kept (coverage), the more of them right.
Choose P here and pass it as --min-confidence.</p>
<div class="charts">{reliability_svg(res)}{risk_coverage_svg(res)}</div>
<h2>Top losses: most confidently wrong</h2>
{cam_note}{loss_sheet(wrong, overlay_for)}
<h2>Least confident right</h2>
{loss_sheet(unsure_right, overlay_for)}
</body></html>
"""
