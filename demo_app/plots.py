"""Plotly figures for the Train tab: loss and accuracy against epoch.

Both charts keep `uirevision="keep"`, so a user's zoom survives the per-epoch
updates. Earlier runs ("Compare policies") are drawn on the accuracy chart as
dashed validation-accuracy lines."""
from __future__ import annotations

import plotly.graph_objects as go

TRAIN_COLOR = "#2563eb"
VAL_COLOR = "#ea580c"
OVERLAY_COLORS = ("#16a34a", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563")


def _base_layout(fig: go.Figure, title: str, y_title: str, max_epoch: int) -> go.Figure:
    x_max = max(1, max_epoch)
    fig.update_layout(
        title={"text": title, "x": 0.02, "font": {"size": 15}},
        template="plotly_white",
        height=360,
        margin={"l": 55, "r": 15, "t": 40, "b": 95},
        legend={"orientation": "h", "y": -0.2, "yanchor": "top", "x": 0.0, "xanchor": "left",
                "font": {"size": 11}},
        hovermode="x unified",
        uirevision="keep",
    )
    fig.update_xaxes(title_text="epoch", range=[0.7, x_max + 0.3], dtick=1 if x_max <= 20 else None,
                     zeroline=False)
    fig.update_yaxes(title_text=y_title, zeroline=False)
    return fig


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in history if r.get(key) is not None]
    return [int(r["epoch"]) for r in rows], [float(r[key]) for r in rows]


def _empty_note(fig: go.Figure, text: str) -> None:
    fig.update_yaxes(showticklabels=False, range=[0, 1])
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 13, "color": "#6b7280"})


def loss_figure(history: list[dict], total_epochs: int = 0) -> go.Figure:
    fig = go.Figure()
    for key, name, color in (("train_loss", "train", TRAIN_COLOR), ("val_loss", "val", VAL_COLOR)):
        x, y = _series(history, key)
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines+markers",
                                 line={"color": color, "width": 2.5}, marker={"size": 8},
                                 hovertemplate="%{y:.4f}"))
    if not history:
        _empty_note(fig, "Press Start: the loss appears here after every epoch")
    last = max([int(r["epoch"]) for r in history] + [0])
    return _base_layout(fig, "Loss (cross-entropy)", "loss", max(total_epochs, last))


def accuracy_figure(history: list[dict], total_epochs: int = 0,
                    overlays: list[tuple[str, list[dict]]] = ()) -> go.Figure:
    """Current run's train/val accuracy, plus dashed val_acc of earlier runs."""
    fig = go.Figure()
    for key, name, color in (("train_acc", "train", TRAIN_COLOR), ("val_acc", "val", VAL_COLOR)):
        x, y = _series(history, key)
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines+markers",
                                 line={"color": color, "width": 2.5}, marker={"size": 8},
                                 hovertemplate="%{y:.3f}"))
    longest = 0
    for i, (name, rows) in enumerate(overlays):
        x, y = _series(rows, "val_acc")
        longest = max([longest] + x)
        fig.add_trace(go.Scatter(x=x, y=y, name=f"{name} (val)", mode="lines+markers",
                                 line={"color": OVERLAY_COLORS[i % len(OVERLAY_COLORS)], "width": 2, "dash": "dash"},
                                 marker={"size": 6, "symbol": "diamond"}, opacity=0.85,
                                 hovertemplate="%{y:.3f}"))
    if not history and not overlays:
        _empty_note(fig, "Accuracy per epoch; pick earlier runs below to compare")
    last = max([int(r["epoch"]) for r in history] + [0])
    fig = _base_layout(fig, "Accuracy", "accuracy", max(total_epochs, last, longest))
    fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%")
    if overlays:  # room for a legend that wraps onto more lines
        fig.update_layout(height=360 + 20 * len(overlays), margin={"b": 95 + 20 * len(overlays)})
    if not history and not overlays:
        fig.update_yaxes(showticklabels=False)
    return fig
