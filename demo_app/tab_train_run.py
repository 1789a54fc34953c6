"""The Train tab's run column: Start and Stop, the status line, the live
charts and epoch table, earlier runs to compare, and the run log. A page
opened during a run (a reload, another tab) follows that run here."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

from core.config import TrainConfig
from core.events import BatchProgress, EpochEnded, Notice, RunEnded, RunStarted
from core.errors import UserError
from core.metrics import per_class_summary

from . import eval_plots, plots, runs
from .context import PRIVATE, AppContext
from .messages import error_markdown, os_error_text, say, user_error
from .session import Failed, RunHandle
from .session import log_lines as session_log_lines
from .tab_predict import PredictTab
from .text import md_code, md_text

EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "best"]
# Fixed decimals: a plain float column showed an accuracy of 1.0 as "1" beside "0.9688".
EPOCH_FORMATS = {"train_loss": "{:.4f}", "train_acc": "{:.4f}", "val_loss": "{:.4f}", "val_acc": "{:.4f}",
                 "lr": "{:g}", "seconds": "{:.2f}"}
# Head-only epochs on a small set can end several times a second; each frame
# redraws two Plotly charts, and a browser that falls behind shows Stop late.
# Epoch frames are therefore spaced at least this far apart (the rows are
# never lost: every frame carries the whole history).
MIN_FRAME_S = 0.25
READY = "Ready. Check the dataset, pick a freeze policy and press **Start**."
START_LABEL = "▶ Start training"
PROGRESS_TEXT = {"cache": ("running the frozen layers once per image", "img"),
                 "decode": ("decoding and checking images", "img")}


class RunPanel:
    def __init__(self, ctx: AppContext, predict: PredictTab, make_config: Callable[[dict], TrainConfig]):
        self.ctx, self.predict, self.make_config = ctx, predict, make_config
        self._compared: dict[str, list[str]] = {}  # page (session) -> runs it overlays

    # ------------------------------------------------------------ layout

    def layout(self) -> None:
        self.run_state = gr.State({"history": [], "epochs": 0, "run": None})
        with gr.Column(scale=7, elem_id="train-run"):
            with gr.Row():
                self.start_btn = gr.Button(START_LABEL, variant="primary", elem_id="start-btn")
                self.stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn")
            # The per-batch progress bar draws over its own strip, not over the status text.
            self.progress_strip = gr.Markdown("", elem_id="train-progress", min_height=50, padding=False)
            self.status = gr.Markdown("Ready.", elem_id="train-status", padding=True)
            with gr.Row():
                self.loss_plot = gr.Plot(plots.loss_figure([]), label="Loss", show_label=False, elem_id="loss-plot")
                self.acc_plot = gr.Plot(plots.accuracy_figure([]), label="Accuracy", show_label=False,
                                        elem_id="acc-plot")
            # The best epoch's confusion matrix, shown when a run ends (Evaluate tab: the full report).
            self.cm_plot = gr.Plot(label="Best epoch's confusion matrix", show_label=False, visible=False,
                                   elem_id="train-confusion")
            with gr.Row(equal_height=True):
                self.compare = gr.Dropdown([], value=[], multiselect=True, scale=6, elem_id="compare",
                                           label="Compare policies: overlay earlier runs' val accuracy")
                self.compare_refresh = gr.Button("↻", scale=0, min_width=48, elem_id="compare-refresh")
            self.epochs_table = gr.Dataframe(value=None, headers=EPOCH_COLUMNS, label="Epochs", interactive=False,
                                             elem_id="epochs-table")
            with gr.Accordion("Run log (same lines as the CLI)", open=False):
                self.log_box = gr.Textbox("", lines=12, max_lines=30, show_label=False, elem_id="train-log",
                                          buttons=["copy"])

    def wire(self, demo: gr.Blocks, form: dict[str, gr.components.Component]) -> None:
        """`form`: the settings a run is made of, by name (Start's keyword inputs)."""
        p = self.predict
        frame = [self.status, self.loss_plot, self.acc_plot, self.epochs_table, self.log_box, self.run_state]
        def button(running: bool) -> dict:  # Start greyed out, or back
            return {"fn": lambda: self.start_button(running), "inputs": None, "outputs": self.start_btn,
                    "queue": False, "show_progress": "hidden", **PRIVATE}
        # concurrency_limit=None: a second Start (another tab) reaches the handler and is refused
        # there with a message, instead of waiting silently in Gradio's queue.
        started = self.start_btn.click(**button(True)).then(
            self.start, inputs_kwargs={**form, "compare": self.compare}, outputs=[*frame, self.compare, p.ckpt, self.cm_plot],
            api_name="train", concurrency_limit=None, show_progress="minimal", show_progress_on=[self.progress_strip])
        # .then() does not run after an error (a refused or failed run raises): .failure() does.
        started.failure(**button(False))
        # When the run ends the checkpoint's description and the image's label are redone: the
        # preselected best_acc.pt may be the same path as before, with newer weights in it.
        started.then(**button(False)).then(
            p.checkpoint_info, p.checkpoint_inputs, p.ckpt_info, show_progress="hidden", **PRIVATE).then(
            p.predict_shown, p.page_predict_inputs, [p.label, p.pred_time], show_progress="hidden", **PRIVATE)
        self.stop_btn.click(self.stop_shown, None, [self.status, p.ckpt, p.ckpt_info], concurrency_limit=None,
                            show_progress="hidden", **PRIVATE)
        gr.Button(visible=False).click(self.stop, None, self.status, api_name="stop", concurrency_limit=None)
        self.compare.change(self.compare_changed, [self.compare, self.run_state], self.acc_plot,
                            show_progress="hidden", **PRIVATE)
        self.compare_refresh.click(self.refresh_compare, self.compare, self.compare, **PRIVATE)
        self.watch_outputs = [*frame, p.ckpt, p.ckpt_info, self.start_btn]
        demo.load(self.watch, None, self.watch_outputs, concurrency_limit=None, show_progress="hidden",
                  **PRIVATE).then(self.refresh_compare, self.compare, self.compare, **PRIVATE)  # a followed run joins the list when it ends
        demo.load(self.refresh_compare, self.compare, self.compare, **PRIVATE)

    # ------------------------------------------------------------ earlier runs

    def _overlays(self, names, exclude: str | None = None) -> list[tuple[str, list[dict]]]:
        wanted = [n for n in (names or []) if n != exclude]
        by_name = {r.name: r for r in runs.list_runs(self.ctx.checkpoints_dir)}
        return [(by_name[n].short_name(), by_name[n].history) for n in wanted if n in by_name and by_name[n].history]

    def refresh_compare(self, selected):
        choices = [(r.label(), r.name) for r in runs.list_runs(self.ctx.checkpoints_dir)]
        names = {v for _, v in choices}
        return gr.update(choices=choices, value=[s for s in (selected or []) if s in names])

    def compare_changed(self, selected, state, request: gr.Request = None):
        state = state or {}
        if request is not None:  # what this page compares, for watch() frames drawn while it follows a run
            self._compared.pop(request.session_hash, None)
            self._compared[request.session_hash] = list(selected or [])
            while len(self._compared) > 1000:  # the oldest pages' choices go first (dicts keep insertion order)
                self._compared.pop(next(iter(self._compared)))
        return plots.accuracy_figure(state.get("history", []), state.get("epochs", 0),
                                     self._overlays(selected, state.get("run")))

    # ------------------------------------------------------------ a run

    def _frame(self, status, state, overlays, log_lines) -> dict:
        """Status, charts, epoch table, log and run state: what every training update shows."""
        h, total = state["history"], state["epochs"]
        return {self.status: status, self.loss_plot: plots.loss_figure(h, total),
                self.acc_plot: plots.accuracy_figure(h, total, overlays), self.epochs_table: epochs_frame(h),
                self.log_box: "\n".join(log_lines), self.run_state: state}

    def start(self, compare=None, progress=gr.Progress(), **form):
        """Generator: one update when the run starts, one per epoch, one at the end;
        per-batch progress goes to gr.Progress. `form`: the Train tab's settings."""
        try:
            cfg = self.make_config(form)
            handle = self.ctx.service.start(cfg)
        except (UserError, OSError) as e:  # the status says why too: a pop-up fades, an older status would stay
            message = os_error_text(e) if isinstance(e, OSError) else say(e)
            yield {self.status: error_markdown("Training not started", message)}
            raise user_error(message, "Training not started") from None
        overlays = self._overlays(compare)
        state = {"history": [], "epochs": cfg.epochs, "run": None}
        yield {**self._frame("▶ Setting up: scanning the dataset, loading weights, building the model…",
                             state, overlays, handle.log), self.cm_plot: gr.update(value=None, visible=False)}
        ended, failed = None, None
        # pending: an epoch frame held back by MIN_FRAME_S. -inf, not 0: monotonic()
        # counts from boot, so a machine up for less than MIN_FRAME_S held the first back.
        last_frame, pending = -math.inf, None
        for ev in handle.follow():
            if pending and time.monotonic() - last_frame >= MIN_FRAME_S and not isinstance(ev, RunEnded):
                yield self._frame(pending, state, overlays, handle.log)
                last_frame, pending = time.monotonic(), None
            match ev:
                case BatchProgress(phase=phase, step=step, total=total, epoch=epoch):
                    desc, unit = PROGRESS_TEXT.get(phase, (f"epoch {epoch}/{cfg.epochs} · {phase}", "batch"))
                    progress((step, total), desc=desc, unit=unit)
                case RunStarted():
                    state = {**state, "run": Path(ev.run_dir).name}
                    overlays = self._overlays(compare, state["run"])
                    yield self._frame(f"▶ Run **{md_text(state['run'])}** started: {len(ev.dataset.train.samples)} "
                                      f"train / {len(ev.dataset.val.samples)} val images, {ev.trainable_params:,} of "
                                      f"{ev.total_params:,} parameters train, on {ev.device}.",
                                      state, overlays, handle.log)
                case Notice():
                    yield self._frame(f"⚠ {md_text(say(ev.text).splitlines()[0])} (see the run log)",
                                      state, overlays, handle.log)
                case EpochEnded():
                    state = {**state, "history": handle.history}  # the rows the run's handle keeps
                    star = " ★ new best" if ev.best_acc else ""
                    msg = (f"▶ Epoch {ev.epoch}/{ev.epochs}: val_acc {ev.val_acc:.3f}, val_loss {ev.val_loss:.4f}"
                           f"{star} ({ev.seconds:.1f} s)")
                    if time.monotonic() - last_frame < MIN_FRAME_S:
                        pending = msg
                        continue
                    yield self._frame(msg, state, overlays, handle.log)
                    last_frame, pending = time.monotonic(), None
                case RunEnded():
                    ended = ev
                case Failed():
                    failed = ev
        log_lines = handle.log
        if failed is None and ended is None:  # cannot happen with core's engine; never leave the UI hanging
            failed = Failed(UserError("the training run ended without a result; details are in the server log"))
            log_lines = log_lines + session_log_lines(failed)
        if failed is not None:
            status = error_markdown("Could not train", failed.error)
            if failed.kind == "WeightsError" and failed.error.field == "arch":  # the file's keys do not fit it
                status += ("\n\n→ In this app: choose the **Architecture** the weights file was made for, or "
                           "another file.")
            yield self._frame(status, state, overlays, log_lines)
            raise user_error(failed.error, "Training failed")
        yield {**self._frame(end_status(ended), state, overlays, log_lines), self.compare: self.refresh_compare(compare),
               self.predict.ckpt: self.predict.refresh_checkpoints(ended.best_acc_path), **self.best_confusion(ended)}

    def best_confusion(self, ended: RunEnded) -> dict:
        """The best_acc epoch's confusion matrix as a heatmap, when the run recorded one."""
        if not ended.best_confusion:
            return {self.cm_plot: gr.update(value=None, visible=False)}
        title = f"Best epoch ({ended.best['acc_epoch']}): confusion matrix on val"
        return {self.cm_plot: gr.update(value=eval_plots.confusion_figure(ended.classes, ended.best_confusion, title),
                                        visible=True)}

    @staticmethod
    def start_button(running: bool):
        """Start is greyed out while this page's run trains (a second click would
        be ignored) and comes back when it ends, however it ends. Stop stays
        clickable: any page may stop the one run."""
        return gr.update(interactive=not running, value="Training…" if running else START_LABEL)

    def stop(self) -> str:
        """Waits (up to 10 s) for the run to end, then shows the same final status
        as the Start stream, so the order in which the two arrive does not matter."""
        h = self.ctx.service.stop(wait=10.0)
        if h is None:
            return "No training run is in progress."
        if h.ended is not None:
            return end_status(h.ended)
        if h.failed is not None:
            return error_markdown("Could not train", h.failed.error)
        return "■ Stopping: the run ends after the current batch; completed epochs stay saved."

    def stop_shown(self) -> dict:
        """Stop for the page: with nothing running, a pop-up says so and the
        status keeps the finished run's result. The status names the best
        checkpoint as preselected, so it is, on this page too (which may not be
        the page that started the run), with its description."""
        h = self.ctx.service.current
        if h is None or h.done.is_set():
            gr.Info("No training run is in progress.")
            return gr.skip()
        status = self.stop()
        best = h.ended.best_acc_path if h.ended is not None else None
        return {self.status: status, **(self.predict.preselect(best) if best else {})}

    # ------------------------------------------------------------ a page that joins a run

    def watch(self, poll_s: float = 1.0, request: gr.Request = None):
        """Page load: a run already in progress (started before a reload, or in
        another tab) is followed here, its status, charts, epoch table and log
        redrawn every `poll_s` while it changes, then its final status, with its
        best checkpoint preselected. Start is greyed out meanwhile."""
        h = self.ctx.service.current
        if h is None or h.done.is_set():
            yield {self.status: READY, self.start_btn: self.start_button(False)}
            return
        running, shown = self.start_button(True), None
        while not h.done.wait(0 if shown is None else poll_s):
            status = f"▶ A training run is in progress: {md_text(h.describe())}. Stop works from here too."
            if shown != (len(h.history), len(h.log)):
                shown = (len(h.history), len(h.log))
                yield {**self._watch_frame(status, h, request), self.start_btn: running}
            else:  # the phase's progress and the clock move on: the status line only, no chart redraw
                yield {self.status: status, self.start_btn: running}
        done = self.start_button(False)
        if h.ended is None:
            yield {self.status: error_markdown("Could not train", h.failed.error if h.failed else "no result"),
                   self.log_box: "\n".join(h.log), self.start_btn: done}
            return
        best = h.ended.best_acc_path
        checkpoint = self.predict.preselect(best) if best else {self.predict.ckpt: self.predict.refresh_checkpoints()}
        yield {**self._watch_frame(end_status(h.ended), h, request), **checkpoint, self.start_btn: done}

    def _watch_frame(self, status, h: RunHandle, request=None) -> dict:
        """The run's own state, so 'Compare policies' on this page draws it beside the earlier runs."""
        state = {"history": h.history, "epochs": h.cfg.epochs, "run": Path(h.run_dir).name if h.run_dir else None}
        compared = self._compared.get(request.session_hash, []) if request is not None else []
        return self._frame(status, state, self._overlays(compared, state["run"]), h.log)


def epochs_frame(history: list[dict]):
    """The epochs table: numbers stay numbers (the table sorts them as such),
    shown with fixed decimals through a Styler."""
    rows = [[r["epoch"], r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"], r["lr"], r["seconds"],
             "★" if r.get("best") else ""] for r in history]
    return pd.DataFrame(rows, columns=EPOCH_COLUMNS).style.format(EPOCH_FORMATS)


def end_status(ev: RunEnded) -> str:
    best = ""
    if ev.best_acc_path:
        best = (f" Best epoch **{ev.best['acc_epoch']}** (val_acc {ev.best['acc']:.3f}) → "
                f"{md_code(ev.best_acc_path)} (preselected in the Predict tab's checkpoint list).")
        rows = ev.per_class_rows()
        if rows:
            best += f"<br>Val by class at that epoch: {md_text(per_class_summary(rows))}"
    if ev.status == "completed":
        return f"✔ **Completed**: {ev.epochs_done} epoch(s).{best}"
    if ev.status == "stopped":
        done = f"after {ev.epochs_done} completed epoch(s)" if ev.epochs_done else "before any epoch completed"
        return f"■ **Stopped** {done} ({md_text(ev.message)}).{best}"
    return f"⚠ **Diverged**: {md_text(ev.message)}{best}"
