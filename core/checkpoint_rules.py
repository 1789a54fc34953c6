"""What each field of a checkpoint dict may hold. A checkpoint may come from
anyone (an upload to the app, a file from a forum): every field is checked
before it is used, and a refusal names the field, what it held and what is
allowed, e.g. `x.pt: preprocess.resize is 20000; allowed: an integer from 32
to 1024`. Absent optional fields stay absent (reference checkpoints lack most)."""
from __future__ import annotations

import math

import torch

from .config import MAX_CLASSES, MAX_SIDE, MIN_SIDE, POLICIES
from .errors import CheckpointError

# Image sides a checkpoint may ask prediction to resize and crop to. 1024 is
# 4.6x the usual 224 crop (21x its pixels, ~1/2 GB of ResNet-18 activations
# per image, so prediction batches shrink to match); 20000 would be 2.5 GB.
MAX_EPOCH = 10_000  # --epochs allows at most this
MAX_NAME_CHARS = 1000  # a class name is a folder name (<= 255 bytes); room for names from elsewhere
MAX_INT = 2**63  # larger ints are no count or setting, and 10**5000 cannot even be printed
MAX_TEMPERATURE = 100.0
MAX_NODES = 200_000  # values visited in args/history: a pickle can share one list 2**100 times over
REAL = "a number"


def shown(value) -> str:
    """A value as a message may quote it: short, and never failing (a 5000-digit int cannot be str()-ed)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**18 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"a {type(value).__name__}"


class Rules:
    """Checks for one file; `fail` raises the CheckpointError."""

    def __init__(self, path):
        self.path = path

    def fail(self, field: str, value, allowed: str):
        raise CheckpointError(f"{self.path}: {field} is {shown(value)}; allowed: {allowed}")

    def int_(self, field, value, lo, hi, extra=""):
        if type(value) is not int or not lo <= value <= hi:
            self.fail(field, value, f"an integer from {lo:,} to {hi:,}{extra}")
        return value

    def real(self, field, value, lo=-math.inf, hi=math.inf, what=None, inf_ok=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not (
            isinstance(value, int) and abs(value) > MAX_INT)
        if ok:
            v = float(value)
            ok = not math.isnan(v) and (inf_ok or math.isfinite(v)) and lo <= v <= hi
        if not ok:
            self.fail(field, value, what or f"a number from {lo} to {hi}")
        return float(value)

    def str_(self, field, value, choices=None):
        if not isinstance(value, str) or (choices and value not in choices):
            self.fail(field, value, " or ".join(map(repr, choices)) if choices else "a string")
        return value

    def dict_(self, field, value):
        if not isinstance(value, dict):
            self.fail(field, value, "a dict")
        return value

    def plain(self, field, value, budget: list[int], depth: int = 0, finite: bool = True):
        """None, bool, bounded int, float (finite unless not `finite`), str, and
        lists/tuples/dicts (str keys) of those, a few levels deep."""
        budget[0] -= 1
        if budget[0] < 0:
            self.fail(field, value, f"plain values, at most {MAX_NODES:,} of them")
        if value is None or isinstance(value, (bool, str)):
            return
        if isinstance(value, int):
            if abs(value) > MAX_INT:
                self.fail(field, value, f"integers of at most {MAX_INT.bit_length() - 1} bits")
            return
        if isinstance(value, float):
            if finite and not math.isfinite(value):
                self.fail(field, value, "finite numbers")
            return
        if depth < 4 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.plain(f"{field}[{i}]", v, budget, depth + 1, finite)
            return
        if depth < 4 and isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    self.fail(f"{field} key", k, "strings")
                self.plain(f"{field}.{k}", v, budget, depth + 1, finite)
            return
        self.fail(field, value, "None, true/false, numbers, strings, and lists or dicts of them")


def check_fields(ckpt: dict, path) -> None:
    """Types and ranges of a checkpoint dict's own fields (those present);
    the model state is checked against the model when it is built."""
    r = Rules(path)
    state = ckpt.get("model_state")
    if not isinstance(state, dict) or not state:
        r.fail("model_state", state, "a non-empty dict of tensors")
    for k, v in state.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            r.fail(f"model_state[{shown(k)}]", v, "a tensor under a string key")
    if "format_version" in ckpt:
        r.int_("format_version", ckpt["format_version"], 0, MAX_INT)
    epoch = None
    if ckpt.get("epoch") is not None:
        epoch = r.int_("epoch", ckpt["epoch"], 0, MAX_EPOCH)
    for key in ("best_epoch", "best_loss_epoch"):
        if ckpt.get(key) is not None:
            r.int_(key, ckpt[key], 0, MAX_EPOCH if epoch is None else epoch,
                   "" if epoch is None else f" (the checkpoint's epoch)")
    if ckpt.get("best_val_acc") is not None:
        r.real("best_val_acc", ckpt["best_val_acc"], 0.0, 1.0, "an accuracy from 0 to 1")
    if ckpt.get("best_val_loss") is not None:
        r.real("best_val_loss", ckpt["best_val_loss"], 0.0, math.inf, "a loss >= 0 (inf before any epoch)", inf_ok=True)
    for key in ("weights", "arch"):
        if ckpt.get(key) is not None:
            r.str_(key, ckpt[key])
    if ckpt.get("policy") is not None:
        r.str_("policy", ckpt["policy"], POLICIES)
    if ckpt.get("args") is not None:
        check_args(r, r.dict_("args", ckpt["args"]))
    if ckpt.get("history") is not None:
        check_history(r, ckpt["history"])
    if ckpt.get("head") is not None:
        head = r.dict_("head", ckpt["head"])
        r.int_("head.num_classes", head.get("num_classes"), 1, MAX_CLASSES)
        r.real("head.dropout", head.get("dropout", 0.0), 0.0, 0.999, "a dropout rate from 0 to below 1")
    if ckpt.get("preprocess") is not None:
        check_preprocess(r, ckpt["preprocess"])
    if "temperature" in ckpt:
        r.real("temperature", ckpt["temperature"], 1e-3, MAX_TEMPERATURE, f"a number above 0, at most {MAX_TEMPERATURE:g}")
    if ckpt.get("data_files") is not None:
        files = r.dict_("data_files", ckpt["data_files"])
        r.int_("data_files.images", files.get("images"), 0, MAX_INT)
        sha = r.str_("data_files.sha256", files.get("sha256"))
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            r.fail("data_files.sha256", sha, "64 lowercase hex digits")
    for key in ("optimizer_state", "scaler_state"):
        if ckpt.get(key) is not None:
            r.dict_(key, ckpt[key])


def check_args(r: Rules, args: dict) -> None:
    """The saved run's settings: plain values (a resume reads them into its
    config), and the ones this module uses itself in range."""
    r.plain("args", args, [MAX_NODES])
    if args.get("dropout") is not None:
        r.real("args.dropout", args["dropout"], 0.0, 0.999, "a dropout rate from 0 to below 1")
    for key in ("arch", "policy", "weights", "data_dir"):
        if args.get(key) is not None:
            r.str_(f"args.{key}", args[key])
    for key in ("freeze_backbone", "unfreeze_last", "unfreeze_all"):  # the reference's 0/1 flags
        if key in args and args[key] not in (0, 1):
            r.fail(f"args.{key}", args[key], "0 or 1")
    for key in ("image_size", "resize_size"):
        if args.get(key) is not None:
            r.int_(f"args.{key}", args[key], MIN_SIDE, MAX_SIDE)


HISTORY_NUMBERS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def check_history(r: Rules, history) -> None:
    """Rows of numbers per epoch (a list of dicts, or the reference's dict of lists);
    a diverged epoch may hold NaN, so only numbers' types are checked."""
    if isinstance(history, dict):
        for k, col in history.items():
            if not isinstance(col, (list, tuple)):
                r.fail(f"history.{k}", col, "a list of numbers per epoch")
        rows = [dict(zip(history, values)) for values in zip(*history.values())]
    elif isinstance(history, (list, tuple)):
        rows = history
    else:
        r.fail("history", history, "a list of per-epoch dicts")
    r.plain("history", list(rows), [MAX_NODES], finite=False)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            r.fail(f"history[{i}]", row, "a dict of the epoch's numbers")
        if "epoch" in row:
            r.int_(f"history[{i}].epoch", row["epoch"], 0, MAX_EPOCH)
        for k in HISTORY_NUMBERS:
            if row.get(k) is not None:
                r.real(f"history[{i}].{k}", row[k], what="a number", inf_ok=True)


def check_preprocess(r: Rules, pre) -> tuple[int, int]:
    pre = r.dict_("preprocess", pre)
    resize = r.int_("preprocess.resize", pre.get("resize"), MIN_SIDE, MAX_SIDE)
    r.int_("preprocess.crop", pre.get("crop"), MIN_SIDE, resize, " (at most preprocess.resize)")
    for key in ("mean", "std"):
        v = pre.get(key)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            r.fail(f"preprocess.{key}", v, "3 numbers (red, green, blue)")
        for x in v:
            r.real(f"preprocess.{key}", x, 1e-6 if key == "std" else -10.0, 10.0)
    return resize, pre["crop"]


def check_class_names(names, n: int | None, path, field: str = "class_names") -> list[str] | None:
    """A list of unique non-empty strings, `n` of them (the head's outputs);
    None when none are recorded (None or an empty list)."""
    r = Rules(path)
    if names is None or (isinstance(names, (list, tuple)) and not names):
        return None
    if not isinstance(names, (list, tuple)):
        r.fail(field, names, "a list of class-name strings")
    if len(names) > MAX_CLASSES:
        r.fail(field, names, f"at most {MAX_CLASSES:,} names")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or "\x00" in name or len(name) > MAX_NAME_CHARS:
            r.fail(f"{field}[{i}]", name, f"a non-empty string of at most {MAX_NAME_CHARS} characters")
    if len(set(names)) != len(names):
        seen, dup = set(), None
        for name in names:
            if name in seen:
                dup = name
                break
            seen.add(name)
        r.fail(field, names, f"each name once ({shown(dup)} is there twice)")
    if n is not None and len(names) != n:
        plural = "s" if len(names) != 1 else ""
        raise CheckpointError(f"{field} lists {len(names)} name{plural} but {path} has {n} outputs "
                              f"(allowed: one name per output of the model's head)")
    return list(names)


def check_training_state(ckpt: dict, path) -> None:
    """What a resume reads besides the model: the optimizer's and the loss
    scaler's state, finite and of the structure torch loads."""
    r = Rules(path)
    opt = ckpt.get("optimizer_state")
    if opt is not None:
        state, groups = opt.get("state"), opt.get("param_groups")
        if not isinstance(state, dict):
            r.fail("optimizer_state.state", state, "a dict of per-parameter state")
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            r.fail("optimizer_state.param_groups", groups, "a list of dicts")
        for i, g in enumerate(groups):
            params = g.get("params")
            if not isinstance(params, list) or not all(type(p) is int for p in params):
                r.fail(f"optimizer_state.param_groups[{i}].params", params, "a list of parameter numbers")
            for k, v in g.items():
                if k != "params":
                    r.plain(f"optimizer_state.param_groups[{i}].{k}", v, [1000])
            if "eps" in g:
                r.real(f"optimizer_state.param_groups[{i}].eps", g["eps"], 1e-30, 1.0, "a small number above 0")
            if "betas" in g:
                betas = g["betas"]
                if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                    r.fail(f"optimizer_state.param_groups[{i}].betas", betas, "2 numbers from 0 to below 1")
                for b in betas:
                    r.real(f"optimizer_state.param_groups[{i}].betas", b, 0.0, 0.999999, "2 numbers from 0 to below 1")
        for pid, st in state.items():
            if type(pid) is not int or not isinstance(st, dict):
                r.fail(f"optimizer_state.state[{shown(pid)}]", st, "a dict under a parameter number")
            for k, v in st.items():
                field = f"optimizer_state.state.{pid}.{k}"
                if torch.is_tensor(v):
                    check_tensor(r, field, v, non_negative=k in ("exp_avg_sq", "max_exp_avg_sq", "step"))
                else:
                    r.real(field, v, what="a tensor or a finite number")
    scaler = ckpt.get("scaler_state")
    if scaler is not None:
        for k, v in scaler.items():
            if torch.is_tensor(v):
                check_tensor(r, f"scaler_state.{k}", v)
            else:
                r.real(f"scaler_state.{k}", v, what="a finite number")
        if "scale" in scaler and not torch.is_tensor(scaler["scale"]):
            r.real("scaler_state.scale", scaler["scale"], 1e-30, 1e38, "a loss scale above 0")


def value_problem(t: torch.Tensor, non_negative: bool = False) -> str | None:
    """'NaN or infinite' / 'negative' when `t` holds such values, else None.
    One min/max pass without temporaries (NaN propagates into both): ~15x
    faster than isfinite().all(), which matters for 100 MB of optimizer state."""
    if not t.numel() or not (t.is_floating_point() or non_negative):
        return None
    low, high = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        return "NaN or infinite"
    return "negative" if non_negative and low < 0 else None


def check_tensor(r: Rules, field: str, t: torch.Tensor, non_negative: bool = False) -> None:
    if t.layout != torch.strided or t.device.type != "cpu" or t.is_complex():
        r.fail(field, t, "a dense real tensor with data")
    problem = value_problem(t, non_negative)
    if problem == "negative":
        raise CheckpointError(f"{r.path}: {field} holds negative values; it cannot (the file is damaged)")
    if problem:
        raise CheckpointError(f"{r.path}: {field} holds NaN or infinite values (its run diverged, or the file is "
                              f"damaged); use an earlier checkpoint")
