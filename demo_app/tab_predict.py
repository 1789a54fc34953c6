"""The Predict tab: a checkpoint (from the runs list, or uploaded), then one
image or many, and what the model says about them."""
from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from pathlib import Path

import gradio as gr
import pandas as pd

from core.errors import CheckpointError, UserError, first_line
from core.evaluate import is_unsure
from core.images import load_rgb
from core.metrics import folder_check, folder_labels
from core.predict import Predictor, cached_predictor

from . import inference, runs
from .cam_panel import CamPanel
from .components import NotAnImage, SafeImage
from .context import PRIVATE, AppContext
from .datasets import example_images
from .messages import os_error_text, say, shown_error, upload_named, user_error
from .tab_export import ExportPanel
from .text import md_code, md_text

log = logging.getLogger("demo_app")

PRED_COLUMNS = ["file", "top-1", "p", "top-k", "error", "check"]
BATCH_STALE = "ⓘ The checkpoint changed: press **Classify all** to classify these images with it."
# core's advice for a refused pickle ({choice:trust_pickle=1}, after "Only if you trust where it
# came from: ") in the app's words: tick the box, or, when its owner did not start it with
# --allow-pickle-uploads (the box is hidden then, and a client's "trust" is ignored), that it cannot.
TRUST_HINT = "tick 'Trust pickle'"
PICKLE_OFF = ("this app does not load such files; only on their own machine can its owner allow them, for files "
              "they trust (python app.py --allow-pickle-uploads, or predict.py --trust-pickle 1)")


class PredictTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.cam = CamPanel(self)  # Grad-CAM beside the label and under the gallery
        self.export = ExportPanel(ctx, self)

    # ------------------------------------------------------------ layout

    def layout(self) -> None:
        pickles = self.ctx.policy.allow_pickle
        with gr.Tab("Predict", id="predict", elem_id="tab-predict"), gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                self.example_paths = gr.State([])  # (inside a tab: a State beside the tabs would count as one)
                gr.Markdown("### Checkpoint", elem_classes="section-title")
                with gr.Group():
                    with gr.Row(equal_height=True):
                        self.ckpt = gr.Dropdown([], label="Trained checkpoint (runs under checkpoints/)",
                                                allow_custom_value=True, scale=6, elem_id="checkpoint")
                        self.ckpt_refresh = gr.Button("↻", scale=0, min_width=48, elem_id="checkpoint-refresh")
                    self.ckpt_file = gr.File(label="…or upload a checkpoint (.pt / .pth / exported .safetensors); "
                                             "it overrides the list", file_types=[".pt", ".pth", ".safetensors"],
                                             type="filepath", height=140,
                                             elem_id="checkpoint-upload")
                    # Shown only when the owner started the app with --allow-pickle-uploads;
                    # hidden, it still takes a value over the API, which the handlers ignore.
                    self.trust = gr.Checkbox(False, label="Trust pickle (needed for full-model files)",
                                             elem_id="trust-pickle", visible=pickles)
                    gr.Markdown("⚠ A pickled full model can run arbitrary code when loaded. Tick this only "
                                "for files you made yourself or fully trust.", elem_id="pickle-warning",
                                padding=True, visible=pickles)
                self.ckpt_info = gr.Markdown("", elem_id="checkpoint-info", padding=True)
                self.export.layout()
                self.k = gr.Slider(1, 10, value=3, step=1, label="Top-k", elem_id="top-k")
                self.min_conf = gr.Slider(0, 1, value=0, step=0.01, elem_id="min-confidence",
                                          label="Min confidence: below it the answer is 'unsure' (0: always answer)")
                gr.Markdown("### Examples from the dataset (val/ when it has one; click one)",
                            elem_classes="section-title")
                self.examples = gr.Gallery(label="Examples", show_label=False, columns=4, height=260,
                                           allow_preview=False, object_fit="cover", buttons=[], elem_id="examples")
            with gr.Column(scale=7):
                gr.Markdown("### One image", elem_classes="section-title")
                with gr.Row(equal_height=False):
                    # png: an example set from the server reaches the model losslessly (webp would not)
                    self.image = SafeImage(type="pil", sources=["upload", "webcam", "clipboard"], height=300,
                                           format="png", label="Drop, paste or capture an image",
                                           elem_id="predict-image")
                    with gr.Column():
                        self.label = gr.Label(num_top_classes=10, label="Top-k", elem_id="predict-label")
                        self.pred_time = gr.Markdown("", elem_id="predict-time")
                        self.predict_btn = gr.Button("Predict", variant="primary", elem_id="predict-btn")
                    self.cam.layout_single()
                gr.Markdown("### Many images", elem_classes="section-title")
                with gr.Row(equal_height=False):
                    self.files = gr.File(file_count="multiple", type="filepath", label="Upload images",
                                         height=110, elem_id="batch-files")
                    with gr.Column():
                        self.folder = gr.Textbox(label="…or a folder path on this machine",
                                                 info=self.ctx.folders_note(), placeholder="e.g. data/val",
                                                 elem_id="batch-folder")
                        self.batch_btn = gr.Button("Classify all", variant="primary", elem_id="batch-btn")
                self.batch_summary = gr.Markdown("", elem_id="batch-summary")
                self.batch_table = gr.Dataframe(value=None, headers=PRED_COLUMNS, interactive=False, wrap=True,
                                                max_height=320, elem_id="batch-table", label="Predictions")
                self.batch_gallery = gr.Gallery(label="Predictions", columns=6, height=280, object_fit="cover",
                                                elem_id="batch-gallery")
                self.cam.layout_batch()
                self.batch_csv = gr.File(label="CSV", interactive=False, elem_id="batch-csv", height=60)

    @property
    def checkpoint_inputs(self) -> list:
        return [self.ckpt, self.ckpt_file, self.trust]

    @property
    def predict_inputs(self) -> list:
        return [self.image, self.k, *self.checkpoint_inputs]

    @property
    def page_predict_inputs(self) -> list:
        """predict_inputs and the min-confidence slider (the page's events; the API keeps predict_inputs)."""
        return [*self.predict_inputs, self.min_conf]

    @property
    def batch_outputs(self) -> list:
        return [self.batch_table, self.batch_gallery, self.batch_csv, self.batch_summary, self.cam.gallery_paths]

    @property
    def batch_page_outputs(self) -> list:
        return [*self.batch_outputs, *self.cam.batch_view]

    def wire(self, demo: gr.Blocks) -> None:
        ckpt_changed = [self.ckpt.change, self.ckpt_file.change, self.trust.change]
        self.ckpt_refresh.click(self.refresh_checkpoints, self.ckpt, self.ckpt, api_name="refresh_checkpoints")
        gr.on(ckpt_changed, self.checkpoint_info, self.checkpoint_inputs, self.ckpt_info, show_progress="minimal",
              **PRIVATE)
        self.predict_btn.click(self.predict_shown, self.page_predict_inputs, [self.label, self.pred_time], **PRIVATE)
        # A new checkpoint re-labels the image shown (else an old result, or an old error, stays on screen).
        gr.on([self.image.change, self.k.change, self.min_conf.change, *ckpt_changed], self.predict_shown,
              self.page_predict_inputs,
              [self.label, self.pred_time], show_progress="minimal", **PRIVATE)
        self.examples.select(self.example_selected, self.example_paths, self.image, **PRIVATE)
        batch_inputs = [self.files, self.folder, self.k, *self.checkpoint_inputs]
        gr.on([self.batch_btn.click, self.folder.submit], self.predict_batch_shown, [*batch_inputs, self.min_conf],
              self.batch_page_outputs, **PRIVATE)
        gr.on(ckpt_changed, self.batch_stale, self.batch_summary, self.batch_page_outputs, show_progress="hidden",
              **PRIVATE)
        # The API endpoints raise errors (the page shows them inline instead); hidden buttons carry them.
        gr.Button(visible=False).click(self.predict, self.predict_inputs, [self.label, self.pred_time],
                                       api_name="predict")
        gr.Button(visible=False).click(self.predict_batch, batch_inputs, self.batch_outputs, api_name="predict_batch")
        demo.load(self.refresh_checkpoints, self.ckpt, self.ckpt, **PRIVATE)
        self.cam.wire()
        self.export.wire()

    # ------------------------------------------------------------ checkpoint

    def refresh_checkpoints(self, current=None):
        choices = runs.checkpoint_choices(self.ctx.checkpoints_dir)
        values = [v for _, v in choices]
        value = current if current in values else (values[0] if values else None)
        return gr.update(choices=choices, value=value)

    def preselect(self, best: str) -> dict:
        """The checkpoint list with `best` chosen, and its description, redone too:
        a best_acc.pt may keep its path while its weights changed."""
        return {self.ckpt: self.refresh_checkpoints(best), self.ckpt_info: self.checkpoint_info(best, None, False)}

    def load(self, selected, uploaded, trust) -> Predictor:
        """The chosen checkpoint's predictor; only UserError escapes (a malformed
        file that core's checks miss is still said, the traceback goes to the
        server log). Unpickling is the server's decision: a client's `trust`
        counts only if the app was started with --allow-pickle-uploads. A typed
        path (not an upload) obeys the access policy."""
        allowed = self.ctx.policy.allow_pickle
        path = inference.choose_checkpoint(selected, uploaded)
        if not uploaded:
            self.ctx.policy.check(path, "Checkpoint")
        try:
            return cached_predictor(path, "auto", bool(trust) and allowed)
        except UserError as e:
            if uploaded:
                upload_named(e, path)
            if e.field != "trust_pickle":
                raise
            advice = {("trust_pickle", "1"): TRUST_HINT if allowed else PICKLE_OFF}
            raise CheckpointError(say(e, choices=advice), field=e.field, value=e.value) from None
        except MemoryError:
            raise CheckpointError(f"checkpoint {path} is too large to load into memory") from None
        except Exception as e:
            log.error("loading checkpoint %s failed:\n%s", path, traceback.format_exc())
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first_line(e)}); "
                                  f"it is damaged or not one this app can read") from None

    def checkpoint_info(self, selected, uploaded, trust) -> str:
        try:
            return inference.describe(self.load(selected, uploaded, trust),
                                      inference.choose_checkpoint(selected, uploaded))
        except UserError as e:
            return "⚠ " + md_text(say(e))

    def _predictor(self, selected, uploaded, trust) -> Predictor:
        try:
            return self.load(selected, uploaded, trust)
        except UserError as e:
            raise user_error(e, "Checkpoint problem") from None

    # ------------------------------------------------------------ one image

    def predict(self, image, k, selected, uploaded, trust) -> dict:
        """-> {label: {class: p} of the top k, timing markdown}."""
        if image is None:
            return {self.label: None, self.pred_time: ""}
        if isinstance(image, NotAnImage):
            raise user_error(str(image), "Not an image")
        pred = self._predictor(selected, uploaded, trust)
        try:
            t0 = time.perf_counter()
            topk = pred.predict_image(image, int(k))  # a PIL image, or a path
        except CheckpointError as e:  # the model's output is not finite: no result, and not the image's fault
            raise user_error(e, "Checkpoint problem") from None
        except UserError as e:
            raise user_error(e, "Not an image") from None
        ms = (time.perf_counter() - t0) * 1000
        return {self.label: {name: float(p) for name, p in topk},
                self.pred_time: f"Prediction took **{ms:.0f} ms** on {pred.device.type} · top-{len(topk)} of "
                                f"{len(pred.class_names)} classes"}

    def predict_shown(self, image, k, selected, uploaded, trust, min_conf=None) -> dict:
        """predict() for the page: a problem clears the old label and is said
        beside it (raised, it would leave the last answer on screen under an
        error badge). Below `min_conf` the answer is 'unsure' (core.evaluate.is_unsure)."""
        try:
            out = self.predict(image, k, selected, uploaded, trust)
        except gr.Error as e:
            return {self.label: None, self.pred_time: shown_error(e)}
        scores = out[self.label]
        if scores and min_conf:
            best, p = max(scores.items(), key=lambda kv: kv[1])
            if is_unsure(p, float(min_conf)):
                out[self.pred_time] = (f"**Unsure**: the best guess {md_code(best)} has p = {p:.3f}, below the "
                                       f"minimum confidence {float(min_conf):.2f}<br>{out[self.pred_time]}")
        return out

    # ------------------------------------------------------------ many images

    def predict_batch(self, files, folder, k, selected, uploaded, trust, min_conf=None) -> dict:
        """-> {table, gallery, CSV path, summary markdown}. Below `min_conf` an
        answer is 'unsure' (best guess still shown; the CSV gets an unsure column)."""
        min_conf = float(min_conf) if min_conf else None
        folder = (folder or "").strip()
        try:  # the folder first: a refused one is said whatever the checkpoint
            if folder:
                self.ctx.policy.check_tree(folder, "Folder")
            paths = inference.batch_paths(files, folder)
        except UserError as e:
            raise user_error(e, "No images") from None
        except OSError as e:
            raise user_error(os_error_text(e), "No images") from None
        pred = self._predictor(selected, uploaded, trust)
        uploads = {str(f): Path(f).name for f in (files or [])}
        names = [inference.display_name(p, folder, uploads) for p in paths]
        try:
            preds = list(pred.predict_paths(paths, int(k)))
        except UserError as e:  # the model's output is not finite (an unreadable image is a row's error)
            raise user_error(e, "Checkpoint problem") from None
        # images in folders named after classes (val/<class>/...) are checked against them; uploads are not
        labels = folder_labels([None if p in uploads else p for p in paths], pred.class_names)
        counts = Counter(p.label for p in preds if not p.error)
        bad = len(preds) - counts.total()
        summary = f"**{counts.total()}** image(s) classified: " + \
            (", ".join(f"{md_text(c)} × {n}" for c, n in sorted(counts.items())) or "none")
        if bad:
            summary += f" · ⚠ {bad} file(s) could not be read (see the error column)"
        if min_conf:
            n_unsure = sum(is_unsure(p.p, min_conf) for p in preds if not p.error)
            summary += f" · **{n_unsure}** unsure (p below {min_conf:.2f}; best guess shown)"
        check = folder_check([p.label for p in preds], labels)  # label is None for an unreadable file
        summary += inference.folder_check_summary(check, preds, names)
        if counts.total() > inference.GALLERY_LIMIT:
            summary += f" · gallery shows the first {inference.GALLERY_LIMIT}" + (" (wrong ones first)" if check[2] else "")
        used = Path(inference.choose_checkpoint(selected, uploaded))
        summary += f" · by {md_code(used.name if uploaded else used.parent.name + '/' + used.name)}"
        table = pd.DataFrame(inference.table_rows(preds, names, labels, min_conf), columns=PRED_COLUMNS).style.format(
            {"p": "{:.4f}"}, na_rep="")  # fixed decimals: 0.777 beside 0.8609 read as less precise
        gallery, shown = inference.gallery_entries(preds, names, labels, check[2], min_conf)
        return {self.batch_table: table, self.batch_gallery: gallery, self.cam.gallery_paths: shown,
                self.batch_csv: inference.write_csv(preds, names, labels, min_conf), self.batch_summary: summary}

    def predict_batch_shown(self, files, folder, k, selected, uploaded, trust, min_conf=None) -> dict:
        """predict_batch() for the page: a problem replaces the old results."""
        try:
            return {**self.predict_batch(files, folder, k, selected, uploaded, trust, min_conf),
                    **self.cam.view_cleared()}
        except gr.Error as e:
            return {**self._cleared(), self.batch_summary: shown_error(e)}

    def _cleared(self) -> dict:
        return {self.batch_table: None, self.batch_gallery: None, self.batch_csv: None, self.cam.gallery_paths: [],
                **self.cam.view_cleared()}

    def batch_stale(self, summary) -> dict:
        """The checkpoint changed: results on screen are the old model's. Cleared,
        and the summary says how to redo them."""
        if not summary or "image(s) classified" not in summary:  # no results (or an error) on screen
            return gr.skip()  # (an empty dict would be taken as one value)
        return {**self._cleared(), self.batch_summary: BATCH_STALE}

    # ------------------------------------------------------------ examples

    def show_examples(self, data_dir) -> dict:
        """Gallery of validation images (thumbnails) of the Train tab's dataset, and their paths."""
        try:
            items = example_images(self.ctx.dataset_folder(data_dir))
        except (UserError, OSError):  # an emptied box, or a folder the policy refuses: Check dataset says why
            return {self.examples: [], self.example_paths: []}
        thumbs = [(inference.thumbnail(p, 160), caption, p) for p, caption in items]
        keep = [t for t in thumbs if t[0] is not None]
        return {self.examples: [(t, c) for t, c, _ in keep], self.example_paths: [p for _, _, p in keep]}

    @staticmethod
    def example_selected(paths, evt: gr.SelectData):
        try:
            return load_rgb(paths[evt.index])
        except (IndexError, TypeError, UserError):
            return gr.skip()
