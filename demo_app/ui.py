"""Layout and wiring of the Gradio app. All work happens in demo_app.handlers
(which calls core/); this file only places components and connects events."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.access import AccessPolicy
from core.config import ARCHS, AUGMENTS, DEVICES, MAX_CLASSES
from .components import SafeImage
from .handlers import EPOCH_COLUMNS, LAYER_COLUMNS, PRED_COLUMNS, START_LABEL, WEIGHT_SOURCES, Handlers
from .plots import accuracy_figure, loss_figure
from .modelview import policy_choices
from .session import TrainingService

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_SIZE = "200mb"

CSS = """
#header h1 { margin-bottom: 0.1em; }
#header p { color: var(--body-text-color-subdued); margin-top: 0; }
#train-status, #predict-time { min-height: 2.6em; }
#train-status p { font-size: 1.02em; }
#policy-info { font-size: 0.92em; }
.section-title h3 { margin: 0.2em 0 0 0; }
#pickle-warning { font-size: 0.85em; color: #b45309; }
#start-btn, #stop-btn { min-height: 46px; font-size: 1.05em; }
/* the status line itself explains a failed run; hide the tracker's "Error" badge over it and over the progress strip */
#train-status [data-testid="status-tracker"]:has(.error),
#train-progress [data-testid="status-tracker"]:has(.error) { display: none !important; }
"""
THEME = gr.themes.Default(primary_hue="blue", secondary_hue="orange")

HEADER = """# Transfer learning with ResNet-18
Train an image classifier on your own folders in minutes: a pretrained backbone, a new head, and a freeze policy you choose. Everything runs on this machine."""



def launch_options(checkpoints_dir, data_dir, uploads_dir=None) -> dict:
    """Keyword arguments for `demo.launch`: only the app's own folders are served."""
    uploads_dir = Path(uploads_dir) if uploads_dir else ROOT / "uploads"
    folders = [Path(checkpoints_dir), Path(data_dir), uploads_dir]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    return {"allowed_paths": [str(f.resolve()) for f in folders], "max_file_size": MAX_FILE_SIZE,
            "css": CSS, "theme": THEME, "show_error": False}


def build_app(checkpoints_dir, data_dir, uploads_dir=None, service: TrainingService | None = None,
              policy: AccessPolicy | None = None) -> gr.Blocks:
    """`policy`: which folders a user may name and whether pickles load (app.py
    makes it from its flags); default: this machine only, no pickles."""
    uploads_dir = Path(uploads_dir) if uploads_dir else ROOT / "uploads"
    h = Handlers(checkpoints_dir, data_dir, uploads_dir, service, policy)
    pickles = h.policy.allow_pickle
    # when others can reach the app, the folder boxes say which folders it may read
    where = f"; this app reads folders under {h.policy.describe_roots()} only" if h.policy.exposed else ""
    private = {"api_visibility": "private"}

    with gr.Blocks(title="Transfer learning with ResNet-18", analytics_enabled=False) as demo:
        n_classes = gr.State(2)
        run_state = gr.State({"history": [], "epochs": 0, "run": None})
        example_paths = gr.State([])
        gr.Markdown(HEADER, elem_id="header")

        with gr.Tabs(elem_id="tabs"):
            # ======================================================== Train
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=340, elem_id="train-settings"):
                        gr.Markdown("### 1 · Dataset", elem_classes="section-title")
                        data_dir = gr.Textbox(str(data_dir), label="Dataset folder",
                                              info=f"holds train/<class>/ and val/<class>/ image folders{where}",
                                              elem_id="data-dir")
                        with gr.Row():
                            check_btn = gr.Button("Check dataset", size="md", elem_id="check-btn")
                            zip_file = gr.UploadButton("Upload a dataset .zip", file_types=[".zip"], type="filepath",
                                                       size="md", elem_id="zip-upload")
                        ds_summary = gr.Markdown("", elem_id="dataset-summary")

                        gr.Markdown("### 2 · Model & freeze policy", elem_classes="section-title")
                        with gr.Group():
                            with gr.Row():
                                arch = gr.Dropdown(list(ARCHS), value="resnet18", label="Architecture",
                                                   elem_id="arch", min_width=160)
                                weights_source = gr.Radio(WEIGHT_SOURCES, value="imagenet", label="Pretrained weights",
                                                          elem_id="weights-source", scale=2)
                            weights_path = gr.Textbox("", label="Weights file (state_dict .pth on this machine)",
                                                      placeholder="/path/to/backbone_weights.pth", visible=False,
                                                      elem_id="weights-path")
                            weights_file = gr.UploadButton("…or upload the weights file", file_types=[".pth", ".pt"],
                                                           type="filepath", visible=False, size="sm",
                                                           elem_id="weights-upload")
                            policy = gr.Radio(policy_choices("resnet18"), value="head", label="Freeze policy", elem_id="policy")
                            policy_md = gr.Markdown(h.policy_info("resnet18", "head", 2), elem_id="policy-info",
                                                    padding=True)

                        gr.Markdown("### 3 · Hyper-parameters", elem_classes="section-title")
                        with gr.Group():
                            with gr.Row():
                                epochs = gr.Number(5, label="Epochs", precision=None,  # a fraction is refused by the handler, not rounded
                                                   elem_id="epochs", min_width=90)
                                batch_size = gr.Number(16, label="Batch size", precision=None,
                                                       elem_id="batch-size", min_width=90)
                                seed = gr.Number(1337, label="Seed", precision=None, elem_id="seed", min_width=90)
                            with gr.Row():
                                lr = gr.Number(1e-3, label="Learning rate", elem_id="lr", min_width=90)
                                weight_decay = gr.Number(1e-4, label="Weight decay", elem_id="weight-decay",
                                                         min_width=90)
                                dropout = gr.Slider(0, 0.9, value=0.0, step=0.05, label="Head dropout",
                                                    elem_id="dropout", min_width=120)
                            augment = gr.Dropdown(list(AUGMENTS), value="auto",
                                                  label="Augmentation", elem_id="augment",
                                                  info="auto: none for head only (backbone runs once per image), flips for "
                                                       "the last stage + head (two cached views), random crops + flips "
                                                       "for full")
                        with gr.Accordion("Advanced", open=False):
                            device = gr.Dropdown(list(DEVICES), value="auto", label="Device",
                                                 elem_id="device")
                            run_name = gr.Textbox("", label="Run name", placeholder="default: <arch>-<policy>",
                                                  elem_id="run-name")
                            val_split = gr.Number(0, label="Validation fraction (only used when val/ is missing)",
                                                  elem_id="val-split")
                            amp = gr.Checkbox(False, label="Mixed precision (--amp 1)", elem_id="amp",
                                              info="bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX), float16 on "
                                                   "CUDA: faster layer4/full training, less memory; elsewhere float32")

                    with gr.Column(scale=7, elem_id="train-run"):
                        with gr.Row():
                            start_btn = gr.Button(START_LABEL, variant="primary", elem_id="start-btn")
                            stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn")
                        # The per-batch progress bar draws over its own strip, not over the status text.
                        progress_strip = gr.Markdown("", elem_id="train-progress", min_height=50, padding=False)
                        status = gr.Markdown("Ready.", elem_id="train-status", padding=True)
                        with gr.Row():
                            loss_plot = gr.Plot(loss_figure([]), label="Loss", show_label=False, elem_id="loss-plot")
                            acc_plot = gr.Plot(accuracy_figure([]), label="Accuracy", show_label=False,
                                               elem_id="acc-plot")
                        with gr.Row(equal_height=True):
                            compare = gr.Dropdown([], value=[], multiselect=True, scale=6, elem_id="compare",
                                                  label="Compare policies: overlay earlier runs' val accuracy")
                            compare_refresh = gr.Button("↻", scale=0, min_width=48, elem_id="compare-refresh")
                        epochs_table = gr.Dataframe(value=None, headers=EPOCH_COLUMNS, label="Epochs",
                                                    interactive=False, elem_id="epochs-table")
                        with gr.Accordion("Run log (same lines as the CLI)", open=False):
                            log_box = gr.Textbox("", lines=12, max_lines=30, show_label=False,
                                                 elem_id="train-log", buttons=["copy"])

            # ======================================================== Predict
            with gr.Tab("Predict", id="predict", elem_id="tab-predict"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=320):
                        gr.Markdown("### Checkpoint", elem_classes="section-title")
                        with gr.Group():
                            with gr.Row(equal_height=True):
                                ckpt = gr.Dropdown([], label="Trained checkpoint (runs under checkpoints/)",
                                                   allow_custom_value=True, scale=6, elem_id="checkpoint")
                                ckpt_refresh = gr.Button("↻", scale=0, min_width=48, elem_id="checkpoint-refresh")
                            ckpt_file = gr.File(label="…or upload a checkpoint (.pt / .pth); it overrides the list",
                                                file_types=[".pt", ".pth"], type="filepath", height=140,
                                                elem_id="checkpoint-upload")
                            # Shown only when the owner started the app with --allow-pickle-uploads;
                            # hidden, it still takes a value over the API, which the handlers ignore.
                            trust = gr.Checkbox(False, label="Trust pickle (needed for full-model files)",
                                                elem_id="trust-pickle", visible=pickles)
                            gr.Markdown("⚠ A pickled full model can run arbitrary code when loaded. Tick this only "
                                        "for files you made yourself or fully trust.", elem_id="pickle-warning",
                                        padding=True, visible=pickles)
                        ckpt_info = gr.Markdown("", elem_id="checkpoint-info", padding=True)
                        k = gr.Slider(1, 10, value=3, step=1, label="Top-k", elem_id="top-k")
                        gr.Markdown("### Examples from the dataset (val/ when it has one; click one)",
                                    elem_classes="section-title")
                        examples = gr.Gallery(label="Examples", show_label=False, columns=4, height=260,
                                              allow_preview=False, object_fit="cover", buttons=[], elem_id="examples")
                    with gr.Column(scale=7):
                        gr.Markdown("### One image", elem_classes="section-title")
                        with gr.Row(equal_height=False):
                            # png: an example set from the server reaches the model losslessly (webp would not)
                            image = SafeImage(type="pil", sources=["upload", "webcam", "clipboard"], height=300,
                                              format="png", label="Drop, paste or capture an image",
                                              elem_id="predict-image")
                            with gr.Column():
                                label = gr.Label(num_top_classes=10, label="Top-k", elem_id="predict-label")
                                pred_time = gr.Markdown("", elem_id="predict-time")
                                predict_btn = gr.Button("Predict", variant="primary", elem_id="predict-btn")
                        gr.Markdown("### Many images", elem_classes="section-title")
                        with gr.Row(equal_height=False):
                            files = gr.File(file_count="multiple", type="filepath", label="Upload images",
                                            height=110, elem_id="batch-files")
                            with gr.Column():
                                folder = gr.Textbox(label="…or a folder path on this machine", info=where[2:] or None,
                                                    placeholder="e.g. data/val", elem_id="batch-folder")
                                batch_btn = gr.Button("Classify all", variant="primary", elem_id="batch-btn")
                        batch_summary = gr.Markdown("", elem_id="batch-summary")
                        batch_table = gr.Dataframe(value=None, headers=PRED_COLUMNS, interactive=False, wrap=True,
                                                   max_height=320, elem_id="batch-table", label="Predictions")
                        batch_gallery = gr.Gallery(label="Predictions", columns=6, height=280, object_fit="cover",
                                                   elem_id="batch-gallery")
                        batch_csv = gr.File(label="CSV", interactive=False, elem_id="batch-csv", height=60)

            # ======================================================== Model
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                with gr.Row():
                    m_arch = gr.Dropdown(list(ARCHS), value="resnet18", label="Architecture", elem_id="model-arch")
                    m_policy = gr.Radio(policy_choices("resnet18"), value="head", label="Freeze policy", elem_id="model-policy",
                                        scale=2)
                    m_classes = gr.Number(2, label=f"Classes (new head outputs, 2 to {MAX_CLASSES:,})", precision=None,
                                          elem_id="model-classes")
                m_totals = gr.Markdown("", elem_id="model-totals")
                with gr.Row(equal_height=True):
                    m_base = gr.Markdown("", elem_id="model-base", padding=True, container=True)
                    m_transfer = gr.Markdown("", elem_id="model-transfer", padding=True, container=True)
                m_table = gr.Dataframe(value=None, headers=LAYER_COLUMNS, interactive=False, wrap=True,
                                       column_widths=["9%", "13%", "12%", "9%", "8%", "49%"], max_height=1400,
                                       label="Layers (yellow: BatchNorm / MaxPool, pale: a block with BatchNorms inside · green: trains under the policy, ◐ partly)",
                                       elem_id="model-table")
                with gr.Accordion("print(model): base and transfer model", open=False, elem_id="model-raw"):
                    with gr.Row():
                        m_base_raw = gr.Code("", language=None, label="Base model (ImageNet head)",
                                             elem_id="model-base-raw")
                        m_transfer_raw = gr.Code("", language=None, label="Transfer model", elem_id="model-transfer-raw")

        # ------------------------------------------------------------ wiring: Train
        ds_outputs = [ds_summary, n_classes]
        gr.on([check_btn.click, data_dir.submit], h.check_dataset_shown, [data_dir, val_split, seed], ds_outputs,
              api_name="check_dataset").then(h.examples, [data_dir], [examples, example_paths], **private)
        zip_file.upload(h.upload_zip, [zip_file, val_split, seed], [data_dir, ds_summary, n_classes],
                        api_name="upload_dataset_zip").then(h.examples, [data_dir], [examples, example_paths],
                                                            **private)
        weights_source.change(h.weights_inputs, weights_source, [weights_path, weights_file], **private)
        weights_file.upload(h.weights_uploaded, weights_file, weights_path, **private)
        gr.on([arch.change, policy.change, n_classes.change], h.policy_info, [arch, policy, n_classes], policy_md,
              **private)
        arch.change(lambda a: a, arch, m_arch, **private)
        arch.change(lambda a: gr.update(choices=policy_choices(a)), arch, policy, **private)
        gr.on([arch.change, weights_source.change], h.weights_note, [arch, weights_source], weights_source,
              show_progress="hidden", **private)
        m_arch.change(lambda a: gr.update(choices=policy_choices(a)), m_arch, m_policy, **private)
        policy.change(lambda p: p, policy, m_policy, **private)
        n_classes.change(lambda n: n, n_classes, m_classes, **private)

        predict_inputs = [image, k, ckpt, ckpt_file, trust]
        train_inputs = [data_dir, arch, weights_source, weights_path, policy, epochs, batch_size, lr, weight_decay,
                        dropout, augment, seed, device, val_split, run_name, amp, compare]
        train_outputs = [status, loss_plot, acc_plot, epochs_table, log_box, run_state, compare, ckpt]
        # concurrency_limit=None: a second Start (another tab) reaches the handler and is refused
        # there with a message, instead of waiting silently in Gradio's queue.
        # When the run ends the checkpoint's description and the image's label are redone: the
        # preselected best_acc.pt may be the same path as before, with newer weights in it.
        refreshed = [(h.checkpoint_info, [ckpt, ckpt_file, trust], ckpt_info), (h.predict_shown, predict_inputs,
                                                                                [label, pred_time])]
        started = start_btn.click(lambda: h.start_button(True), None, start_btn, queue=False, show_progress="hidden",
                                  **private).then(
            h.start, train_inputs, train_outputs, api_name="train", concurrency_limit=None,
            show_progress="minimal", show_progress_on=[progress_strip])
        # .then() does not run after an error (a refused or failed run raises): .failure() does.
        started.failure(lambda: h.start_button(False), None, start_btn, queue=False, show_progress="hidden", **private)
        run = started.then(lambda: h.start_button(False), None, start_btn, queue=False, show_progress="hidden",
                           **private)
        for fn, inputs, outputs in refreshed:
            run = run.then(fn, inputs, outputs, show_progress="hidden", **private)
        stop_btn.click(h.stop_shown, None, [status, ckpt, ckpt_info], concurrency_limit=None, show_progress="hidden",
                       **private)
        compare.change(h.compare_changed, [compare, run_state], acc_plot, show_progress="hidden", **private)
        compare_refresh.click(h.refresh_compare, compare, compare, **private)

        # ------------------------------------------------------------ wiring: Predict
        ckpt_refresh.click(h.refresh_checkpoints, ckpt, ckpt, api_name="refresh_checkpoints")
        gr.on([ckpt.change, ckpt_file.change, trust.change], h.checkpoint_info, [ckpt, ckpt_file, trust], ckpt_info,
              show_progress="minimal", **private)
        predict_btn.click(h.predict_shown, predict_inputs, [label, pred_time], **private)
        # A new checkpoint re-labels the image shown (else an old result, or an old error, stays on screen).
        gr.on([image.change, k.change, ckpt.change, ckpt_file.change, trust.change], h.predict_shown, predict_inputs,
              [label, pred_time], show_progress="minimal", **private)
        examples.select(h.example_selected, example_paths, image, **private)
        batch_inputs, batch_outputs = [files, folder, k, ckpt, ckpt_file, trust], [batch_table, batch_gallery,
                                                                                 batch_csv, batch_summary]
        gr.on([batch_btn.click, folder.submit], h.predict_batch_shown, batch_inputs, batch_outputs, **private)
        gr.on([ckpt.change, ckpt_file.change, trust.change], h.batch_stale, batch_summary, batch_outputs,
              show_progress="hidden", **private)
        # The API endpoints raise errors (the page shows them inline instead); hidden buttons carry them.
        gr.Button(visible=False).click(h.predict, predict_inputs, [label, pred_time], api_name="predict")
        gr.Button(visible=False).click(h.predict_batch, batch_inputs, batch_outputs, api_name="predict_batch")
        gr.Button(visible=False).click(h.stop, None, status, api_name="stop", concurrency_limit=None)

        # ------------------------------------------------------------ wiring: Model
        model_outputs = [m_table, m_totals, m_base, m_transfer, m_base_raw, m_transfer_raw]
        gr.on([m_arch.change, m_policy.change, m_classes.change], h.model_tab, [m_arch, m_policy, m_classes],
              model_outputs, api_name="model_summary", show_progress="minimal")

        # ------------------------------------------------------------ page load
        demo.load(h.watch, None, [status, loss_plot, acc_plot, epochs_table, log_box, run_state, ckpt, ckpt_info,
                                  start_btn], concurrency_limit=None, show_progress="hidden", **private).then(
            h.refresh_compare, compare, compare, **private)  # a followed run joins the list when it ends
        # A page opened during a run shows that run's settings, then checks its dataset.
        demo.load(h.followed_settings, None, train_inputs[:-1], **private).then(
            h.check_dataset_shown, [data_dir, val_split, seed], ds_outputs, **private).then(
            h.examples, [data_dir], [examples, example_paths], **private)
        demo.load(h.weights_note, [arch, weights_source], weights_source, **private)
        demo.load(h.refresh_compare, compare, compare, **private)
        demo.load(h.refresh_checkpoints, ckpt, ckpt, **private)
        demo.load(h.model_tab, [m_arch, m_policy, m_classes], model_outputs, **private)
    demo.handlers = h  # for tests and app.py
    return demo
