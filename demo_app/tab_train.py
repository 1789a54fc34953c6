"""The Train tab: the dataset and the settings of a run (this module), and the
run itself (tab_train_run.RunPanel). The form's values become a
core.config.TrainConfig here, as train.py's flags do in the CLI."""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import gradio as gr

from core.fileio import check_model_file
from core.config import ARCHS, AUGMENTS, DEVICES, TrainConfig, check_val_split
from core.data import scan_dataset
from core.errors import UserError
from core.models import imagenet_cache_path
from core.zipimport import reuse_or_extract

from .context import PRIVATE, AppContext, keep_newest
from .datasets import summary_markdown
from .messages import error_markdown, number, os_error_text, say, shown_error, user_error, whole_number
from .live_preview import LivePreview
from .modelview import policy_choices, policy_markdown
from .tab_model import ModelTab
from .tab_dataset import DatasetBuilder
from .tab_predict import PredictTab
from .tab_train_run import RunPanel
from .text import md_code

# Copies of uploaded weights files kept under <uploads>/weights/ (up to 200 MB each; see weights_uploaded).
KEEP_UPLOADED_WEIGHTS = 8
WEIGHT_SOURCES = [("ImageNet (torchvision)", "imagenet"), ("None (random init)", "none"), ("Local file", "local file")]


@dataclass
class TrainForm:
    """The form's values as the page sends them (Start's keyword inputs, in the
    API's order); the defaults are the form's initial values."""
    data_dir: str = ""
    arch: str = "resnet18"
    weights_source: str = "imagenet"
    weights_path: str = ""
    policy: str = "head"
    epochs: float | None = 5
    batch_size: float | None = 16
    lr: float | None = 1e-3
    weight_decay: float | None = 1e-4
    dropout: float | None = 0.0
    augment: str = "auto"
    seed: float | None = 1337
    device: str = "auto"
    val_split: float | None = 0
    run_name: str = ""
    amp: bool = False

    @classmethod
    def of(cls, cfg: TrainConfig) -> "TrainForm":
        """The form that makes `cfg` (for a page that follows a run)."""
        local = cfg.weights not in ("imagenet", "none")
        return cls(cfg.data_dir, cfg.arch, "local file" if local else cfg.weights, cfg.weights if local else "",
                   cfg.policy, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.dropout, cfg.augment,
                   cfg.seed, cfg.device, cfg.val_split or 0,
                   "" if cfg.run_name == default_run_name(cfg.arch, cfg.policy) else cfg.run_name, cfg.amp)


class TrainTab:
    def __init__(self, ctx: AppContext, predict: PredictTab, model: ModelTab):
        self.ctx, self.predict, self.model = ctx, predict, model
        self.run = RunPanel(ctx, predict, self.make_config)
        self.builder, self.live = DatasetBuilder(ctx), LivePreview(ctx, predict)

    # ------------------------------------------------------------ layout

    def layout(self) -> None:
        first = TrainForm(data_dir=str(self.ctx.data_dir))
        note = self.ctx.folders_note()
        with gr.Tab("Train", id="train", elem_id="tab-train") as self.tab, gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340, elem_id="train-settings"):
                self.n_classes = gr.State(2)  # (inside a tab: a State beside the tabs would count as one)
                gr.Markdown("### 1 · Dataset", elem_classes="section-title")
                self.data_dir = gr.Textbox(first.data_dir, label="Dataset folder",
                                           info="holds train/<class>/ and val/<class>/ image folders"
                                                + (f"; {note}" if note else ""), elem_id="data-dir")
                with gr.Row():
                    self.check_btn = gr.Button("Check dataset", size="md", elem_id="check-btn")
                    self.zip_file = gr.UploadButton("Upload a dataset .zip", file_types=[".zip"], type="filepath",
                                                    size="md", elem_id="zip-upload")
                self.ds_summary = gr.Markdown("", elem_id="dataset-summary")
                self.builder.layout()

                gr.Markdown("### 2 · Model & freeze policy", elem_classes="section-title")
                with gr.Group():
                    with gr.Row():
                        self.arch = gr.Dropdown(list(ARCHS), value=first.arch, label="Architecture", elem_id="arch",
                                                min_width=160)
                        self.weights_source = gr.Radio(WEIGHT_SOURCES, value=first.weights_source,
                                                       label="Pretrained weights", elem_id="weights-source", scale=2)
                    self.weights_path = gr.Textbox(first.weights_path, label="Weights file (state_dict .pth on this "
                                                   "machine)", placeholder="/path/to/backbone_weights.pth",
                                                   visible=False, elem_id="weights-path")
                    self.weights_file = gr.UploadButton("…or upload the weights file", file_types=[".pth", ".pt"],
                                                        type="filepath", visible=False, size="sm",
                                                        elem_id="weights-upload")
                    self.policy = gr.Radio(policy_choices(first.arch), value=first.policy, label="Freeze policy",
                                           elem_id="policy")
                    self.policy_md = gr.Markdown(policy_markdown(first.arch, first.policy, 2), elem_id="policy-info",
                                                 padding=True)

                gr.Markdown("### 3 · Hyper-parameters", elem_classes="section-title")
                with gr.Group():
                    with gr.Row():
                        # precision=None: a fraction is refused by make_config, not rounded
                        self.epochs = gr.Number(first.epochs, label="Epochs", precision=None, elem_id="epochs",
                                                min_width=90)
                        self.batch_size = gr.Number(first.batch_size, label="Batch size", precision=None,
                                                    elem_id="batch-size", min_width=90)
                        self.seed = gr.Number(first.seed, label="Seed", precision=None, elem_id="seed", min_width=90)
                    with gr.Row():
                        self.lr = gr.Number(first.lr, label="Learning rate", elem_id="lr", min_width=90)
                        self.weight_decay = gr.Number(first.weight_decay, label="Weight decay",
                                                      elem_id="weight-decay", min_width=90)
                        self.dropout = gr.Slider(0, 0.9, value=first.dropout, step=0.05, label="Head dropout",
                                                 elem_id="dropout", min_width=120)
                    self.augment = gr.Dropdown(list(AUGMENTS), value=first.augment, label="Augmentation",
                                               elem_id="augment",
                                               info="auto: none for head only (backbone runs once per image), flips "
                                                    "for the last stage + head (two cached views), random crops + "
                                                    "flips for full")
                with gr.Accordion("Advanced", open=False):
                    self.device = gr.Dropdown(list(DEVICES), value=first.device, label="Device", elem_id="device")
                    self.run_name = gr.Textbox(first.run_name, label="Run name", placeholder="default: <arch>-<policy>",
                                               elem_id="run-name")
                    self.val_split = gr.Number(first.val_split, label="Validation fraction (only used when val/ is "
                                               "missing)", elem_id="val-split")
                    self.amp = gr.Checkbox(first.amp, label="Mixed precision (--amp 1)", elem_id="amp",
                                           info="bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX), float16 on "
                                                "CUDA: faster layer4/full training, less memory; elsewhere float32")
            self.run.layout()
        with self.tab:
            self.live.layout()
        # the components of TrainForm's fields, by name
        self.form = {f.name: getattr(self, f.name) for f in fields(TrainForm)}

    def wire(self, demo: gr.Blocks) -> None:
        predict, model = self.predict, self.model
        checked = [self.ds_summary, self.n_classes]
        examples = {"fn": predict.show_examples, "inputs": [self.data_dir],
                    "outputs": [predict.examples, predict.example_paths], **PRIVATE}
        gr.on([self.check_btn.click, self.data_dir.submit], self.check_dataset_shown,
              [self.data_dir, self.val_split, self.seed], checked, api_name="check_dataset").then(**examples)
        self.zip_file.upload(self.upload_zip, [self.zip_file, self.val_split, self.seed], [self.data_dir, *checked],
                             api_name="upload_dataset_zip").then(**examples)
        self.weights_source.change(self.weights_inputs, self.weights_source, [self.weights_path, self.weights_file],
                                   **PRIVATE)
        self.weights_file.upload(self.weights_uploaded, self.weights_file, self.weights_path, **PRIVATE)
        gr.on([self.arch.change, self.policy.change, self.n_classes.change], policy_markdown,
              [self.arch, self.policy, self.n_classes], self.policy_md, **PRIVATE)
        self.arch.change(lambda a: gr.update(choices=policy_choices(a)), self.arch, self.policy, **PRIVATE)
        gr.on([self.arch.change, self.weights_source.change], weights_note, [self.arch, self.weights_source],
              self.weights_source, show_progress="hidden", **PRIVATE)
        # the Model tab shows the model these settings build
        self.arch.change(lambda a: a, self.arch, model.arch, **PRIVATE)
        self.policy.change(lambda p: p, self.policy, model.policy, **PRIVATE)
        self.n_classes.change(lambda n: n, self.n_classes, model.classes, **PRIVATE)
        self.run.wire(demo, self.form)
        self.builder.wire(demo, self.data_dir, self.val_split, {"fn": self.check_dataset_shown, "inputs": [
            self.data_dir, self.val_split, self.seed], "outputs": checked, **PRIVATE})
        self.live.wire(demo, [self.run.status.change])
        # A page opened during a run shows that run's settings, then checks its dataset.
        demo.load(self.followed_settings, None, list(self.form.values()), **PRIVATE).then(
            self.check_dataset_shown, [self.data_dir, self.val_split, self.seed], checked, **PRIVATE).then(**examples)
        demo.load(weights_note, [self.arch, self.weights_source], self.weights_source, **PRIVATE)

    # ------------------------------------------------------------ dataset

    def check_dataset(self, data_dir, val_split=0, seed=1337) -> dict:
        """-> {summary markdown, number of classes}."""
        try:
            split = number(val_split or 0, "val_split") or None
            check_val_split(split)  # the rule Start applies, shown before it
            info = scan_dataset(self.ctx.dataset_folder(data_dir), split, whole_number(seed or 0, "seed"))
        except UserError as e:
            raise user_error(e, "Dataset problem") from None
        except OSError as e:  # an unreadable entry core did not skip: said, not a bare "Error"
            raise user_error(os_error_text(e), "Dataset problem") from None
        return {self.ds_summary: summary_markdown(info, say), self.n_classes: len(info.classes)}

    def check_dataset_shown(self, data_dir, val_split=0, seed=1337) -> dict:
        """Like check_dataset, but a problem replaces the summary (a pop-up
        fades, and the last good summary would stay, saying all is well)."""
        try:
            return self.check_dataset(data_dir, val_split, seed)
        except gr.Error as e:
            return {self.ds_summary: shown_error(e)}

    def upload_zip(self, zip_file, val_split=0, seed=1337) -> dict:
        """-> {dataset folder, summary markdown, number of classes}: the zip is
        extracted into its own new folder under uploads/, or the extraction of
        the same zip uploaded before is used again."""
        if not zip_file:
            return gr.skip()
        try:
            root, reused = reuse_or_extract(zip_file, self.ctx.uploads_dir, Path(zip_file).stem)
        except UserError as e:  # said in the summary: raised, it would badge the folder box and hide its path
            return {self.ds_summary: f"{error_markdown('Zip refused', e, '⚠')}\n\n"
                                     f"The Dataset folder above is unchanged."}
        checked = self.check_dataset_shown(str(root), val_split, seed)  # the folder is kept for a fix either way
        done = "The same zip as before: using its extraction" if reused else "Extracted to"
        return {**checked, self.data_dir: str(root), self.ds_summary: f"{done} {md_code(root)}\n\n"
                                                                      + checked[self.ds_summary]}

    # ------------------------------------------------------------ settings

    def weights_inputs(self, source) -> dict:
        shown = gr.update(visible=source == "local file")
        return {self.weights_path: shown, self.weights_file: shown}

    def weights_uploaded(self, path):
        """The uploaded file's path for the weights box. When others can reach
        the app, the file is copied into uploads/ first: typed paths are confined
        to the app's folders, and Gradio's upload folder is not one of them."""
        if not path:
            return gr.skip()
        if not self.ctx.policy.exposed:
            return path
        dest = self.ctx.uploads_dir / "weights" / Path(path).parent.name / Path(path).name  # (parent: Gradio's hash)
        if not (dest.is_file() and dest.stat().st_size == Path(path).stat().st_size):
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + f".{os.getpid()}.{threading.get_ident()}.part")
            shutil.copyfile(path, part)
            os.replace(part, dest)  # a reader never sees half a file
        else:
            os.utime(dest.parent)  # used again: newest
        keep_newest(dest.parent.parent, KEEP_UPLOADED_WEIGHTS)  # a run reads its weights at its start
        return str(dest)

    def make_config(self, values: dict) -> TrainConfig:
        """The form's values (TrainForm's fields, by name) as a checked TrainConfig."""
        form = TrainForm(**values)
        if form.weights_source == "local file":
            weights = (form.weights_path or "").strip()
            if not weights:
                raise UserError("weights source 'Local file' needs the path of a state_dict (.pth): "
                                "type it or upload the file, or choose 'None (random init)'")
            self.ctx.policy.check(weights, "Weights file")
            weights = str(check_model_file(weights, "weights file"))  # a folder, /dev/zero, an empty file: said early
        else:
            weights = form.weights_source or "imagenet"
        policy = form.policy or "head"
        return TrainConfig(
            data_dir=self.ctx.dataset_folder(form.data_dir), arch=form.arch, weights=weights, policy=policy,
            epochs=whole_number(form.epochs, "epochs"), batch_size=whole_number(form.batch_size, "batch_size"),
            lr=number(form.lr, "lr"), weight_decay=number(form.weight_decay, "weight_decay"),
            dropout=number(form.dropout or 0, "dropout"), augment=form.augment or "auto",
            seed=whole_number(form.seed, "seed"), device=form.device or "auto", amp=bool(form.amp),
            val_split=number(form.val_split or 0, "val_split") or None,
            output_dir=str(self.ctx.checkpoints_dir), run_name=(form.run_name or "").strip()
            or default_run_name(form.arch, policy), extra={"ui": "gradio"},
        ).validate()

    def followed_settings(self) -> dict:
        """Page load during a run: the form shows that run's settings (else a
        Start after it ends would train whatever the fresh form holds, not what
        the page showed training)."""
        h = self.ctx.service.current
        if h is None or h.done.is_set():
            return gr.skip()
        return {self.form[name]: value for name, value in asdict(TrainForm.of(h.cfg)).items()}


def weights_note(arch, source="imagenet"):
    """What the chosen weights are; for ImageNet, whether they are on this
    machine yet: not, on a fresh or offline one, where Start would stop at
    once to say so."""
    if source == "none":
        return gr.update(info="Random init: no pretrained features (with a frozen backbone expect chance accuracy)")
    if source == "local file":
        return gr.update(info=f"A state_dict (.pth) of a {arch} backbone on this machine; the head is always new")
    if imagenet_cache_path(arch).is_file():
        return gr.update(info=f"ImageNet weights for {arch}: in the torch cache")
    return gr.update(info=f"ImageNet weights for {arch} are not on this machine yet: the first Start downloads "
                          f"them (needs internet; offline, train from random init or a weights file on disk)")


def default_run_name(arch: str, policy: str) -> str:
    """The app's run name when the box is left empty."""
    return f"{arch}-{policy}"
