"""Model building, pretrained weights, freeze policies and the frozen/trainable split.

The torchvision structure is kept as is (ResNet-18: conv1, bn1, relu, maxpool,
layer1-4, avgpool, fc); only the classification head is replaced."""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import checkpoint_rules as rules
from .errors import CheckpointError, WeightsError
from .fileio import load_file
from .safeload import check_torch_file

HEAD_NAME = {"resnet18": "fc", "mobilenet_v2": "classifier"}
# Keys of the head in a state_dict; never taken from a weights file (the head is always new).
HEAD_PREFIXES = {"resnet18": ("fc.",), "mobilenet_v2": ("classifier.",)}
# MobileNetV2's last resolution stage (7x7) starts at features[14]; it plays layer4's role.
MOBILENET_LAST_STAGE = 14


def torchvision_weights_enum(arch: str):
    return {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
            "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1}[arch]


def build_base_model(arch: str) -> nn.Module:
    """The torchvision model with its 1000-class ImageNet head, random init."""
    return getattr(torchvision.models, arch)(weights=None)


def replace_head(model: nn.Module, arch: str, num_classes: int, dropout: float) -> nn.Module:
    """New head for `num_classes`. ResNet: Linear(512, n), or Dropout+Linear when
    dropout > 0. MobileNetV2 keeps its Sequential(Dropout, Linear) head shape."""
    if arch == "resnet18":
        in_f = model.fc.in_features
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_f, num_classes)) if dropout > 0 else nn.Linear(in_f, num_classes)
    else:
        in_f = model.classifier[1].in_features
        model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_f, num_classes))
    return model


def build_model(arch: str, num_classes: int, dropout: float = 0.0, weights: str = "none") -> nn.Module:
    """Base model with `weights` loaded into the backbone, then a new head."""
    model = build_base_model(arch)
    load_backbone_weights(model, arch, weights)
    return replace_head(model, arch, num_classes, dropout)


# ---------------------------------------------------------------- weights

def imagenet_cache_path(arch: str) -> Path:
    url = torchvision_weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def imagenet_state_dict(arch: str) -> dict:
    """torchvision's IMAGENET1K_V1 weights through the usual TORCH_HOME cache.
    Fails within seconds, with instructions, when the file is missing and the
    download host cannot be reached (offline machines)."""
    enum = torchvision_weights_enum(arch)
    cached = imagenet_cache_path(arch)
    if not cached.is_file():
        host = urlparse(enum.url).hostname
        offline = os.environ.get("TL_OFFLINE") == "1"
        if offline or not host_reachable(host, 443):
            why = "TL_OFFLINE=1 is set, so no download was tried" if offline else f"no connection to {host}"
            raise WeightsError(
                f"ImageNet weights for {arch} are not cached and cannot be downloaded ({why}).\n"
                f"  Fix: on a machine with internet, download {enum.url}\n"
                f"  and place it at {cached} (TORCH_HOME={os.environ.get('TORCH_HOME', '<default ~/.cache/torch>')}),\n"
                f"  or train without pretrained weights: {{choice:weights=none}}, or a local file: {{choice:weights=PATH.pth}}",
                field="weights", value="imagenet")
    if cached.is_file():  # torchvision would torch.load whatever lies there
        try:
            with open(cached, "rb") as f:
                check_torch_file(f, cached, os.fstat(f.fileno()).st_size)
        except (CheckpointError, OSError) as e:
            raise WeightsError(f"the cached ImageNet weights for {arch} cannot be used: {e}. "
                               f"Delete the file and retry, or use {{choice:weights=none}}",
                               field="weights", value="imagenet") from None
    try:
        return enum.get_state_dict(progress=True, check_hash=False)
    except Exception as e:  # network errors mid-download, a corrupt cache file
        raise WeightsError(f"could not load ImageNet weights for {arch} from {cached}: {e}. "
                           f"Delete the file and retry, or use {{choice:weights=none}}",
                           field="weights", value="imagenet") from None


def host_reachable(host: str | None, port: int, timeout: float = 3.0) -> bool:
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_backbone_weights(model: nn.Module, arch: str, weights: str) -> str:
    """Load 'imagenet', 'none' or a local state_dict PATH into everything but
    the head. Returns a short description of what was loaded."""
    if weights == "none":
        return "random init"
    if weights == "imagenet":
        state = imagenet_state_dict(arch)
        source = f"torchvision {arch} IMAGENET1K_V1"
    else:
        state = read_weights_file(weights)
        source = f"local file {weights}"
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES[arch])}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES[arch])}
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(backbone) if tuple(expected[k].shape) != tuple(backbone[k].shape))
    if missing or unexpected or wrong_shape:
        found = [f"{what} {few_keys(keys)}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                                ("wrong shapes", wrong_shape)) if keys]
        raise WeightsError(f"weights from {source} do not fit {arch}: {'; '.join(found)}. "
                           f"Is the file for a different {{setting}}?", field="arch", value=arch)
    model.load_state_dict(backbone, strict=False)
    return source


def read_weights_file(path: str) -> dict:
    """A state_dict from a local file (or a checkpoint's model_state), its
    tensors finite and its BatchNorm variances >= 0: damaged weights would
    only show up as a diverged run."""
    obj = load_file(path, what="{setting:weights} file")
    if isinstance(obj, dict) and "model_state" in obj:
        obj = obj["model_state"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state_dict (a dict of tensors) or a checkpoint with 'model_state'")
    r = rules.Rules(path)
    for k, v in obj.items():
        rules.check_tensor(r, f"[{rules.shown(k)}]", v, non_negative=str(k).endswith("running_var"))
    return obj


def few_keys(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    return "[" + ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]"


# ---------------------------------------------------------------- freezing

def trainable_names(arch: str, policy: str) -> tuple[str, ...]:
    """Top-level parameter-name prefixes that train under `policy`."""
    head = HEAD_NAME[arch] + "."
    if policy == "head":
        return (head,)
    if policy == "last":
        if arch == "resnet18":
            return ("layer4.", head)
        return tuple(f"features.{i}." for i in range(MOBILENET_LAST_STAGE, 19)) + (head,)
    return ("",)


def apply_policy(model: nn.Module, arch: str, policy: str) -> nn.Module:
    """Set requires_grad by policy."""
    prefixes = trainable_names(arch, policy)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def split_model(model: nn.Module, arch: str, policy: str) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trainable suffix) sharing the model's modules, such that
    suffix(prefix(x)) == model(x). Under 'full' the prefix is empty."""
    if arch == "resnet18":
        stem = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3]
        pooled = [model.avgpool, nn.Flatten(1)]
        if policy == "head":
            return nn.Sequential(*stem, model.layer4, *pooled), nn.Sequential(model.fc)
        if policy == "last":
            return nn.Sequential(*stem), nn.Sequential(model.layer4, *pooled, model.fc)
    else:
        pooled = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        if policy == "head":
            return nn.Sequential(model.features, *pooled), nn.Sequential(model.classifier)
        if policy == "last":
            k = MOBILENET_LAST_STAGE
            return nn.Sequential(*model.features[:k]), nn.Sequential(*model.features[k:], *pooled, model.classifier)
    return nn.Sequential(), model


def set_train_mode(model: nn.Module, prefix: nn.Module) -> None:
    """model.train(), then put the frozen prefix back in eval mode so its
    BatchNorm running statistics never change. (Calling model.train() after
    freezing BN, as the reference does, silently undoes the freeze.)"""
    model.train()
    prefix.eval()


# ---------------------------------------------------------------- inference copies

def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-only copy of `module` with every BatchNorm that directly follows a
    convolution folded into that convolution's weights and bias. In eval mode a
    BatchNorm is a fixed per-channel affine map, so the result is the same
    function up to float rounding, one pass over memory cheaper per BatchNorm
    (MobileNetV2: ~1.5x faster inference on CPU). Valid only while the
    weights and running statistics stay fixed: frozen layers, prediction."""
    fused = copy.deepcopy(module).eval()
    for parent in list(fused.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
    for p in fused.parameters():  # folded weights keep the original's memory format
        p.requires_grad_(False)
    return fused


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names where forward() feeds the conv straight into the
    BatchNorm: consecutive children of a Sequential (MobileNetV2, downsample),
    and convN/bnN of torchvision's ResNet stem and blocks. Anything else is left
    as is, which is always correct, only slower."""
    kids = parent._modules
    if isinstance(parent, nn.Sequential):
        names = list(kids)
        pairs = zip(names, names[1:])
    elif isinstance(parent, (ResNet, BasicBlock, Bottleneck)):
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    else:
        return []
    return [(c, b) for c, b in pairs
            if isinstance(kids.get(c), nn.Conv2d) and type(kids.get(b)) is nn.BatchNorm2d
            and kids[b].track_running_stats and kids[b].num_features == kids[c].out_channels]

