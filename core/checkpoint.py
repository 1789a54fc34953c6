"""The checkpoint format: the dict a run saves each epoch, reading one back
(every field checked, a reference checkpoint's missing fields filled in), the
model rebuilt from it, and the reference's two other model files. Files are
read and written through core.fileio."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from . import checkpoint_rules as rules
from .best import RunState
from .config import ARCHS, MAX_CLASSES, POLICIES, TrainConfig
from .errors import CheckpointError, first_line
from .fileio import atomic_torch_save, load_file, peek
from .models import build_model, few_keys, trainable_names

FORMAT_VERSION = 1
REFERENCE_KEYS = ("epoch", "model_state", "optimizer_state", "best_val_acc", "best_val_loss",
                  "class_names", "weights", "args", "history", "best_epoch")


def saved_epoch(path) -> int | None:
    """The epoch a checkpoint file holds; None if unreadable or not an epoch number."""
    epoch = peek(path).get("epoch")
    return epoch if type(epoch) is int and 0 <= epoch <= rules.MAX_EPOCH else None


# ---------------------------------------------------------------- checkpoint dicts

def make_checkpoint(state: RunState, epoch: int, model: nn.Module, optimizer, scaler, cfg: TrainConfig) -> dict:
    """A plain-type dict: the reference's keys plus what is needed to rebuild the
    model, the loss scale of a float16 (CUDA --amp 1) run so a resume keeps it,
    per-class validation counts ([[true, predicted, count], ...], core.metrics)
    of this epoch and of the best-accuracy epoch, `temperature`: fitted on
    this epoch's val logits (core.calibration; absent: 1), and `data_files`: which
    images the run used (DatasetInfo.fingerprint; absent in older checkpoints)."""
    best, class_names = state.best, state.classes
    ckpt = {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "model_state": on_cpu(model.state_dict()),
        "optimizer_state": on_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "val_confusion": state.confusion,
        "best_val_confusion": state.best_confusion,
        "best_val_acc": float(best["acc"]),
        "best_val_loss": float(best["loss"]),
        "best_epoch": int(best["acc_epoch"]),
        "best_loss_epoch": int(best["loss_epoch"]),
        "class_names": list(class_names),
        "weights": str(cfg.weights),
        "args": cfg.to_dict(),
        "history": [dict(h) for h in state.history],
        "arch": cfg.arch,
        "policy": cfg.policy,
        "head": {"dropout": float(cfg.dropout), "num_classes": len(class_names)},
        "preprocess": {"resize": int(cfg.resize_size), "crop": int(cfg.image_size),
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    if state.calibration is not None:
        ckpt["temperature"] = float(state.calibration.temperature)
    if state.data_files is not None:
        ckpt["data_files"] = dict(state.data_files)
    return ckpt


def on_cpu(obj):
    """obj with every tensor on the CPU (no copy for those already there): a GPU
    run's checkpoint must load with a plain torch.load on a machine without one."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def read_checkpoint(path, trust_pickle: bool = False) -> dict:
    """Load a checkpoint dict (ours or the reference's) to resume: its fields
    normalised and checked, the training state (optimizer, loss scaler) too."""
    obj = load_file(path, trust_pickle=trust_pickle)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is a bare state_dict (weights only: no epoch, optimizer or class names), not a "
                              f"checkpoint dict. Resume from a run's latest.pt; a state_dict can start a new run "
                              f"({{setting:weights}}) or predict (predict.py {{setting:classes}})", field="checkpoint")
    if not isinstance(obj, dict) or "model_state" not in obj:
        raise CheckpointError(f"{path} is not a checkpoint dict (no 'model_state' key)")
    ckpt = normalise_checkpoint(obj, path)
    rules.Rules(path).int_("epoch", ckpt.get("epoch"), 0, rules.MAX_EPOCH)  # a resume counts on from it
    rules.check_training_state(ckpt, path)
    check_optimizer_fits(ckpt, path)
    return ckpt


@functools.lru_cache(maxsize=16)
def trainable_shapes(arch: str, num_classes: int, dropout: float) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per policy, the shapes of the parameters an optimizer gets, in its order."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, dropout, "none")
    return {policy: tuple(tuple(p.shape) for name, p in model.named_parameters()
                          if name.startswith(trainable_names(arch, policy))) for policy in POLICIES}


def check_optimizer_fits(ckpt: dict, path) -> None:
    """The saved optimizer state belongs to this model: as many parameters as
    one of the policies trains, each moment the shape of its parameter (torch's
    load_state_dict checks the count only; a wrong shape fails mid-training)."""
    opt = ckpt.get("optimizer_state")
    if not opt:
        return
    ids = [pid for g in opt["param_groups"] for pid in g["params"]]
    shapes = trainable_shapes(ckpt["arch"], ckpt["head"]["num_classes"], ckpt["head"]["dropout"])
    fitting = [s for s in shapes.values() if len(s) == len(ids)]
    r = rules.Rules(path)
    if len(set(ids)) != len(ids) or not fitting:
        counts = ", ".join(f"{len(s)} ({p})" for p, s in shapes.items())
        r.fail("optimizer_state.param_groups", opt["param_groups"],
               f"the parameters one policy of this model trains, each once: {counts}")
    for pid, shape in zip(ids, fitting[0]):
        for k, v in (opt["state"].get(pid) or {}).items():
            if not torch.is_tensor(v):
                continue
            if k == "step" and v.numel() != 1:
                r.fail(f"optimizer_state.state.{pid}.step", v, "a single number")
            if k != "step" and tuple(v.shape) != shape:
                r.fail(f"optimizer_state.state.{pid}.{k}", v, f"a tensor of its parameter's shape {shape}")


def normalise_checkpoint(ckpt: dict, path="<checkpoint>") -> dict:
    """Check every field (checkpoint_rules) and fill in those a reference
    checkpoint lacks (arch, head settings, preprocessing) from its keys and args.
    class_names None: none recorded (numbered names; `class_names_recorded` False)."""
    rules.check_fields(ckpt, path)
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}; this tool reads up to {FORMAT_VERSION}. Update the tool.")
    state = ckpt["model_state"]
    args = ckpt.get("args") or {}
    ckpt = dict(ckpt)
    if ckpt.get("arch") is None:
        ckpt["arch"] = args.get("arch") or infer_arch(state)
    if ckpt["arch"] not in ARCHS:
        raise CheckpointError(f"{path} is a {rules.shown(ckpt['arch'])} model; this tool loads {', '.join(ARCHS)} "
                              f"(its 'arch')")
    outputs = head_out_features(state, path)
    head = dict(ckpt.get("head") or {"num_classes": outputs})
    if head["num_classes"] != outputs:
        rules.Rules(path).fail("head.num_classes", head["num_classes"],
                               f"the number of outputs of the head in model_state ({outputs})")
    if "dropout" not in head:
        has_dropout = any(k.startswith("fc.1.") for k in state)
        saved = args.get("dropout")  # 0.0 is a real value; only a missing one is guessed
        head["dropout"] = float(saved) if saved is not None else (0.5 if has_dropout else 0.0)
        if saved is None and has_dropout:  # the keys say a Dropout is there, not its rate
            head["dropout_guessed"] = True
    ckpt["head"] = head
    names = rules.check_class_names(ckpt.get("class_names"), outputs, path)
    ckpt["class_names_recorded"] = names is not None
    ckpt["class_names"] = names or [f"class_{i}" for i in range(outputs)]
    if ckpt.get("preprocess") is None:
        ckpt["preprocess"] = {"resize": 256, "crop": 224}
    ckpt["history"] = history_rows(ckpt.get("history"))
    return ckpt


def history_rows(history) -> list[dict]:
    """Per-epoch rows. The reference keeps history as a dict of lists
    ({'train_loss': [...], ...}); anything else unreadable becomes []."""
    if isinstance(history, dict):
        columns = {k: v for k, v in history.items() if isinstance(v, (list, tuple))}
        n = min((len(v) for v in columns.values()), default=0)
        return [{"epoch": i + 1, **{k: v[i] for k, v in columns.items() if k != "epoch"}} for i in range(n)]
    if isinstance(history, (list, tuple)):
        return [dict(h) for h in history if isinstance(h, dict)]
    return []


def infer_arch(state: dict) -> str:
    if "conv1.weight" in state and "layer4.0.conv1.weight" in state:
        return "resnet18"
    if "features.0.0.weight" in state:
        return "mobilenet_v2"
    raise CheckpointError("cannot tell the architecture from the state_dict keys; pass {setting}", field="arch")


def head_out_features(state: dict, path="the state_dict") -> int:
    for key in ("fc.weight", "fc.1.weight", "classifier.1.weight"):
        if key in state:
            shape = tuple(state[key].shape)
            if len(shape) != 2 or not 1 <= shape[0] <= MAX_CLASSES:
                rules.Rules(path).fail(f"model_state[{key!r}]", state[key],
                                       f"a 2-d head weight with 1 to {MAX_CLASSES:,} outputs")
            return shape[0]
    raise CheckpointError(f"{path}: no classification head (fc.weight / fc.1.weight / classifier.1.weight) in the "
                          f"state_dict")


def model_from_checkpoint(ckpt: dict, path="the checkpoint") -> nn.Module:
    # Built on the meta device and given the saved tensors: no random init that
    # the weights would overwrite, and torch's global RNG (a training run's
    # dropout in another thread of the app) is left alone.
    with torch.device("meta"):
        model = build_model(ckpt["arch"], ckpt["head"]["num_classes"], ckpt["head"]["dropout"], "none")
    # BatchNorm's num_batches_tracked may be absent (older or hand-made files); torch fills it in.
    wanted = model.state_dict()
    expected, given = ({k for k in keys if not k.endswith("num_batches_tracked")}
                       for keys in (wanted, ckpt["model_state"]))
    if expected != given:  # torch's own message is a list of hundreds of keys
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        try:
            looks = infer_arch(ckpt["model_state"])
        except CheckpointError:
            looks = None
        fix = (f"its keys are {looks}'s: pass {{choice:arch={looks}}}" if looks and looks != ckpt["arch"]
               else "is it a different architecture ({setting:arch})?")
        raise CheckpointError(f"{path} does not fit {ckpt['arch']}: {len(missing)} missing key(s) {few_keys(missing)}, "
                              f"{len(unexpected)} unexpected {few_keys(unexpected)}; {fix}")
    r = rules.Rules(path)
    for k, t in ckpt["model_state"].items():  # model.float() converts floating tensors only
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_complex() or \
                t.is_floating_point() != wanted[k].is_floating_point() or t.dtype == torch.bool:
            r.fail(f"model_state[{k!r}]", t, f"a {'floating-point' if wanted[k].is_floating_point() else 'integer'} "
                                             f"tensor of shape {tuple(wanted[k].shape)}")
    try:
        model.load_state_dict(ckpt["model_state"], assign=True)
    except RuntimeError as e:  # its first line is only "Error(s) in loading state_dict for ResNet:"
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), first_line(e))
        raise CheckpointError(f"{path} does not fit {ckpt['arch']} ({detail[:240]}). "
                              f"Is it a different architecture ({{setting:arch}})?") from None
    return check_weights(model.float().eval(), path)  # float16 weights (someone's export) still run in float32


def check_weights(model: nn.Module, path) -> nn.Module:
    """Refuse NaN/inf weights (they predict p=nan for everything and cannot be
    trained further) and negative BatchNorm variances (the same, through a square root)."""
    for name, t in model.state_dict().items():
        if rules.value_problem(t):
            raise CheckpointError(f"{path} holds NaN or infinite weights in {name} (its run diverged); "
                                  f"use the run's best_acc.pt or best_loss.pt, or an earlier checkpoint")
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._NormBase) and torch.is_tensor(var) and \
                rules.value_problem(var, non_negative=True):
            raise CheckpointError(f"{path} holds a negative BatchNorm variance in {name}.running_var; a variance "
                                  f"is >= 0, so the file is damaged")
    return model


def model_from_state_dict(state: dict, arch: str | None, class_names: list[str] | None, path="<file>"):
    """A bare state_dict: the arch comes from `arch` (or the keys), class names from `class_names`."""
    n = head_out_features(state, path)
    if class_names and len(class_names) != n:
        raise CheckpointError(f"{{setting}} lists {len(class_names)} names but {path} has {n} outputs", field="classes")
    ckpt = normalise_checkpoint({"model_state": state, "arch": arch or infer_arch(state), "class_names": class_names}, path)
    return model_from_checkpoint(ckpt, path), ckpt["class_names"]


# ---------------------------------------------------------------- exports (the other formats the reference teaches)

def export_state_dict(model: nn.Module, path) -> Path:
    """Weights only. To load you must rebuild the same architecture yourself."""
    return atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, crc=True)


def export_full_model(model: nn.Module, class_names: list[str], path) -> Path:
    """The whole pickled module: brittle (tied to this code and torch version) and
    unsafe to load from strangers. Kept because the reference teaches it."""
    model = model.cpu().eval()
    model.class_names = list(class_names)
    return atomic_torch_save(model, path, crc=True)
