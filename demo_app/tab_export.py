"""Export, in the Predict tab: the checkpoint chosen there (list, typed path or
upload) written as model.onnx / model.pt2 / model.safetensors (/ model.int8.onnx) + model.json by
core.export.export_checkpoint (what export.py runs), each checked against the
PyTorch model; the files come back as download links. The server picks the
folder: a run's export/ for a checkpoint under the checkpoints folder, else
<uploads>/exports/<first 16 hex of the file's SHA-256>/, of which the newest
KEEP_UPLOAD_EXPORTS stay (the page got copies). A client names none."""
from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from core.errors import UserError, first_line
from core.export import FORMATS, default_out_dir, export_checkpoint
from core.zipimport import file_sha256

from . import inference
from .context import PRIVATE, AppContext, keep_newest
from .messages import os_error_text, say, shown_error, upload_named, user_error
from .text import md_code, md_text

if TYPE_CHECKING:
    from .tab_predict import PredictTab

log = logging.getLogger("demo_app")

# Folders under <uploads>/exports/ kept (each up to ~150 MB for ResNet-18). Gradio copies the files it
# hands out into its own cache, so an older folder is not needed by any page.
KEEP_UPLOAD_EXPORTS = 8

FORMAT_CHOICES = [("ONNX (model.onnx: ONNX Runtime, servers, phones)", "onnx"),
                  ("torch.export (model.pt2: PyTorch without this code)", "pt2"),
                  ("safetensors (model.safetensors: weights only, safe to share)", "safetensors"),
                  ("int8 ONNX (model.int8.onnx: ¼ the size, faster on CPUs; calibrated on the run's training images, "
                   "scored on its val images: takes longer)", "int8")]


class ExportPanel:
    def __init__(self, ctx: AppContext, predict: PredictTab):
        self.ctx, self.predict = ctx, predict

    def layout(self) -> None:
        with gr.Accordion("Export this checkpoint", open=False, elem_id="export-panel"):
            self.formats = gr.CheckboxGroup(FORMAT_CHOICES, value=list(FORMATS), label="Formats (model.json comes "
                                            "with each: classes, preprocessing)", elem_id="export-formats")
            self.button = gr.Button("Export", elem_id="export-btn")
            self.status = gr.Markdown("", elem_id="export-status")
            self.files = gr.File(label="Exported files", file_count="multiple", interactive=False,
                                 elem_id="export-files")

    def wire(self) -> None:
        inputs = [*self.predict.checkpoint_inputs, self.formats]
        outputs = [self.files, self.status]
        # one export at a time for all pages: an ONNX export keeps both cores busy for seconds
        self.button.click(self.export_shown, inputs, outputs, concurrency_id="export", concurrency_limit=1, **PRIVATE)
        gr.Button(visible=False).click(self.export, inputs, outputs, api_name="export", concurrency_id="export",
                                       concurrency_limit=1)

    @property
    def uploads_exports(self) -> Path:
        """Where exports of checkpoints from outside the checkpoints folder go, one folder each."""
        return self.ctx.uploads_dir / "exports"

    def out_dir(self, path: str, uploaded) -> Path:
        """A run's export/ for a file under the checkpoints folder; anything else
        (an upload, a typed path elsewhere) under the uploads folder, by content."""
        p = Path(path).expanduser().resolve()
        if not uploaded and p.is_relative_to(self.ctx.checkpoints_dir.resolve()):
            return default_out_dir(p)
        return self.uploads_exports / file_sha256(p)[:16]

    def export(self, selected, uploaded, trust, formats) -> dict:
        """-> {files: the written paths (model.json last), status markdown}."""
        if not formats:
            raise user_error("tick at least one format to export", "Nothing to export")
        pred = self.predict._predictor(selected, uploaded, trust)  # the Predict tab's checks and words (access, pickles)
        path = inference.choose_checkpoint(selected, uploaded)
        trusted = bool(trust) and self.ctx.policy.allow_pickle
        int8 = "int8" in formats
        formats = [f for f in formats if f != "int8"] or ["onnx"]  # int8 quantizes model.onnx
        out, new_folder = None, False
        try:
            data_dir = self.int8_data_dir(pred) if int8 else None
            out = self.out_dir(path, uploaded)
            new_folder = not out.exists()
            files, report = export_checkpoint(path, out, formats, quantize="int8" if int8 else None,
                                              data_dir=data_dir, trust_pickle=trusted)
            new_folder = False  # written: kept
        except UserError as e:
            raise user_error(upload_named(e, path) if uploaded else e, "Export failed") from None
        except OSError as e:
            raise user_error(os_error_text(e), "Export failed") from None
        except Exception as e:
            log.error("exporting %s failed:\n%s", path, traceback.format_exc())
            raise user_error(f"the export failed ({type(e).__name__}: {first_line(e)})", "Export failed") from None
        finally:  # uploads' exports: a failed one leaves no new folder, and only the newest stay
            if out is not None and out.parent == self.uploads_exports:
                if new_folder:
                    shutil.rmtree(out, ignore_errors=True)
                keep_newest(out.parent, KEEP_UPLOAD_EXPORTS)
        runs = self.ctx.checkpoints_dir.resolve()
        shown = out.relative_to(runs) if out.is_relative_to(runs) else out.name
        lines = [f"✓ Exported to {md_code(str(shown) + '/')}:"]
        for f in files:
            check = f", max logit difference vs PyTorch {f.max_abs_diff:.1e}" if f.format in ("onnx", "pt2") else ""
            lines.append(f"- {md_code(f.path.name)} ({size_text(f.bytes)}{check})")
            lines += [f"- ⚠ {md_text(say(n).replace(str(out) + '/', ''))}" for n in f.notes]  # no server path
        written = [str(f.path) for f in files]
        if report:
            written.insert(-1, str(report.path))  # model.json stays last
            lines.append(int8_line(report))
        return {self.files: written, self.status: "\n".join(lines)}

    def int8_data_dir(self, pred) -> str:
        """The folder int8 calibrates on: the one the checkpoint was trained on,
        read only where the app may read (a checkpoint names any folder it likes)."""
        recorded = (pred.info.get("args") or {}).get("data_dir")
        if not isinstance(recorded, str) or not recorded:
            raise UserError(f"int8 calibrates on the run's training images, and this {pred.info.get('format')} names "
                            f"no dataset folder; export.py --quantize int8 --data-dir DIR takes one")
        folder = self.ctx.policy.check_tree(recorded, "Dataset folder")
        if not folder.is_dir():
            raise UserError(f"int8 calibrates on the run's training images, and the folder it was trained on, "
                            f"{recorded}, is not there (moved?); export.py --quantize int8 --data-dir DIR takes another")
        return str(folder)

    def export_shown(self, selected, uploaded, trust, formats) -> dict:
        """export() for the page: a problem is said in place of the links."""
        try:
            return self.export(selected, uploaded, trust, formats)
        except gr.Error as e:
            return {self.files: None, self.status: shown_error(e)}


def int8_line(report) -> str:
    """The int8 file, its size and what quantizing cost on val (no server path)."""
    line = (f"- {md_code(report.path.name)} ({size_text(report.bytes)}; calibrated on {report.calibration_images} training image(s); "
            f"val accuracy on {report.val_images} image(s): float32 {report.float_val_acc:.4f}, int8 "
            f"{report.int8_val_acc:.4f}, top-1 agreement {report.agreement:.4f})")
    if not report.acceptable:
        line += ("\n- ⚠ int8 loses more than 1 val image in 100: it is not a faithful copy; deploy model.onnx "
                 "unless the speed is worth the loss")
    return line


def size_text(n: int) -> str:
    """In the units the download list beside it uses (1 MB = 2**20 bytes)."""
    return f"{n / 2**20:.1f} MB" if n >= 100 * 2**10 else f"{n / 2**10:.1f} KB"
