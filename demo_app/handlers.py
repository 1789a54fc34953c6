"""Event handlers: turn UI values into core calls and core results into
component values. User errors (core.errors.UserError) become gr.Error with the
core message; nothing here re-implements training, prediction or summaries."""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from core.access import AccessPolicy
from core.config import MAX_CLASSES, TrainConfig, check_val_split
from core.engine import BatchProgress, EpochEnded, Notice, RunEnded, RunStarted
from core.errors import CheckpointError, UserError
from core.images import load_rgb
from core.metrics import folder_check, folder_labels, per_class_summary

from . import datasets, inference, modelview, plots, runs
from .components import NotAnImage
from .session import Failed, TrainingService, os_error_text
from .text import html_text, md_block, md_code, md_text

EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "best"]
PRED_COLUMNS = ["file", "top-1", "p", "top-k", "error", "check"]
# Head-only epochs on a small set can end several times a second; each frame
# redraws two Plotly charts, and a browser that falls behind shows Stop late.
# Epoch frames are therefore spaced at least this far apart (the rows are
# never lost: every frame carries the whole history).
MIN_FRAME_S = 0.25
READY = "Ready. Check the dataset, pick a freeze policy and press **Start**."
BATCH_STALE = "ⓘ The checkpoint changed: press **Classify all** to classify these images with it."
START_LABEL = "▶ Start training"
LAYER_COLUMNS = ["layer", "type", "output shape", "params", "trains", "note"]
WEIGHT_SOURCES = [("ImageNet (torchvision)", "imagenet"), ("None (random init)", "none"), ("Local file", "local file")]


# core's messages name the CLI's flags; the app shows its own field names instead.
FIELD_NAMES = {"--epochs": "Epochs", "--batch-size": "Batch size", "--lr": "Learning rate",
               "--weight-decay": "Weight decay", "--dropout": "Head dropout", "--run-name": "Run name",
               "--val-split": "Validation fraction (Advanced)", "--data-dir": "Dataset folder",
               "--arch": "Architecture", "--augment": "Augmentation", "--seed": "Seed",
               "--device": "Device (Advanced)", "--weights": "Pretrained weights", "--policy": "Freeze policy"}
# (not inside a word or right after a quote: a class folder named '--lr 3' stays as it is)
_FLAG_RE = re.compile(r"(?<![\w'/-])(?:" + "|".join(re.escape(f) for f in FIELD_NAMES) + r")(?![\w-])")
_UPLOAD_DIR_RE = re.compile(re.escape(str(Path(tempfile.gettempdir()) / "gradio")) + r"/[0-9a-f]+/")


_PASS_FLAG_RE = re.compile(r"\bpass (?:its parent, )?(--[\w-]+) (\S+?)(?=[,;.]?(?:\s|$))")  # "pass --val-split 0.2"
# "--val-split 0.5 ignored", "--weights none": a flag and its value -> "'Field' = value"
_KEYWORDS = r"none|imagenet|auto|cpu|cuda|mps|head|last|full|light|standard|resnet18|mobilenet_v2"
_FLAG_VALUE_RE = re.compile(r"(?<![\w'/-])(--[\w-]+) ((?:[\d./~]|(?:" + _KEYWORDS + r")\b|PATH)\S*?)(?=[,;:)]?(?:\s|$))")
_PASS_BARE_FLAG_RE = re.compile(r"\bpass (--[\w-]+)(?=[,;.)]|$)")  # "pass --arch" -> "set 'Architecture'"
_PICKLE_HINT = "predict.py --trust-pickle 1 (in the app: tick 'trust pickle')"
_TRUST_HINT = "tick 'Trust pickle'"
# What the app says instead when its owner did not start it with --allow-pickle-uploads
# (the checkbox is hidden then, and a client's "trust" is ignored).
_TRUST_ADVICE_RE = re.compile(r"(Only if you trust where it came from: )?" + re.escape(_TRUST_HINT))
PICKLE_OFF = ("This app does not load such files; only on their own machine can its owner allow it, for files they "
              "trust (python app.py --allow-pickle-uploads, or predict.py --trust-pickle 1)")
_WEIGHTS_CHOICES = {"none": "None (random init)", "imagenet": "ImageNet (torchvision)", "PATH.pth": "Local file"}


def _value_for_the_app(flag: str, value: str) -> str:
    return _WEIGHTS_CHOICES.get(value, value) if flag == "--weights" else value


def for_the_app(message: str) -> str:
    """A core/CLI message worded for the app: field names (and the app's
    choices) for flags and their values, an uploaded file by its name rather
    than Gradio's temp path."""
    text = _PASS_FLAG_RE.sub(lambda m: f"set {m.group(1)} to {_value_for_the_app(m.group(1), m.group(2))}"
                             if m.group(1) in FIELD_NAMES else m.group(0), str(message))
    text = _FLAG_VALUE_RE.sub(lambda m: f"{m.group(1)} = {_value_for_the_app(m.group(1), m.group(2))}"
                              if m.group(1) in FIELD_NAMES else m.group(0), text)
    text = _PASS_BARE_FLAG_RE.sub(lambda m: f"set {m.group(1)}" if m.group(1) in FIELD_NAMES else m.group(0), text)
    text = text.replace(_PICKLE_HINT, _TRUST_HINT)
    return _UPLOAD_DIR_RE.sub("", _FLAG_RE.sub(lambda m: f"'{FIELD_NAMES[m.group(0)]}'", text))


def user_error(e: Exception | str, title: str = "Error") -> gr.Error:
    """gr.Error renders HTML: escaped (the message can quote file names). The
    plain text rides along for pages that show it as Markdown (shown_error)."""
    text = for_the_app(e)
    err = gr.Error(html_text(text), title=title, print_exception=False)
    err.text = text
    return err


def error_markdown(title: str, message: str, mark: str = "✗") -> str:
    first, *rest = for_the_app(message).split("\n")
    out = f"{mark} **{title}:** {md_text(first)}"
    if rest:
        out += "\n" + md_block([r.rstrip() for r in rest])
    return out


def shown_error(e: gr.Error) -> str:
    """A raised gr.Error as the page shows it, in place of the output it replaces."""
    return error_markdown(e.title, getattr(e, "text", e.message), "⚠")


def _int(value, name: str) -> int:
    """A number box's value as a whole number; `name` is the field's label."""
    f = _float(value, name, "a whole number")
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"'{name}' must be a whole number (got {value})")
    return int(f)


def _float(value, name: str, kind: str = "a number") -> float:
    if value is None or str(value).strip() == "":
        raise UserError(f"'{name}' is empty: enter {kind}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"'{name}' must be {kind} (got {value!r})") from None


# Fixed decimals: a plain float column showed an accuracy of 1.0 as "1" beside "0.9688".
EPOCH_FORMATS = {"train_loss": "{:.4f}", "train_acc": "{:.4f}", "val_loss": "{:.4f}", "val_acc": "{:.4f}",
                 "lr": "{:g}", "seconds": "{:.2f}"}


def epochs_frame(history: list[dict]):
    """The epochs table: numbers stay numbers (the table sorts them as such),
    shown with fixed decimals through a Styler."""
    rows = [[r["epoch"], r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"], r["lr"], r["seconds"],
             "★" if r.get("best") else ""] for r in history]
    return pd.DataFrame(rows, columns=EPOCH_COLUMNS).style.format(EPOCH_FORMATS)


class Handlers:
    def __init__(self, checkpoints_dir, data_dir, uploads_dir, service: TrainingService | None = None,
                 policy: AccessPolicy | None = None):
        self.checkpoints_dir = Path(checkpoints_dir)
        self.data_dir = Path(data_dir)
        self.uploads_dir = Path(uploads_dir)
        self.service = service or TrainingService()
        self.policy = policy or AccessPolicy()  # loopback: any folder; pickles never
        self._compared: dict[str, list[str]] = {}  # page (session) -> runs it overlays

    # ------------------------------------------------------------ dataset

    def check_dataset(self, data_dir, val_split=0, seed=1337):
        """-> (summary markdown, number of classes)."""
        try:
            split = _float(val_split or 0, FIELD_NAMES["--val-split"]) or None
            check_val_split(split)  # the rule Start applies, shown before it
            info = datasets.check(self.dataset_folder(data_dir), split, _int(seed or 0, FIELD_NAMES["--seed"]))
        except UserError as e:
            raise user_error(e, "Dataset problem") from None
        except OSError as e:  # an unreadable entry core did not skip: said, not a bare "Error"
            raise user_error(os_error_text(e), "Dataset problem") from None
        return datasets.summary_markdown(info, for_the_app), len(info.classes)

    def dataset_folder(self, data_dir) -> str:
        """The folder box's value; empty is a mistake to say, not the demo set to use silently.
        When others can reach the app, a folder outside its allowed ones (or linking out of them) is refused."""
        folder = (data_dir or "").strip()
        if not folder:
            raise UserError(f"'Dataset folder' is empty: enter the folder that holds train/ and val/ "
                            f"(the demo set is {self.data_dir})")
        self.policy.check_tree(folder, FIELD_NAMES["--data-dir"])
        return folder

    def check_dataset_shown(self, data_dir, val_split=0, seed=1337):
        """Like check_dataset, but a problem replaces the summary (a pop-up
        fades, and the last good summary would stay, saying all is well)."""
        try:
            return self.check_dataset(data_dir, val_split, seed)
        except gr.Error as e:
            return shown_error(e), gr.skip()

    def upload_zip(self, zip_file, val_split=0, seed=1337):
        """-> (dataset folder, summary markdown, number of classes)."""
        if not zip_file:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            root, reused = datasets.import_zip(zip_file, self.uploads_dir)
        except UserError as e:  # said in the summary: raised, it would badge the folder box and hide its path
            return gr.skip(), f"{error_markdown('Zip refused', str(e), '⚠')}\n\nThe Dataset folder above is unchanged.", \
                gr.skip()
        summary, n = self.check_dataset_shown(str(root), val_split, seed)  # the folder is kept for a fix either way
        done = "The same zip as before: using its extraction" if reused else "Extracted to"
        return str(root), f"{done} {md_code(root)}\n\n" + summary, n

    # ------------------------------------------------------------ settings

    @staticmethod
    def weights_note(arch, source="imagenet"):
        """What the chosen weights are; for ImageNet, whether they are on this
        machine yet: not, on a fresh or offline one, where Start would stop at
        once to say so."""
        from core.models import imagenet_cache_path
        if source == "none":
            return gr.update(info="Random init: no pretrained features (with a frozen backbone expect chance accuracy)")
        if source == "local file":
            return gr.update(info=f"A state_dict (.pth) of a {arch} backbone on this machine; the head is always new")
        path = imagenet_cache_path(arch)
        if path.is_file():
            return gr.update(info=f"ImageNet weights for {arch}: in the torch cache")
        return gr.update(info=f"ImageNet weights for {arch} are not on this machine yet: the first Start downloads "
                              f"them (needs internet; offline, train from random init or a weights file on disk)")

    @staticmethod
    def weights_inputs(source):
        local = source == "local file"
        return gr.update(visible=local), gr.update(visible=local)

    def weights_uploaded(self, path):
        """The uploaded file's path for the weights box. When others can reach
        the app, the file is copied into uploads/ first: typed paths are confined
        to the app's folders, and Gradio's upload folder is not one of them."""
        if not path:
            return gr.skip()
        if not self.policy.exposed:
            return path
        dest = self.uploads_dir / "weights" / Path(path).parent.name / Path(path).name  # (parent: Gradio's hash)
        if not (dest.is_file() and dest.stat().st_size == Path(path).stat().st_size):
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + f".{os.getpid()}.{threading.get_ident()}.part")
            shutil.copyfile(path, part)
            os.replace(part, dest)  # a reader never sees half a file
        return str(dest)

    @staticmethod
    def policy_info(arch, policy, n_classes):
        return modelview.policy_markdown(arch, policy, n_classes or 2)

    def make_config(self, data_dir, arch, weights_source, weights_path, policy, epochs, batch_size, lr,
                    weight_decay, dropout, augment, seed, device, val_split, run_name, amp=False) -> TrainConfig:
        if weights_source == "local file":
            weights = (weights_path or "").strip()
            if not weights:
                raise UserError("weights source 'Local file' needs the path of a state_dict (.pth): "
                                "type it or upload the file, or choose 'None (random init)'")
            self.policy.check(weights, "Weights file")
            if Path(weights).expanduser().is_dir():
                raise UserError(f"weights file {weights} is a folder; give the path of the .pth file in it")
            if not Path(weights).expanduser().is_file():
                raise UserError(f"weights file {weights} does not exist")
            weights = str(Path(weights).expanduser())
        else:
            weights = weights_source or "imagenet"
        policy, F = policy or "head", FIELD_NAMES
        return TrainConfig(
            data_dir=self.dataset_folder(data_dir), arch=arch, weights=weights, policy=policy,
            epochs=_int(epochs, F["--epochs"]), batch_size=_int(batch_size, F["--batch-size"]),
            lr=_float(lr, F["--lr"]), weight_decay=_float(weight_decay, F["--weight-decay"]),
            dropout=_float(dropout or 0, F["--dropout"]), augment=augment or "auto", seed=_int(seed, F["--seed"]),
            device=device or "auto", amp=bool(amp),
            val_split=_float(val_split or 0, F["--val-split"]) or None, output_dir=str(self.checkpoints_dir),
            run_name=(run_name or "").strip() or default_run_name(arch, policy), extra={"ui": "gradio"},
        ).validate()

    # ------------------------------------------------------------ training

    def _overlays(self, names, exclude: str | None = None) -> list[tuple[str, list[dict]]]:
        wanted = [n for n in (names or []) if n != exclude]
        by_name = {r.name: r for r in runs.list_runs(self.checkpoints_dir)}
        return [(by_name[n].short_name(), by_name[n].history) for n in wanted if n in by_name and by_name[n].history]

    def compare_choices(self) -> list[tuple[str, str]]:
        return [(r.label(), r.name) for r in runs.list_runs(self.checkpoints_dir)]

    def refresh_compare(self, selected):
        choices = self.compare_choices()
        names = {v for _, v in choices}
        return gr.update(choices=choices, value=[s for s in (selected or []) if s in names])

    def compare_changed(self, selected, state, request: gr.Request = None):
        state = state or {}
        if request is not None:  # what this page compares, for watch() frames drawn while it follows a run
            self._compared.pop(request.session_hash, None)
            self._compared[request.session_hash] = list(selected or [])
            while len(self._compared) > 1000:  # the oldest pages' choices go first (dicts keep insertion order)
                self._compared.pop(next(iter(self._compared)))
        history = state.get("history", [])
        return plots.accuracy_figure(history, state.get("epochs", 0), self._overlays(selected, state.get("run")))

    def _train_frame(self, status, state, overlays, log_lines):
        h, total = state["history"], state["epochs"]
        return (status, plots.loss_figure(h, total), plots.accuracy_figure(h, total, overlays),
                epochs_frame(h), "\n".join(log_lines), state, gr.skip(), gr.skip())

    def start(self, data_dir, arch, weights_source, weights_path, policy, epochs, batch_size, lr, weight_decay,
              dropout, augment, seed, device, val_split, run_name, amp, compare, progress=gr.Progress()):
        """Generator: one update when the run starts, one per epoch, one at the end;
        per-batch progress goes to gr.Progress."""
        try:
            cfg = self.make_config(data_dir, arch, weights_source, weights_path, policy, epochs, batch_size, lr,
                                   weight_decay, dropout, augment, seed, device, val_split, run_name, amp)
            handle = self.service.start(cfg)
        except (UserError, OSError) as e:  # the status says why too: a pop-up fades, an older status would stay
            message = os_error_text(e) if isinstance(e, OSError) else str(e)
            yield error_markdown("Training not started", message), *[gr.skip()] * 7
            raise user_error(message, "Training not started") from None
        overlays = self._overlays(compare)
        state = {"history": [], "epochs": cfg.epochs, "run": None}
        log_lines = handle.log  # rebound below to the handle's latest lines
        yield self._train_frame("▶ Setting up: scanning the dataset, loading weights, building the model…",
                                state, overlays, log_lines)
        ended, failed = None, None
        # pending: an epoch frame held back by MIN_FRAME_S. -inf, not 0: monotonic()
        # counts from boot, so a machine up for less than MIN_FRAME_S held the first back.
        last_frame, pending = -math.inf, None
        for ev in handle.follow():
            log_lines = handle.log
            if pending and time.monotonic() - last_frame >= MIN_FRAME_S and not isinstance(ev, RunEnded):
                yield self._train_frame(pending, state, overlays, log_lines)
                last_frame, pending = time.monotonic(), None
            if isinstance(ev, BatchProgress):
                if ev.phase == "cache":
                    progress((ev.step, ev.total), desc="running the frozen layers once per image", unit="img")
                elif ev.phase == "decode":
                    progress((ev.step, ev.total), desc="decoding and checking images", unit="img")
                else:
                    progress((ev.step, ev.total), desc=f"epoch {ev.epoch}/{cfg.epochs} · {ev.phase}", unit="batch")
            elif isinstance(ev, RunStarted):
                state = {**state, "run": Path(ev.run_dir).name}
                overlays = self._overlays(compare, state["run"])
                msg = (f"▶ Run **{md_text(state['run'])}** started: {len(ev.dataset.train.samples)} train / "
                       f"{len(ev.dataset.val.samples)} val images, {ev.trainable_params:,} of {ev.total_params:,} "
                       f"parameters train, on {ev.device}.")
                yield self._train_frame(msg, state, overlays, log_lines)
            elif isinstance(ev, Notice):
                yield self._train_frame(f"⚠ {md_text(ev.text.splitlines()[0])} (see the run log)",
                                        state, overlays, log_lines)
            elif isinstance(ev, EpochEnded):
                state = {**state, "history": handle.history}  # the rows the run's handle keeps
                star = " ★ new best" if ev.best_acc else ""
                msg = (f"▶ Epoch {ev.epoch}/{ev.epochs}: val_acc {ev.val_acc:.3f}, val_loss {ev.val_loss:.4f}{star} "
                       f"({ev.seconds:.1f} s)")
                if time.monotonic() - last_frame < MIN_FRAME_S:
                    pending = msg
                    continue
                yield self._train_frame(msg, state, overlays, log_lines)
                last_frame, pending = time.monotonic(), None
            elif isinstance(ev, RunEnded):
                ended = ev
            elif isinstance(ev, Failed):
                failed = ev
        log_lines = handle.log
        if failed is None and ended is None:  # cannot happen with core's engine; never leave the UI hanging
            failed = Failed("the training run ended without a result; details are in the server log")
            log_lines = log_lines + [f"ERROR: {failed.message}"]
        if failed is not None:
            status = error_markdown("Could not train", failed.message)
            if failed.kind == "WeightsError" and "do not fit" in failed.message:
                status += ("\n\n→ In this app: choose the **Architecture** the weights file was made for, or "
                           "another file.")
            yield self._train_frame(status, state, overlays, log_lines)
            raise user_error(failed.message, "Training failed")
        frame = list(self._train_frame(end_status(ended), state, overlays, log_lines))
        frame[6] = self.refresh_compare(compare)
        frame[7] = self.refresh_checkpoints(ended.best_acc_path)
        yield tuple(frame)

    @staticmethod
    def start_button(running: bool):
        """Start is greyed out while this page's run trains (a second click would
        be ignored) and comes back when it ends, however it ends. Stop stays
        clickable: any page may stop the one run."""
        return gr.update(interactive=not running, value="Training…" if running else START_LABEL)

    def stop(self):
        """Waits (up to 10 s) for the run to end, then shows the same final status
        as the Start stream, so the order in which the two arrive does not matter."""
        h = self.service.stop(wait=10.0)
        if h is None:
            return "No training run is in progress."
        if h.ended is not None:
            return end_status(h.ended)
        if h.failed is not None:
            return error_markdown("Could not train", h.failed.message)
        return "■ Stopping: the run ends after the current batch; completed epochs stay saved."

    def stop_shown(self):
        """Stop for the page: with nothing running, a pop-up says so and the
        status keeps the finished run's result. -> (status, checkpoint, its
        description): the status names the best checkpoint as preselected, so it
        is, on this page too (which may not be the page that started the run)."""
        h = self.service.current
        if h is None or h.done.is_set():
            gr.Info("No training run is in progress.")
            return gr.skip(), gr.skip(), gr.skip()
        status = self.stop()
        best = h.ended.best_acc_path if h.ended is not None else None
        return (status, *self._preselect(best)) if best else (status, gr.skip(), gr.skip())

    def watch(self, poll_s: float = 1.0, request: gr.Request = None):
        """Page load: a run already in progress (started before a reload, or in
        another tab) is followed here, its status, charts, epoch table and log
        redrawn every `poll_s` while it changes, then its final status.
        -> (status, loss, accuracy, table, log, run state, checkpoint, its description, Start)."""
        h = self.service.current
        if h is None or h.done.is_set():
            yield READY, *[gr.skip()] * 7, self.start_button(False)
            return
        shown = None
        while not h.done.wait(0 if shown is None else poll_s):
            status = f"▶ A training run is in progress: {md_text(h.describe())}. Stop works from here too."
            if shown != (len(h.history), len(h.log)):
                shown = (len(h.history), len(h.log))
                yield *self._watch_frame(status, h, request), gr.skip(), gr.skip(), self.start_button(True)
            else:  # the phase's progress and the clock move on: the status line only, no chart redraw
                yield status, *[gr.skip()] * 7, self.start_button(True)
        if h.ended is not None:
            best = h.ended.best_acc_path
            yield (*self._watch_frame(end_status(h.ended), h, request),
                   *(self._preselect(best) if best else (self.refresh_checkpoints(None), gr.skip())),
                   self.start_button(False))
        else:
            yield (error_markdown("Could not train", h.failed.message if h.failed else "no result"),
                   *[gr.skip()] * 3, "\n".join(h.log), *[gr.skip()] * 3, self.start_button(False))

    def followed_settings(self):
        """Page load during a run: the form shows that run's settings, in the order
        of ui.py's train inputs (else a Start after it ends would train whatever
        the fresh form holds, not what the page showed training)."""
        h = self.service.current
        if h is None or h.done.is_set():
            return [gr.skip()] * 16
        c = h.cfg
        local = c.weights not in ("imagenet", "none")
        return [c.data_dir, c.arch, "local file" if local else c.weights, c.weights if local else "", c.policy,
                c.epochs, c.batch_size, c.lr, c.weight_decay, c.dropout, c.augment, c.seed, c.device,
                c.val_split or 0, "" if c.run_name == default_run_name(c.arch, c.policy) else c.run_name, c.amp]

    def _watch_frame(self, status, h, request=None):
        """(status, loss, accuracy, table, log, run state): the run's own state,
        so 'Compare policies' on this page draws it beside the earlier runs."""
        state = {"history": h.history, "epochs": h.cfg.epochs, "run": Path(h.run_dir).name if h.run_dir else None}
        compared = self._compared.get(request.session_hash, []) if request is not None else []
        return self._train_frame(status, state, self._overlays(compared, state["run"]), h.log)[:6]

    # ------------------------------------------------------------ predict

    def refresh_checkpoints(self, current=None):
        choices = runs.checkpoint_choices(self.checkpoints_dir)
        values = [v for _, v in choices]
        value = current if current in values else (values[0] if values else None)
        return gr.update(choices=choices, value=value)

    def _preselect(self, best: str):
        """(checkpoint list with `best` chosen, its description). The description is
        redone too: a best_acc.pt may keep its path while its weights changed."""
        return self.refresh_checkpoints(best), self.checkpoint_info(best, None, False)

    def _load(self, selected, uploaded, trust):
        """The chosen checkpoint's predictor. Unpickling is the server's decision:
        a client's `trust` counts only if the app was started with
        --allow-pickle-uploads. A typed path (not an upload) obeys the policy."""
        allowed = self.policy.allow_pickle
        if not uploaded and (selected or "").strip():
            self.policy.check(selected, "Checkpoint")
        try:
            return inference.load(selected, uploaded, bool(trust) and allowed)
        except CheckpointError as e:
            if allowed or _TRUST_HINT not in for_the_app(e):
                raise
            raise CheckpointError(_TRUST_ADVICE_RE.sub(PICKLE_OFF, for_the_app(e))) from None

    def _predictor(self, selected, uploaded, trust):
        try:
            return self._load(selected, uploaded, trust)
        except UserError as e:
            raise user_error(e, "Checkpoint problem") from None

    def checkpoint_info(self, selected, uploaded, trust):
        try:
            path = inference.choose_checkpoint(selected, uploaded)
            return inference.describe(self._load(selected, uploaded, trust), path)
        except UserError as e:
            return "⚠ " + md_text(for_the_app(e))

    def predict(self, image, k, selected, uploaded, trust):
        """-> ({label: p} top-k, timing markdown)."""
        if image is None:
            return None, ""
        if isinstance(image, NotAnImage):
            raise user_error(str(image), "Not an image")
        pred = self._predictor(selected, uploaded, trust)
        try:
            r = inference.predict_one(pred, image, k)
        except CheckpointError as e:  # the model's output is not finite: no result, and not the image's fault
            raise user_error(e, "Checkpoint problem") from None
        except UserError as e:
            raise user_error(e, "Not an image") from None
        return r.confidences, (f"Prediction took **{r.ms:.0f} ms** on {pred.device.type} · top-{len(r.confidences)} of "
                               f"{len(pred.class_names)} classes")

    def predict_shown(self, image, k, selected, uploaded, trust):
        """predict() for the page: a problem clears the old label and is said
        beside it (raised, it would leave the last answer on screen under an
        error badge)."""
        try:
            return self.predict(image, k, selected, uploaded, trust)
        except gr.Error as e:
            return None, shown_error(e)

    def predict_batch_shown(self, files, folder, k, selected, uploaded, trust):
        """predict_batch() for the page: a problem replaces the old results."""
        try:
            return self.predict_batch(files, folder, k, selected, uploaded, trust)
        except gr.Error as e:
            return None, None, None, shown_error(e)

    def predict_batch(self, files, folder, k, selected, uploaded, trust):
        """-> (table, gallery, CSV path, summary markdown)."""
        try:  # the folder first: a refused one is said whatever the checkpoint
            if (folder or "").strip():
                self.policy.check_tree(folder, "Folder")
            paths = inference.batch_paths(files, folder)
        except UserError as e:
            raise user_error(e, "No images") from None
        except OSError as e:
            raise user_error(os_error_text(e), "No images") from None
        pred = self._predictor(selected, uploaded, trust)
        uploads = {str(f): Path(f).name for f in (files or [])}
        names = [inference.display_name(p, (folder or "").strip(), uploads) for p in paths]
        try:
            preds = inference.predict_many(pred, paths, k)
        except UserError as e:
            raise user_error(e, "Checkpoint problem") from None
        # images in folders named after classes (val/<class>/...) are checked against them; uploads are not
        labels = folder_labels([None if p in uploads else p for p in paths], pred.class_names)
        bad = sum(1 for p in preds if p.error)
        counts: dict[str, int] = {}
        for p in preds:
            if not p.error:
                counts[p.label] = counts.get(p.label, 0) + 1
        summary = f"**{len(preds) - bad}** image(s) classified: " + \
            (", ".join(f"{md_text(c)} × {n}" for c, n in sorted(counts.items())) or "none")
        if bad:
            summary += f" · ⚠ {bad} file(s) could not be read (see the error column)"
        check = folder_check([p.label for p in preds], labels)  # label is None for an unreadable file
        summary += inference.folder_check_summary(check, preds, names)
        if len(preds) - bad > inference.GALLERY_LIMIT:
            summary += f" · gallery shows the first {inference.GALLERY_LIMIT}" + (" (wrong ones first)" if check[2] else "")
        used = Path(inference.choose_checkpoint(selected, uploaded))
        summary += f" · by {md_code(used.name if uploaded else used.parent.name + '/' + used.name)}"
        table = pd.DataFrame(inference.table_rows(preds, names, labels), columns=PRED_COLUMNS).style.format(
            {"p": "{:.4f}"}, na_rep="")  # fixed decimals: 0.777 beside 0.8609 read as less precise
        return (table, inference.gallery_items(preds, names, labels, check[2]), inference.write_csv(preds, names, labels),
                summary)

    @staticmethod
    def batch_stale(summary):
        """The checkpoint changed: results on screen are the old model's. Cleared,
        and the summary says how to redo them."""
        if not summary or "image(s) classified" not in summary:  # no results (or an error) on screen
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return None, None, None, BATCH_STALE

    def examples(self, data_dir):
        """Gallery of validation images (thumbnails) and their paths."""
        try:
            items = datasets.example_images(self.dataset_folder(data_dir))
        except (UserError, OSError):  # an emptied box, or a folder the policy refuses: Check dataset says why
            return [], []
        thumbs = [(inference.thumbnail(p, 160), cap) for p, cap in items]
        keep = [(t, c, p) for (t, c), (p, _) in zip(thumbs, items) if t is not None]
        return [(t, c) for t, c, _ in keep], [p for _, _, p in keep]

    @staticmethod
    def example_selected(paths, evt: gr.SelectData):
        try:
            return load_rgb(paths[evt.index])
        except (IndexError, TypeError, UserError):
            return gr.skip()

    # ------------------------------------------------------------ model

    @staticmethod
    def model_tab(arch, policy, n_classes, dropout=0.0):
        try:
            # range checked here, not by the box's minimum/maximum: Gradio's check logs a traceback per entry
            n = _int(2 if n_classes is None else n_classes, "Classes")
            if not 2 <= n <= MAX_CLASSES:
                raise UserError(f"'Classes' must be from 2 to {MAX_CLASSES:,} (got {n:,})")
        except UserError as e:
            raise user_error(e, "Model") from None
        v = modelview.model_view(arch, policy, n, float(dropout or 0))
        df = pd.DataFrame([[r["name"], r["type"], r["output_shape"], r["params"], trains_cell(r), r["note"]]
                           for r in v.rows], columns=LAYER_COLUMNS)
        kinds = [r["type"] if r["type"] in ("BatchNorm2d", "MaxPool2d") else "block" if r["batchnorms"] else ""
                 for r in v.rows]
        styled = df.style.apply(_layer_style, axis=1, kinds=kinds).format({"params": "{:,}"})
        label = modelview.POLICY_LABELS[policy]
        totals = (f"**Total parameters:** {v.total:,} · **trainable under “{label}”:** {v.trainable:,} "
                  f"({100 * v.trainable / v.total:.2f}%) · output shapes for a 1×3×224×224 input")
        base = (f"#### Base model (ImageNet head)\n{arch}, **1000 outputs**\n\nhead: `{v.base_head}`\n\n"
                f"{v.base_total:,} parameters")
        transfer = (f"#### Transfer model (new head)\n{arch}, **{n} outputs**\n\nhead: `{v.transfer_head}`\n\n"
                    f"{v.total:,} parameters, {v.trainable:,} trainable ({label})")
        return styled, totals, base, transfer, v.base_repr, v.transfer_repr


def trains_cell(row: dict) -> str:
    if not row["params"]:
        return "– (no weights)"
    if row["trainable_params"] == row["params"]:
        return "✔ trains"
    if row["trainable_params"]:
        return f"◐ partly ({row['trainable_params']:,})"
    return "frozen"


def _layer_style(row, kinds):
    """Yellow name, type and note for a BatchNorm / MaxPool row, a pale yellow
    note for a block holding BatchNorms (MobileNetV2 keeps them all inside
    blocks); green 'trains' cell. Separate cells, so a BatchNorm that trains
    shows both."""
    kind = kinds[row.name]
    yellow = "background-color: #fef3c7"
    marked = {"layer": yellow, "type": yellow, "note": yellow} if kind in ("BatchNorm2d", "MaxPool2d") else \
        {"note": "background-color: #fffbeb"} if kind == "block" else {}
    marked["trains"] = {"✔": "background-color: #bbf7d0", "◐": "background-color: #dcfce7"}.get(row["trains"][:1], "")
    return [marked.get(col, "") for col in row.index]


def default_run_name(arch: str, policy: str) -> str:
    """The app's run name when the box is left empty."""
    return f"{arch}-{policy}"


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
