"""Continuing a run from its checkpoint: which settings it keeps (and which
may not change), where it continues (its own folder only when that provably
holds this run), and the state it carries on with (best results, optimizer).
The CLI's --resume and the app's "continue" both come through here."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import torch

from . import checkpoint as ck
from .config import AUTO_AUGMENT, TrainConfig, policy_from_flags
from .errors import CheckpointError, ConfigError
from .fileio import atomic_link_or_copy, peek
from .run_folder import new_run_dir, recover_run_folder


# A resumed run continues the same run: these settings come from its checkpoint
# unless given again (arch, policy, dropout and the data pipeline always do,
# see read_resume). The device is this machine's business.
RESUMED_SETTINGS = ("data_dir", "epochs", "batch_size", "lr", "weight_decay", "amp", "num_workers", "cache",
                    "cache_budget_mb", "export_state_dict", "export_full_model", "run_name")


def resumed_settings(saved_args: dict, given: set[str], current: TrainConfig) -> dict:
    """The saved run's RESUMED_SETTINGS not in `given`, where they differ from
    `current`, converted to current's types (a reference checkpoint's args may
    hold ints for flags)."""
    out = {}
    for name in RESUMED_SETTINGS:
        if name in given or saved_args.get(name) is None:
            continue
        now = getattr(current, name)
        value = as_type_of(now, saved_args[name])
        if value is not None and value != now:
            out[name] = value
    return out


def as_type_of(now, value):
    """`value` as the type of `now`, or None where that would guess (e.g. 7.9
    for an int, the string 'False' for a bool)."""
    if isinstance(now, bool):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        return {"true": True, "false": False}.get(str(value).strip().lower())
    if isinstance(now, int):
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value) else None
    if isinstance(now, float):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return value if isinstance(value, str) and value else None


def continue_saved_run(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, list[str], dict]:
    """cfg with the saved run's settings where none were typed again, notes saying
    which, and the checkpoint (read once: the engine takes it from here)."""
    cfg.validate()  # what was typed is checked as typed
    ckpt = ck.read_checkpoint(cfg.resume)  # its errors are the ones the engine would give
    saved = ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}
    refuse_changed_run_settings(cfg, ckpt, given)
    refuse_typed_weights(cfg, ckpt, given)
    run_folder = Path(cfg.resume).expanduser().resolve().parent
    if "output_dir" not in given and (run_folder / "args.json").is_file():
        cfg.output_dir = str(run_folder.parent)  # a new folder (resume_run_dir) goes beside the run's
    restored = resumed_settings(saved, given, cfg)
    notes = []
    if "data_dir" in given and isinstance(saved.get("data_dir"), str) and \
            Path(saved["data_dir"]).expanduser().absolute() != Path(cfg.data_dir).expanduser().absolute():
        notes.append(f"{{setting:resume}}: training on {cfg.data_dir}; the saved run trained on {saved['data_dir']}")
    if not restored:
        return cfg, notes, ckpt
    if "data_dir" in restored and not Path(restored["data_dir"]).expanduser().is_dir():
        raise ConfigError(f"{{setting:resume}}: the saved run's data folder {restored['data_dir']} does not exist "
                          f"here; pass {{setting}}", field="data_dir", value=restored["data_dir"])
    try:
        cfg = dataclasses.replace(cfg, **restored).validate()
    except ConfigError as e:
        raise ConfigError(f"{{setting:resume}}: the saved run's settings are not usable ({e.template}); give that "
                          f"flag again", field=e.field, value=e.value, allowed=e.allowed) from None
    return cfg, notes + ["{setting:resume}: continuing the run's " + ", ".join(f"{k}={v}" for k, v in restored.items())
                         + " (give a flag again to change it)"], ckpt


# What a resumed run keeps from its checkpoint whatever is typed (the optimizer
# state and the data pipeline depend on them; see read_resume).
FIXED_ON_RESUME = ("arch", "policy", "dropout", "seed", "augment", "val_split")


def refuse_changed_run_settings(cfg: TrainConfig, ckpt: dict, given: set[str]) -> None:
    """A flag typed with --resume that would change one of FIXED_ON_RESUME is an
    error, not a NOTE: silently training with the saved value contradicts what
    was typed. Compared with what read_resume would keep."""
    freeze_flags = {"freeze_backbone", "unfreeze_last", "unfreeze_all"}
    typed = set(given) | ({"policy"} if given & freeze_flags else set())
    saved = fixed_run_settings(ckpt)
    for name in FIXED_ON_RESUME:
        if name not in typed or name not in saved or saved[name] is None and name != "val_split":
            continue
        now, was = getattr(cfg, name), saved[name]
        if name == "augment":  # 'auto' and what it resolves to under the saved policy are the same run
            now, was = (AUTO_AUGMENT.get(saved.get("policy") or cfg.policy, a) if a == "auto" else a for a in (now, was))
        if (None if was is None else as_type_of(now, was)) != now:
            flag, short = "{setting}", "{setting}"
            if name == "policy" and "policy" not in given:
                short = "the freeze flags"
                flag = (short + " ({setting:freeze_backbone}/{setting:unfreeze_last}/{setting:unfreeze_all}), "
                        "i.e. {setting}")
            kept = ", ".join(f"{{setting:{n}}}" for n in FIXED_ON_RESUME)
            raise ConfigError(f"{flag} {now} cannot change on {{setting:resume}}: the saved run used {was}, and a "
                              f"resumed run keeps its {kept}. Leave {short} out to continue it, or start a new run "
                              f"(without {{setting:resume}}) to train with {now}", field=name, value=now, allowed=was)


def refuse_typed_weights(cfg: TrainConfig, ckpt: dict, given: set[str]) -> None:
    """--weights chooses where a new run starts; a resumed run continues from the
    weights in its checkpoint. A typed --weights other than the one the run
    started from would be ignored: an error instead, saying so."""
    if "weights" not in given:
        return
    args = ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}
    started = str(ckpt.get("weights") or args.get("weights") or "")

    def key(w: str):  # torchvision's names for ImageNet weights are 'imagenet' here; paths compared resolved
        w = w.strip()
        if w.lower() in ("imagenet", "none") or w.upper().startswith("IMAGENET1K_") or w.upper() == "DEFAULT":
            return "none" if w.lower() == "none" else "imagenet"
        return Path(w).expanduser().resolve()
    if started and key(started) == key(str(cfg.weights)):
        return
    raise ConfigError(f"{{setting}} {cfg.weights} cannot be used with {{setting:resume}}: a resumed run continues "
                      f"from the weights saved in {cfg.resume}" + (f" (the run started from {started})" if started
                                                                    else "") +
                      f". Leave {{setting}} out to resume, or start a new run (without {{setting:resume}}) to train "
                      f"from {cfg.weights}", field="weights", value=cfg.weights)


def resume_run_dir(cfg: TrainConfig, resume: dict) -> tuple[Path, bool, str | None]:
    """(folder, is_new, note). A resumed run continues in its checkpoint's folder
    only when that folder provably holds this run and nothing past it (see
    folder_verdict): the next save replaces latest.pt, the best files and
    metrics.csv there. Otherwise it goes to a new folder under cfg.output_dir
    and `note` says why."""
    source = Path(cfg.resume).resolve()
    folder = source.parent
    verdict, detail = folder_verdict(folder, source, resume)
    if verdict == "same":
        recover_run_folder(folder, resume, source=source)
        return folder, False, None
    new = new_run_dir(cfg.output_dir, cfg.run_name)
    carry_best_files(resume, source, new, from_folder=verdict == "later")
    epoch = int(resume["epoch"])
    if verdict == "later":
        return new, True, f"{{setting:resume}}: {folder / detail} is past epoch {epoch}; continuing in a new folder so its later " \
                          f"epochs are kept"
    if verdict == "no run":
        return new, True, f"{{setting:resume}}: {folder} is not a run folder ({detail}); continuing in a new folder so nothing " \
                          f"there is overwritten"
    return new, True, f"{{setting:resume}}: {folder} holds another run ({detail}); continuing in a new folder so its files are kept"


# A run, for telling whether a folder holds it: the settings no resume can
# change (fixed_run_settings), and its per-epoch validation history.
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def folder_verdict(folder: Path, source: Path, ckpt: dict) -> tuple[str, str]:
    """Whether `folder` (where checkpoint `source` = `ckpt` lies) is that run's:
    - ("same", ""): its args.json holds the checkpoint's fixed settings (arch,
      policy, dropout, seed, augment, val-split, input sizes); every row of its
      metrics.csv, and the history in each of its latest.pt / best_acc.pt /
      best_loss.pt (besides `source` itself), equals the checkpoint's history
      for that epoch (same losses, accuracies and lr); those files hold its
      class names; and none of them goes past the checkpoint's epoch.
    - ("later", file name): all that, except that a file goes further (resuming
      best_acc.pt or an older copy): the same run, whose later epochs the next
      save would overwrite.
    - ("no run", reason): no readable args.json (a downloads folder, say).
    - ("other", reason): anything else, e.g. another run's files."""
    try:
        args = json.loads((folder / "args.json").read_text())
    except FileNotFoundError:
        return "no run", "it has no args.json"
    except (OSError, ValueError):
        return "no run", "its args.json cannot be read"
    if not isinstance(args, dict):
        return "no run", "its args.json is not a run's settings"
    mine = fixed_run_settings(ckpt)
    theirs = fixed_run_settings({"args": args, "arch": args.get("arch"), "policy": args.get("policy"),
                                 "head": {"dropout": args.get("dropout")}})
    for name, value in mine.items():
        if value is not None and not same_value(theirs.get(name), value):
            return "other", f"its args.json has {name}={theirs.get(name)}, the checkpoint {name}={value}"
    epoch, rows = int(ckpt["epoch"]), {h.get("epoch"): h for h in ckpt.get("history") or []}
    later = []  # files of this run that go past the checkpoint
    try:
        with open(folder / "metrics.csv", newline="") as f:
            csv_rows = list(csv.DictReader(f))
    except FileNotFoundError:
        csv_rows = []
    except (OSError, ValueError, csv.Error):
        return "other", "its metrics.csv cannot be read"
    e = history_mismatch(csv_rows, rows, epoch)
    if e == "later":
        later.append("metrics.csv")
    elif e:
        return "other", f"its metrics.csv {e}"
    seen = {_inode(source)}
    for name in ("latest.pt", "best_acc.pt", "best_loss.pt"):
        path = folder / name
        if not path.is_file() or _inode(path) in seen:  # (is_file: a pipe named so is never opened)
            continue
        seen.add(_inode(path))
        saved = peek(path)
        if type(saved.get("epoch")) is not int:
            return "other", f"its {name} is not a checkpoint this tool can read"
        names = saved.get("class_names")
        if names is not None and (not isinstance(names, (list, tuple)) or list(names) != list(ckpt["class_names"])):
            return "other", f"its {name} has other classes"
        e = history_mismatch(ck.history_rows(saved.get("history")), rows, epoch)
        if e and e != "later":
            return "other", f"its {name} {e}"
        if e == "later" or saved["epoch"] > epoch:
            later.append(name)
    if later:
        return "later", "latest.pt" if "latest.pt" in later else later[0]
    return "same", ""


def history_mismatch(their_rows: list[dict], mine: dict, epoch: int) -> str | None:
    """None when each of `their_rows` equals `mine` (epoch -> row, the checkpoint's
    history up to `epoch`) on HISTORY_KEYS; "later" for a row past `epoch`; else
    what differs."""
    for row in their_rows:
        try:
            e = int(float(row.get("epoch")))
        except (TypeError, ValueError, OverflowError):
            return "has a row without an epoch number"
        if e > epoch:
            return "later"
        if e not in mine:
            return f"has epoch {e}, which the checkpoint's history lacks"
        for key in HISTORY_KEYS:
            if key in row and key in mine[e] and not same_value(row[key], mine[e][key]):
                return f"differs from the checkpoint's history at epoch {e} ({key})"
    return None


def same_value(a, b) -> bool:
    """Equal as numbers where both read as numbers (a CSV cell '0.5' and 0.5;
    NaN equals NaN), else as they are."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return x == y or (math.isnan(x) and math.isnan(y))


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def carry_best_files(resume: dict, source: Path, run_dir: Path, from_folder: bool = True) -> None:
    """A run continued in a new folder starts with its best files: later epochs
    only replace them when they do better. Each is the source checkpoint or
    (from_folder: the old folder is this run's) that folder's file of that name,
    whichever holds the epoch the checkpoint calls best (hard links, so nothing
    is written twice)."""
    for name, key in (("best_acc.pt", "best_epoch"), ("best_loss.pt", "best_loss_epoch")):
        want = int(resume.get(key) or 0)
        if want and want == int(resume["epoch"]):  # the resumed file is itself that best epoch
            atomic_link_or_copy(source, run_dir / name)
        elif from_folder and want and (source.parent / name).is_file() and ck.saved_epoch(source.parent / name) == want:
            atomic_link_or_copy(source.parent / name, run_dir / name)


def fixed_run_settings(ckpt: dict) -> dict:
    """What a resumed run keeps from its (normalised) checkpoint, whatever is
    asked: the model and policy the optimizer state belongs to, and the data
    pipeline (or a --val-split hold-out would change). None: not recorded."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    policy = ckpt.get("policy") or args.get("policy")
    flags = ("freeze_backbone", "unfreeze_last", "unfreeze_all")
    if not policy and any(f in args for f in flags):  # the reference records its three 0/1 flags
        policy = policy_from_flags(*(int(args.get(f, d)) for f, d in zip(flags, (1, 0, 0))))
    # A guessed dropout rate (a reference head with a Dropout but no recorded rate) is not held to.
    head = ckpt["head"]
    dropout = None if head.get("dropout_guessed") or head.get("dropout") is None else float(head["dropout"])
    saved = {"arch": ckpt.get("arch"), "policy": policy, "dropout": dropout}
    saved.update({k: args[k] for k in ("seed", "val_split", "augment", "image_size", "resize_size") if k in args})
    return saved


def read_resume(cfg: TrainConfig, ckpt: dict | None = None) -> tuple[dict, list[str]]:
    """The checkpoint to resume (read from cfg.resume unless given), with cfg's
    arch/policy/dropout set to the checkpoint's (they must match to restore the
    optimizer state)."""
    ckpt = ckpt if ckpt is not None else ck.read_checkpoint(cfg.resume)
    if int(ckpt["epoch"]) >= cfg.epochs:
        raise ConfigError(f"{cfg.resume} already finished epoch {ckpt['epoch']}; pass a larger {{setting}} "
                          f"(the new total, e.g. {{choice:epochs={int(ckpt['epoch']) + 10}}}) to train further",
                          field="epochs", value=cfg.epochs, allowed=(int(ckpt["epoch"]) + 1, 10000))
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    notes = []
    for name, value in fixed_run_settings(ckpt).items():
        if value is not None and getattr(cfg, name) != value:
            notes.append(f"{{setting:resume}}: continuing with the checkpoint's {name}={value}")
            setattr(cfg, name, value)
    if ckpt["head"].get("dropout_guessed") and not cfg.dropout:  # the head has a Dropout layer: some rate is needed
        cfg.dropout = float(ckpt["head"]["dropout"])
        notes.append(f"{{setting:resume}}: the checkpoint's head has a Dropout of unrecorded rate; using "
                     f"{cfg.dropout} (give {{setting:dropout}} to choose)")
    # The weights were loaded when the run began; keep recording where they came from.
    cfg.weights = str(ckpt.get("weights") or args.get("weights") or cfg.weights)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{cfg.resume} holds settings this tool cannot use: {e.template}", field="resume",
                              value=cfg.resume) from None
    return ckpt, notes


def restore_optimizer(optimizer: torch.optim.AdamW, saved: dict, cfg: TrainConfig) -> None:
    """Load a checkpoint's optimizer state into this run's optimizer, keeping
    this run's lr, weight decay and kernel choice."""
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {cfg.resume} does not fit this model/policy: {e}") from None
    fused = optimizer.defaults["fused"]
    for g in optimizer.param_groups:  # loading copied the saved run's settings; this run's apply
        g.update(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused, foreach=optimizer.defaults["foreach"])
    for p, st in optimizer.state.items():  # fused kernels want the step count beside the weights
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].to(p.device if fused else "cpu", torch.float32)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            # ...and the moments in the weights' memory layout, which differs when the run was saved on
            # another device or by an older version (see memory_formats): no per-step copies, and CUDA's
            # fused kernel requires equal strides.
            if torch.is_tensor(st.get(k)) and st[k].stride() != p.stride():
                st[k] = torch.empty_like(p).copy_(st[k])
