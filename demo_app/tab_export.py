"""Export, in the Predict tab: the checkpoint chosen there (list, typed path or
upload) written as model.onnx / model.pt2 / model.safetensors + model.json by
core.export.export_checkpoint (what export.py runs), each checked against the
PyTorch model; the files come back as download links. The server picks the
folder: a run's export/ for a checkpoint under the checkpoints folder, else
<uploads>/exports/<first 16 hex of the file's SHA-256>/. A client names none."""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from core.errors import UserError, first_line
from core.export import FORMATS, default_out_dir, export_checkpoint
from core.zipimport import file_sha256

from . import inference
from .context import PRIVATE, AppContext
from .messages import os_error_text, say, shown_error, upload_named, user_error
from .text import md_code, md_text

if TYPE_CHECKING:
    from .tab_predict import PredictTab

log = logging.getLogger("demo_app")

FORMAT_CHOICES = [("ONNX (model.onnx: ONNX Runtime, servers, phones)", "onnx"),
                  ("torch.export (model.pt2: PyTorch without this code)", "pt2"),
                  ("safetensors (model.safetensors: weights only, safe to share)", "safetensors")]


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

    def out_dir(self, path: str, uploaded) -> Path:
        """A run's export/ for a file under the checkpoints folder; anything else
        (an upload, a typed path elsewhere) under the uploads folder, by content."""
        p = Path(path).expanduser().resolve()
        if not uploaded and p.is_relative_to(self.ctx.checkpoints_dir.resolve()):
            return default_out_dir(p)
        return self.ctx.uploads_dir / "exports" / file_sha256(p)[:16]

    def export(self, selected, uploaded, trust, formats) -> dict:
        """-> {files: the written paths (model.json last), status markdown}."""
        if not formats:
            raise user_error("tick at least one format to export", "Nothing to export")
        self.predict._predictor(selected, uploaded, trust)  # the Predict tab's checks and words (access, pickles)
        path = inference.choose_checkpoint(selected, uploaded)
        trusted = bool(trust) and self.ctx.policy.allow_pickle
        try:
            out = self.out_dir(path, uploaded)
            files, _ = export_checkpoint(path, out, formats, trust_pickle=trusted)
        except UserError as e:
            raise user_error(upload_named(e, path) if uploaded else e, "Export failed") from None
        except OSError as e:
            raise user_error(os_error_text(e), "Export failed") from None
        except Exception as e:
            log.error("exporting %s failed:\n%s", path, traceback.format_exc())
            raise user_error(f"the export failed ({type(e).__name__}: {first_line(e)})", "Export failed") from None
        shown = out.relative_to(self.ctx.checkpoints_dir.resolve()) if out.is_relative_to(
            self.ctx.checkpoints_dir.resolve()) else out.name
        lines = [f"✓ Exported to {md_code(str(shown) + '/')}:"]
        for f in files:
            check = f", max logit difference vs PyTorch {f.max_abs_diff:.1e}" if f.format in ("onnx", "pt2") else ""
            size = f"{f.bytes / 1e6:.1f} MB" if f.bytes >= 100_000 else f"{f.bytes / 1e3:.1f} KB"
            lines.append(f"- {md_code(f.path.name)} ({size}{check})")
            lines += [f"- ⚠ {md_text(say(n))}" for n in f.notes]
        return {self.files: [str(f.path) for f in files], self.status: "\n".join(lines)}

    def export_shown(self, selected, uploaded, trust, formats) -> dict:
        """export() for the page: a problem is said in place of the links."""
        try:
            return self.export(selected, uploaded, trust, formats)
        except gr.Error as e:
            return {self.files: None, self.status: shown_error(e)}
