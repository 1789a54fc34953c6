"""Describe a network: the per-layer table of the Model tab and --print-model."""
from __future__ import annotations

import torch
from torch import nn

from .models import HEAD_NAME, apply_policy, build_base_model, build_model, param_counts, trainable_names

NOTES = {
    "BatchNorm2d": "BatchNorm: normalises each channel with batch statistics while training and with stored "
                   "running mean/var at eval; frozen layers keep eval mode so those statistics stay ImageNet's.",
    "MaxPool2d": "MaxPool: 3x3 stride-2 max over the stem output; halves 112x112 to 56x56 and adds small shift tolerance.",
    "AdaptiveAvgPool2d": "Global average pool: 512x7x7 -> 512 features, one per channel, whatever the input size.",
    "Linear": "Fully connected head: features -> class scores. This is the layer replaced for your classes.",
}


def layer_rows(model: nn.Module, arch: str, policy: str, depth: int = 2, image_size: int = 224) -> list[dict]:
    """One row per module down to `depth` (e.g. layer1, layer1.0): name, type,
    output shape for a 1x3xHxW input, own parameters, trains under policy."""
    modules = {name: m for name, m in model.named_modules() if name and name.count(".") < depth}
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(_shape_hook(shapes, name)) for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    prefixes = trainable_names(arch, policy)
    rows = []
    for name, m in modules.items():
        n_params = sum(p.numel() for p in m.parameters())
        n_trains = sum(p.numel() for pn, p in m.named_parameters() if f"{name}.{pn}".startswith(prefixes))
        kind = type(m).__name__
        # A block's BatchNorms are inside it, not rows of their own: say how many (and
        # whether they train), or a MobileNetV2 table would show no BatchNorm at all.
        bns = [f"{name}.{cn}" for cn, c in m.named_modules() if cn and isinstance(c, nn.BatchNorm2d)] \
            if kind != "BatchNorm2d" else []
        n_bn, n_bn_train = len(bns), sum(f"{b}.weight".startswith(prefixes) for b in bns)
        note = NOTES.get(kind, "")
        if n_bn:
            state = ("they train and update their running statistics" if n_bn_train == n_bn else
                     "frozen: kept in eval mode, ImageNet statistics" if not n_bn_train else
                     f"{n_bn_train} of them train, the others stay frozen in eval mode")
            note = f"{n_bn} BatchNorm layer(s) inside ({state}). {note}".strip()
        rows.append({
            "name": name, "type": kind,
            "output_shape": "x".join(str(d) for d in shapes.get(name, ())) or "-",
            "params": n_params,
            "trainable_params": n_trains,
            "trains": n_trains > 0,
            "batchnorms": n_bn + (kind == "BatchNorm2d"),
            "note": note,
        })
    return rows


def _shape_hook(store, name):
    def hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            store[name] = tuple(out.shape)
    return hook


def highlight_lines(model: nn.Module, arch: str) -> list[str]:
    """Each top-level part (ResNet: conv1, bn1, relu, maxpool, layer1-4, avgpool,
    fc; MobileNetV2: features, classifier): its repr, or a count for a stage."""
    lines = []
    for name, m in model.named_children():
        desc = repr(m) if not isinstance(m, nn.Sequential) or name == HEAD_NAME[arch] else \
            f"Sequential of {len(m)} {type(m[0]).__name__}(s), {sum(p.numel() for p in m.parameters()):,} params"
        lines.append(f"  {name}: {' '.join(desc.split())}")
    return lines


def policy_table(arch: str, num_classes: int, dropout: float = 0.0) -> list[tuple[str, int, int]]:
    with torch.device("meta"):  # counts only: no memory, no random init
        model = build_model(arch, num_classes, dropout, "none")
    return [(pol, *param_counts(apply_policy(model, arch, pol))) for pol in ("head", "last", "full")]


def print_model_report(arch: str, model: nn.Module, num_classes: int, dropout: float) -> list[str]:
    """Text for --print-model: base model, transfer model, highlights, counts."""
    with torch.device("meta"):  # shown, never run
        base = build_base_model(arch)
    out = [f"BASE MODEL ({arch}, ImageNet head with {_head_out(base)} outputs):", repr(base), "",
           f"TRANSFER MODEL (new head with {num_classes} outputs):", repr(model), "", "HIGHLIGHTS:"]
    out += highlight_lines(model, arch)
    out += ["", "PARAMETERS (trainable / total) per policy:"]
    for pol, tr, tot in policy_table(arch, num_classes, dropout):
        out.append(f"  {pol:<5} trainable={tr:,} / total={tot:,} ({100 * tr / tot:.2f}%)")
    return out


def _head_out(model: nn.Module) -> int:
    head = model.fc if hasattr(model, "fc") else model.classifier[-1]
    return head.out_features
