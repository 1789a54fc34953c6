"""Plotly figures of an evaluation (core.evaluate) for the Evaluate and Train
tabs: the confusion matrix as a heatmap (its cells clickable in the Evaluate
tab), the reliability diagram and the risk-coverage curve."""
from __future__ import annotations

import plotly.graph_objects as go

from core.calibration import ECE_BINS
from core.evaluate import DENSE_MAX


def confusion_figure(classes: list[str], confusion, title: str = "Confusion matrix") -> go.Figure:
    """Heatmap from sparse [true, predicted, count] triples: colour = share of
    the true class (row), text = count. Rows: true class, top to bottom."""
    n = len(classes)
    fig = go.Figure()
    if not n or n > DENSE_MAX or not confusion:
        fig.add_annotation(text="no confusion matrix" if n <= DENSE_MAX else f"{n} classes: too many for a heatmap",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(template="plotly_white", height=300)
        return fig
    m = [[0] * n for _ in range(n)]
    for t, p, c in confusion:
        m[t][p] += c
    share = [[v / (sum(row) or 1) for v in row] for row in m]
    fig.add_trace(go.Heatmap(
        z=share, x=list(classes), y=list(classes), text=m, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        customdata=m, hovertemplate="true %{y}, predicted %{x}: %{customdata} (%{z:.0%} of %{y})<extra></extra>",
        colorbar={"title": {"text": "share of row"}}, xgap=1, ygap=1))
    side = min(640, 240 + 60 * n)
    fig.update_layout(title={"text": title, "x": 0.02, "font": {"size": 15}}, template="plotly_white", height=side,
                      margin={"l": 90, "r": 20, "t": 40, "b": 70})
    fig.update_xaxes(title_text="predicted", type="category", side="bottom")
    fig.update_yaxes(title_text="true class", type="category", autorange="reversed")
    return fig


def reliability_figure(bins: list[dict], ece: float) -> go.Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    used = [b for b in bins if b["count"]]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[(b["lo"] + b["hi"]) / 2 for b in used], y=[b["accuracy"] for b in used],
                         width=[b["hi"] - b["lo"] for b in used], name="accuracy", marker_color="#4c78a8",
                         customdata=[[b["count"], b["confidence"]] for b in used],
                         hovertemplate="accuracy %{y:.3f}<br>mean confidence %{customdata[1]:.3f}<br>"
                                       "%{customdata[0]} images<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                             line={"dash": "dash", "color": "#333"}))
    fig.update_layout(title={"text": f"Reliability (ECE {ece:.4f}, {ECE_BINS} bins)", "x": 0.02, "font": {"size": 15}},
                      template="plotly_white", height=360, margin={"l": 55, "r": 15, "t": 40, "b": 50},
                      showlegend=False)
    fig.update_xaxes(title_text="confidence (top-1 probability)", range=[0, 1])
    fig.update_yaxes(title_text="accuracy", range=[0, 1])
    return fig


def risk_coverage_figure(points: list[dict], min_confidence: float | None = None, at_p: dict | None = None) -> go.Figure:
    """Accuracy of the answers kept against the share kept, as the threshold P rises."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p["coverage"] for p in points], y=[p["accuracy"] for p in points], mode="lines+markers",
                             marker={"size": 4}, customdata=[p["threshold"] for p in points], name="answers kept",
                             hovertemplate="P = %{customdata:.4f}<br>coverage %{x:.3f}<br>accuracy %{y:.3f}"
                                           "<extra></extra>"))
    if at_p and at_p.get("kept"):
        fig.add_trace(go.Scatter(x=[at_p["coverage"]], y=[at_p["accuracy"]], mode="markers+text",
                                 marker={"size": 12, "color": "#e45756", "symbol": "circle-open", "line": {"width": 3}},
                                 text=[f"P = {min_confidence:g}"], textposition="bottom left", name="chosen P"))
    fig.update_layout(title={"text": "Risk-coverage: answer only when p ≥ P", "x": 0.02, "font": {"size": 15}},
                      template="plotly_white", height=360, margin={"l": 55, "r": 15, "t": 40, "b": 50},
                      showlegend=False)
    fig.update_xaxes(title_text="coverage (share answered)", range=[0, 1.02])
    fig.update_yaxes(title_text="accuracy of the answered")
    return fig
