"""Data for the Model tab: per-layer table, totals, base vs transfer model."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from core.models import HEAD_NAME, MOBILENET_LAST_STAGE, apply_policy, build_base_model, build_model, param_counts
from core.summary import layer_rows, policy_table


POLICY_LABELS = {"head": "Head only", "last": "Last stage + head", "full": "Full fine-tune"}
# What each policy trains, in the architecture's own layer names.
TRAINED_PARTS = {"resnet18": {"head": "fc", "last": "layer4 + fc"},
                 "mobilenet_v2": {"head": "classifier", "last": f"features.{MOBILENET_LAST_STAGE}–18 + classifier"}}


def policy_choices(arch: str) -> list[tuple[str, str]]:
    """The freeze-policy radio's (label, value) pairs, naming `arch`'s layers."""
    parts = TRAINED_PARTS.get(arch, TRAINED_PARTS["resnet18"])
    return [(f"{POLICY_LABELS['head']} ({parts['head']})", "head"),
            (f"{POLICY_LABELS['last']} ({parts['last']})", "last"), (POLICY_LABELS["full"], "full")]


def policy_help(arch: str, policy: str) -> str:
    """One line on what `policy` trains, in `arch`'s layer names."""
    parts = TRAINED_PARTS.get(arch, TRAINED_PARTS["resnet18"])
    return {"head": f"Head only: the pretrained backbone is frozen, only the new {parts['head']} layer learns. Fast, "
                    f"best for small datasets.",
            "last": f"Last stage + head: {parts['last']} learn, earlier layers stay frozen. More capacity, still fast.",
            "full": "Full fine-tune: every layer learns. Slowest; needs more data and a smaller learning rate."}[policy]


@dataclass
class ModelView:
    rows: list[dict]
    trainable: int
    total: int
    base_total: int
    base_head: str
    transfer_head: str
    base_repr: str
    transfer_repr: str


def _head_repr(model, arch: str) -> str:
    return " ".join(repr(getattr(model, HEAD_NAME[arch])).split())


@lru_cache(maxsize=4)
def _base(arch: str) -> tuple[int, str, str]:
    with torch.device("meta"):  # structure and counts only: no memory, no random init
        base = build_base_model(arch)
    return param_counts(base)[1], _head_repr(base, arch), repr(base)


@lru_cache(maxsize=16)
def model_view(arch: str, policy: str, n_classes: int, dropout: float = 0.0) -> ModelView:
    with torch.device("meta"):  # output shapes still propagate through a meta forward pass
        model = apply_policy(build_model(arch, int(n_classes), float(dropout), "none"), arch, policy)
    rows = layer_rows(model, arch, policy)
    trainable, total = param_counts(model)
    base_total, base_head, base_repr = _base(arch)
    return ModelView(rows, trainable, total, base_total, base_head, _head_repr(model, arch), base_repr, repr(model))


@lru_cache(maxsize=16)
def _policy_counts(arch: str, n_classes: int) -> dict[str, tuple[int, int]]:
    return {pol: (tr, tot) for pol, tr, tot in policy_table(arch, int(n_classes), 0.0)}


def policy_markdown(arch: str, policy: str, n_classes: int) -> str:
    """One-line explanation and the trainable-parameter count of `policy`."""
    trainable, total = _policy_counts(arch, max(2, int(n_classes or 2)))[policy]
    return (f"{policy_help(arch, policy)}<br>**Trainable: {trainable:,}** of {total:,} parameters "
            f"({100 * trainable / total:.2f}%) for {int(n_classes or 2)} classes")
