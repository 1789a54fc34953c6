"""The Model tab: the layers of the base and the transfer model, and which of
them train under a freeze policy (it follows the Train tab's choices)."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.config import ARCHS, MAX_CLASSES
from core.errors import UserError

from .messages import user_error, whole_number
from .modelview import POLICY_LABELS, model_view, policy_choices

LAYER_COLUMNS = ["layer", "type", "output shape", "params", "trains", "note"]


class ModelTab:
    def layout(self) -> None:
        with gr.Tab("Model", id="model", elem_id="tab-model"):
            with gr.Row():
                self.arch = gr.Dropdown(list(ARCHS), value="resnet18", label="Architecture", elem_id="model-arch")
                self.policy = gr.Radio(policy_choices("resnet18"), value="head", label="Freeze policy",
                                       elem_id="model-policy", scale=2)
                self.classes = gr.Number(2, label=f"Classes (new head outputs, 2 to {MAX_CLASSES:,})",
                                         precision=None, elem_id="model-classes")
            self.totals = gr.Markdown("", elem_id="model-totals")
            with gr.Row(equal_height=True):
                self.base = gr.Markdown("", elem_id="model-base", padding=True, container=True)
                self.transfer = gr.Markdown("", elem_id="model-transfer", padding=True, container=True)
            self.table = gr.Dataframe(
                value=None, headers=LAYER_COLUMNS, interactive=False, wrap=True,
                column_widths=["9%", "13%", "12%", "9%", "8%", "49%"], max_height=1400,
                label="Layers (yellow: BatchNorm / MaxPool, pale: a block with BatchNorms inside · green: trains "
                      "under the policy, ◐ partly)", elem_id="model-table")
            with gr.Accordion("print(model): base and transfer model", open=False, elem_id="model-raw"):
                with gr.Row():
                    self.base_raw = gr.Code("", language=None, label="Base model (ImageNet head)",
                                            elem_id="model-base-raw")
                    self.transfer_raw = gr.Code("", language=None, label="Transfer model",
                                                elem_id="model-transfer-raw")

    def wire(self, demo: gr.Blocks) -> None:
        inputs = [self.arch, self.policy, self.classes]
        outputs = [self.table, self.totals, self.base, self.transfer, self.base_raw, self.transfer_raw]
        self.arch.change(lambda a: gr.update(choices=policy_choices(a)), self.arch, self.policy,
                         api_visibility="private")
        gr.on([self.arch.change, self.policy.change, self.classes.change], self.summary, inputs, outputs,
              api_name="model_summary", show_progress="minimal")
        demo.load(self.summary, inputs, outputs, api_visibility="private")

    def summary(self, arch, policy, n_classes, dropout=0.0) -> dict:
        try:
            # range checked here, not by the box's minimum/maximum: Gradio's check logs a traceback per entry
            n = whole_number(2 if n_classes is None else n_classes, "classes")
            if not 2 <= n <= MAX_CLASSES:
                raise UserError(f"{{setting}} must be from 2 to {MAX_CLASSES:,} (got {n:,})", field="classes", value=n,
                                allowed=(2, MAX_CLASSES))
        except UserError as e:
            raise user_error(e, "Model") from None
        v = model_view(arch, policy, n, float(dropout or 0))
        df = pd.DataFrame([[r["name"], r["type"], r["output_shape"], r["params"], trains_cell(r), r["note"]]
                           for r in v.rows], columns=LAYER_COLUMNS)
        kinds = [r["type"] if r["type"] in ("BatchNorm2d", "MaxPool2d") else "block" if r["batchnorms"] else ""
                 for r in v.rows]
        label = POLICY_LABELS[policy]
        return {
            self.table: df.style.apply(_layer_style, axis=1, kinds=kinds).format({"params": "{:,}"}),
            self.totals: f"**Total parameters:** {v.total:,} · **trainable under “{label}”:** {v.trainable:,} "
                         f"({100 * v.trainable / v.total:.2f}%) · output shapes for a 1×3×224×224 input",
            self.base: f"#### Base model (ImageNet head)\n{arch}, **1000 outputs**\n\nhead: `{v.base_head}`\n\n"
                       f"{v.base_total:,} parameters",
            self.transfer: f"#### Transfer model (new head)\n{arch}, **{n} outputs**\n\nhead: `{v.transfer_head}`\n\n"
                           f"{v.total:,} parameters, {v.trainable:,} trainable ({label})",
            self.base_raw: v.base_repr, self.transfer_raw: v.transfer_repr}


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
