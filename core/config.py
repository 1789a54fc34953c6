"""Typed, validated configuration shared by the CLI and the app.

Both front ends turn their inputs into a TrainConfig and call `validate()`;
the engine never sees an unchecked value."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

ARCHS = ("resnet18", "mobilenet_v2")
POLICIES = ("head", "last", "full")
AUGMENTS = ("auto", "none", "light", "standard")
DEVICES = ("auto", "cpu", "cuda", "mps")
CACHE_MODES = ("auto", "off")
MAX_CLASSES = 10_000  # past this a new head alone needs gigabytes; no folder-of-images task has so many
MIN_SIDE, MAX_SIDE = 32, 1024  # image sides in pixels: 1024 is ~21x the pixels of the usual 224 crop
MAX_SEED = 2**32 - 1  # numpy's range, within torch's; the engine derives per-epoch seeds from it


# Default augmentation per policy (see core/features.py for the cache):
# - head: none. A frozen backbone's features then never change, so the
#   backbone runs exactly once per image; a flipped view would double that
#   one-off cost for no measured accuracy gain (bench/RESULTS.md).
# - last: light (flip-only, cached as two views): layer4 has millions of
#   weights to fit, so the extra view is worth its cost.
# - full: the reference's random crops + flips (nothing can be cached).
AUTO_AUGMENT = {"head": "none", "last": "light", "full": "standard"}


def policy_from_flags(freeze_backbone: int, unfreeze_last: int, unfreeze_all: int) -> str:
    """Map the reference's three 0/1 flags onto a policy name."""
    if unfreeze_all or not freeze_backbone:
        return "full"
    if unfreeze_last:
        return "last"
    return "head"


@dataclass
class TrainConfig:
    data_dir: str = "data"
    arch: str = "resnet18"
    weights: str = "imagenet"  # "imagenet", "none" or a path to a state_dict
    policy: str = "head"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.0
    augment: str = "auto"  # see AUTO_AUGMENT
    seed: int = 1337
    device: str = "auto"
    num_workers: int = 0
    amp: bool = False
    val_split: float | None = None  # used only when DIR/val/ is missing
    output_dir: str = "checkpoints"
    run_name: str = "resnet18"
    resume: str | None = None
    export_state_dict: bool = False
    export_full_model: bool = False
    cache: str = "auto"  # frozen-prefix feature cache: "auto" uses it when exact
    cache_budget_mb: int = 1024
    image_size: int = 224
    resize_size: int = 256
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the UI that started it)

    def validate(self) -> "TrainConfig":
        def need(cond, name, msg, allowed=None):
            if not cond:
                raise ConfigError(msg, field=name, value=getattr(self, name), allowed=allowed)

        if str(self.weights).strip().lower() in ("imagenet", "none"):  # --weights None / IMAGENET mean the keywords
            self.weights = str(self.weights).strip().lower()
        for name in ("arch", "policy", "augment", "device", "cache"):  # keywords in any case: --arch ResNet18, --device CPU
            if isinstance(getattr(self, name), str):
                setattr(self, name, getattr(self, name).strip().lower())
        w = str(self.weights)
        # (a resumed run records where its weights came from, e.g. the reference's 'IMAGENET1K_V1')
        need(self.resume or w in ("imagenet", "none") or any(c in w for c in "/\\.") or Path(w).expanduser().exists(),
             "weights", f"{{setting}} {w!r} is not valid; choose imagenet, none, or the path of a state_dict file (.pth)",
             ("imagenet", "none", "a .pth path"))
        need(self.arch in ARCHS, "arch", f"{{setting}} {self.arch!r} is not supported; choose one of {', '.join(ARCHS)}",
             ARCHS)
        need(self.policy in POLICIES, "policy", f"{{setting}} {self.policy!r} is not valid; choose head, last or full",
             POLICIES)
        need(self.augment in AUGMENTS, "augment",
             f"{{setting}} {self.augment!r} is not valid; choose {', '.join(AUGMENTS)}", AUGMENTS)
        need(self.device in DEVICES, "device", f"{{setting}} {self.device!r} is not valid; choose {', '.join(DEVICES)}",
             DEVICES)
        need(self.cache in CACHE_MODES, "cache", f"{{setting}} {self.cache!r} is not valid; choose auto or off",
             CACHE_MODES)
        need(isinstance(self.epochs, int) and 1 <= self.epochs <= 10000, "epochs",
             f"{{setting}} must be an integer from 1 to 10000 (got {self.epochs})", (1, 10000))
        need(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 4096, "batch_size",
             f"{{setting}} must be an integer from 1 to 4096 (got {self.batch_size})", (1, 4096))
        need(_finite(self.lr) and 0 < self.lr <= 100, "lr", f"{{setting}} must be a number > 0 and <= 100 (got {self.lr})",
             ("> 0", 100))
        need(_finite(self.weight_decay) and 0 <= self.weight_decay <= 10, "weight_decay",
             f"{{setting}} must be between 0 and 10 (got {self.weight_decay})", (0, 10))
        need(_finite(self.dropout) and 0 <= self.dropout < 1, "dropout",
             f"{{setting}} must be in [0, 1) (got {self.dropout})", (0, "< 1"))
        need(isinstance(self.num_workers, int) and 0 <= self.num_workers <= 64, "num_workers",
             f"{{setting}} must be 0..64 (got {self.num_workers})", (0, 64))
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED, "seed",
             f"{{setting}} must be a whole number from 0 to {MAX_SEED} (got {self.seed})", (0, MAX_SEED))
        check_val_split(self.val_split)
        need(isinstance(self.cache_budget_mb, int) and self.cache_budget_mb >= 0, "cache_budget_mb",
             "{setting} must be >= 0", (0, None))
        # capped like a checkpoint's preprocess (checkpoint_rules): a run must be able to predict with its own files
        need(MIN_SIDE <= self.image_size <= self.resize_size <= MAX_SIDE, "image_size",
             f"{{setting}} must be >= {MIN_SIDE} and <= resize size, which must be <= {MAX_SIDE}",
             (MIN_SIDE, min(self.resize_size, MAX_SIDE)))
        need(bool(self.run_name) and all(c.isalnum() or c in "-_." for c in self.run_name), "run_name",
             f"{{setting}} {self.run_name!r} may only contain letters, digits, '-', '_' and '.'")
        need(bool(str(self.data_dir).strip()), "data_dir", "{setting} must not be empty")
        need(bool(str(self.output_dir).strip()), "output_dir", "{setting} must not be empty: give the folder that run "
             "folders go into (default: checkpoints)")
        return self

    @property
    def effective_augment(self) -> str:
        return AUTO_AUGMENT[self.policy] if self.augment == "auto" else self.augment

    def to_dict(self) -> dict:
        """Plain types only, so it can live inside a weights_only checkpoint."""
        d = dataclasses.asdict(self)
        # absolute (a resume from another folder finds it) and without ../ (normpath, as the shell shows it)
        d["data_dir"] = os.path.abspath(Path(self.data_dir).expanduser())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_val_split(value) -> None:
    """None (keep val/) or a fraction strictly between 0 and 1."""
    if not (value is None or (_finite(value) and 0 < value < 1)):
        raise ConfigError(f"{{setting}} must be a fraction between 0 and 1, e.g. 0.2 (got {value})",
                          field="val_split", value=value, allowed=(0, 1))


def _finite(x) -> bool:
    try:
        return float(x) == float(x) and abs(float(x)) != float("inf")
    except (TypeError, ValueError):
        return False
