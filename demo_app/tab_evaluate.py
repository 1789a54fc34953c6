"""The Evaluate tab: a checkpoint and a labelled folder, then what evaluate.py
reports (core.evaluate): accuracy, per-class table, a confusion matrix whose
cells open their images, the reliability diagram, the risk-coverage curve,
the top losses, and the report.html / predictions.csv to download."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from core.fileio import atomic_write_csv, atomic_write_text
from core.errors import UserError
from core.images import load_rgb
from core.evaluate import default_data, evaluate, labelled_images, loss_cams
from core.report import report_html

from . import eval_plots, inference
from .context import PRIVATE, AppContext, served_folder
from .messages import shown_error, user_error
from .tab_predict import PredictTab
from .text import md_code, md_text

CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]
CELL_LIMIT = 60  # images a clicked cell shows
# Plotly's click on a heatmap cell -> the hidden #eval-cell-click box -> show_cell. gr.Plot has no
# click event of its own (only change); the figure's div gets a plotly_click listener each time it is redrawn.
BIND_CLICKS = """() => {
  const bind = (tries) => {
    const el = document.querySelector('#eval-confusion .js-plotly-plot');
    if (!el || !el.on) { if (tries > 0) setTimeout(() => bind(tries - 1), 200); return; }
    if (el.__tlBound) return;
    el.__tlBound = true;
    el.on('plotly_click', (ev) => {
      const pt = ev.points && ev.points[0];
      if (!pt) return;
      const box = document.querySelector('#eval-cell-click textarea, #eval-cell-click input');
      box.value = JSON.stringify({true: String(pt.y), predicted: String(pt.x), at: Date.now()});
      box.dispatchEvent(new Event('input', {bubbles: true}));
    });
  };
  bind(50);
}"""


class EvaluateTab:
    def __init__(self, ctx: AppContext, predict: PredictTab):
        self.ctx, self.predict = ctx, predict  # checkpoints load as the Predict tab loads them (policy, errors)

    # ------------------------------------------------------------ layout

    def layout(self) -> None:
        with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
            self.result = gr.State(None)  # {classes, rows}: what a clicked cell looks up
            with gr.Row(equal_height=True):
                self.ckpt = gr.Dropdown([], label="Trained checkpoint (runs under checkpoints/)",
                                        allow_custom_value=True, scale=6, elem_id="eval-checkpoint")
                self.ckpt_refresh = gr.Button("↻", scale=0, min_width=48, elem_id="eval-checkpoint-refresh")
                self.folder = gr.Textbox(label="Labelled folder (<class>/ sub-folders, or a dataset root with val/)",
                                         info=self.ctx.folders_note() or "empty: the validation split the checkpoint "
                                                                         "was trained with",
                                         placeholder="e.g. data/val", scale=6, elem_id="eval-folder")
            with gr.Row(equal_height=True):
                self.min_conf = gr.Slider(0, 1, value=0, step=0.01, scale=4, elem_id="eval-min-confidence",
                                          label="Min confidence: answers below it count as 'unsure'")
                self.run_btn = gr.Button("Evaluate", variant="primary", scale=1, elem_id="eval-btn")
            self.summary = gr.Markdown("", elem_id="eval-summary", padding=True)
            with gr.Row(equal_height=False):
                with gr.Column(scale=6):
                    self.confusion = gr.Plot(label="Confusion matrix", show_label=False, elem_id="eval-confusion")
                    gr.Markdown("Click a cell to see its images.", elem_id="eval-click-hint")
                with gr.Column(scale=5):
                    self.per_class = gr.Dataframe(value=None, headers=CLASS_COLUMNS, interactive=False,
                                                  label="Per class", elem_id="eval-per-class")
                    self.cell_title = gr.Markdown("", elem_id="eval-cell-title")
                    self.cell_gallery = gr.Gallery(label="Images of the clicked cell", columns=5, height=300,
                                                   object_fit="cover", elem_id="eval-cell-gallery")
            self.cell_click = gr.Textbox(visible="hidden", elem_id="eval-cell-click")
            with gr.Row():
                self.reliability = gr.Plot(label="Reliability", show_label=False, elem_id="eval-reliability")
                self.risk = gr.Plot(label="Risk-coverage", show_label=False, elem_id="eval-risk-coverage")
            gr.Markdown("### Top losses: most confidently wrong, then least confident right",
                        elem_classes="section-title")
            self.losses = gr.Gallery(label="Top losses", columns=6, height=300, object_fit="cover",
                                     elem_id="eval-top-losses")
            self.files = gr.File(label="report.html and predictions.csv", file_count="multiple", interactive=False,
                                 elem_id="eval-files", height=90)

    @property
    def outputs(self) -> list:
        return [self.summary, self.confusion, self.per_class, self.reliability, self.risk, self.losses, self.files,
                self.result, self.cell_title, self.cell_gallery]

    def wire(self, demo: gr.Blocks) -> None:
        inputs = [self.ckpt, self.folder, self.min_conf]
        self.ckpt_refresh.click(self.predict.refresh_checkpoints, self.ckpt, self.ckpt, **PRIVATE)
        gr.on([self.run_btn.click, self.folder.submit], self.evaluate_shown, inputs, self.outputs,
              show_progress="minimal", **PRIVATE)
        self.confusion.change(None, js=BIND_CLICKS, **PRIVATE)
        self.cell_click.change(self.show_cell, [self.cell_click, self.result], [self.cell_title, self.cell_gallery],
                              show_progress="minimal", **PRIVATE)
        gr.Button(visible=False).click(self.evaluate, inputs, self.outputs, api_name="evaluate")
        demo.load(self.predict.refresh_checkpoints, self.ckpt, self.ckpt, **PRIVATE)

    # ------------------------------------------------------------ handlers

    def evaluate(self, selected, folder, min_conf, progress=gr.Progress()) -> dict:
        """Predict every image of the folder and show the metrics; raises gr.Error for a problem."""
        folder = (folder or "").strip()
        pred = self.predict._predictor(selected, None, False)
        try:
            if folder:
                self.ctx.policy.check_tree(folder, "Labelled folder")
            else:  # the checkpoint's own data folder: a typed path's rules apply to it too
                self.ctx.policy.check_tree(default_data(pred.info, selected)[0], "Labelled folder")
            labelled = labelled_images(folder or None, pred.class_names, pred.info, selected)
            p = float(min_conf) if min_conf else None
            res = evaluate(pred, labelled, p,
                           progress=lambda i, n: progress((i, n), desc="classifying", unit="img"))
        except UserError as e:
            raise user_error(e, "Cannot evaluate") from None
        wrong, right = res.top_losses()
        cams = loss_cams(pred, wrong + right) or {}  # Grad-CAM of the answered class, when core.cam is there
        out = served_folder("tl_evaluate_")
        html = atomic_write_text(out / "report.html", report_html(res, str(selected), lambda r: cams.get(r["path"])))
        csv = atomic_write_csv(out / "predictions.csv", res.csv_rows())
        losses = [(with_cam(r["path"], cams), f"✗ {r['true']} → {r['predicted']} p={r['p']:.2f}") for r in wrong] + \
                 [(with_cam(r["path"], cams), f"✓ {r['true']} p={r['p']:.2f}") for r in right]
        table = pd.DataFrame([[r[c] for c in CLASS_COLUMNS] for r in res.per_class] +
                             [[name, a["precision"], a["recall"], a["f1"], a["support"]]
                              for name, a in (("macro avg", res.macro), ("weighted avg", res.weighted))],
                             columns=CLASS_COLUMNS)
        return {self.summary: summary_markdown(res), self.per_class: table.style.format(
                    {"precision": "{:.4f}", "recall": "{:.4f}", "f1": "{:.4f}"}),
                self.confusion: eval_plots.confusion_figure(res.classes, res.confusion),
                self.reliability: eval_plots.reliability_figure(res.reliability, res.ece),
                self.risk: eval_plots.risk_coverage_figure(res.risk_coverage, res.min_confidence, res.at_p),
                self.losses: [(im, c) for im, c in losses if im is not None], self.files: [str(html), str(csv)],
                self.result: {"classes": res.classes, "rows": [{k: r[k] for k in ("path", "true", "predicted", "p")}
                                                               for r in res.rows]},
                self.cell_title: "", self.cell_gallery: None}

    def evaluate_shown(self, selected, folder, min_conf, progress=gr.Progress()) -> dict:
        """evaluate() for the page: a problem replaces the old results and is said in the summary."""
        try:
            return self.evaluate(selected, folder, min_conf, progress)
        except gr.Error as e:
            return {**{c: None for c in self.outputs}, self.summary: shown_error(e), self.cell_title: ""}

    @staticmethod
    def show_cell(clicked, result) -> dict | tuple:
        """The images of one confusion-matrix cell (true class, predicted class)."""
        try:
            cell = json.loads(clicked or "")
            true, predicted = str(cell["true"]), str(cell["predicted"])
        except (ValueError, KeyError, TypeError):
            return gr.skip(), gr.skip()
        if not result:
            return "", None
        rows = sorted((r for r in result["rows"] if r["true"] == true and r["predicted"] == predicted),
                      key=lambda r: -r["p"])
        shown = [(inference.thumbnail(r["path"], 200), f"{Path(r['path']).name} p={r['p']:.2f}")
                 for r in rows[:CELL_LIMIT]]
        more = f" (the first {CELL_LIMIT} shown)" if len(rows) > CELL_LIMIT else ""
        verdict = "right" if true == predicted else "wrong"
        title = f"**{len(rows)}** image(s) of {md_code(true)} predicted {md_code(predicted)} ({verdict}){more}"
        return title, [(im, c) for im, c in shown if im is not None]


def with_cam(path: str, cams: dict, size: int = 200):
    """A thumbnail of the image, its Grad-CAM blended over it when there is one."""
    overlay = cams.get(path)
    if overlay is None:
        return inference.thumbnail(path, size)
    try:
        img = overlay(load_rgb(path))
    except UserError:
        return None
    img.thumbnail((size, size))
    return img


def summary_markdown(res) -> str:
    n = len(res.rows)
    right = sum(r["correct"] for r in res.rows)
    text = (f"**Accuracy {res.accuracy:.4f}** ({right}/{n}) on {md_code(res.source)} · "
            f"ECE {res.ece:.4f} at temperature {res.temperature:.3f}")
    if res.temperature != 1.0:
        text += f" (at T=1: {res.ece_t1:.4f})"
    if res.at_p is not None:
        a = res.at_p
        acc = f"{a['accuracy']:.4f}" if a["accuracy"] is not None else "n/a"
        text += (f" · at min confidence {res.min_confidence:g}: **{a['kept']}/{a['total']}** answered "
                 f"(coverage {a['coverage']:.3f}), accuracy **{acc}**, {a['total'] - a['kept']} unsure")
    if res.unreadable:
        text += f" · ⚠ {len(res.unreadable)} image(s) could not be read"
    for warning in res.warnings:
        text += f"<br>⚠ {md_text(warning)}"
    for note in res.notes:
        text += f"<br>ⓘ {md_text(note)}"
    return text
