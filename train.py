"""Train a transfer-learning classifier (ResNet-18 by default).

    python train.py --data-dir data --device cpu --epochs 10 --batch-size 16 --lr 0.001 \
        --weight-decay 0.0001 --freeze-backbone 1 --unfreeze-last 0 --unfreeze-all 0 \
        --seed 1337 --num-workers 0 --amp 0

Flags and output lines match the reference chapter's train.py; the extra flags
(--policy, --arch, --weights, --augment, --resume, ...) are documented in README."""
from __future__ import annotations

import argparse
import dataclasses

from cli.common import ArgumentParser, bool01, exit_fast, run_cli
from core.config import MAX_SEED, TrainConfig, policy_from_flags, resumed_settings


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Transfer learning with ResNet-18: train, validate, checkpoint.")
    a = p.add_argument
    a("--data-dir", default="data", help="ImageFolder root with train/<class>/ and val/<class>/ (default: data)")
    a("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    a("--epochs", type=int, default=10)
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=1e-4)
    a("--freeze-backbone", type=bool01, default=1, help="1: freeze the pretrained backbone (reference flag)")
    a("--unfreeze-last", type=bool01, default=0, help="1: also train the last stage (layer4)")
    a("--unfreeze-all", type=bool01, default=0, help="1: train every layer")
    a("--policy", choices=["head", "last", "full"], type=str.lower, default=None,
      help="freeze policy; overrides the three 0/1 flags (head = fc only, last = layer4 + fc, full = all)")
    a("--seed", type=seed_value, default=1337, help=f"random seed, 0..{MAX_SEED}")
    a("--num-workers", type=int, default=0, help="image-decoding threads (0 = one per CPU core)")
    a("--amp", type=bool01, default=0, help="1: mixed precision: float16 on CUDA, bfloat16 on CPUs with native bf16 (else float32, with a note)")
    a("--dropout", type=float, default=0.0, help="dropout before the new fc layer (0 = plain Linear)")
    a("--run-name", default=None, help="run folder prefix (default: the --arch name)")
    a("--print-model", type=bool01, default=0, help="1: print the base and transfer models and parameter counts")
    a("--arch", default="resnet18", help="resnet18 | mobilenet_v2")
    a("--weights", default="imagenet", help="imagenet (torchvision cache) | none | PATH to a state_dict")
    a("--augment", default="auto", help="auto | none | light | standard (auto: none for head, light for last, standard for full)")
    a("--val-split", type=float, default=None, help="hold out this fraction of train/ when there is no val/ folder")
    a("--output-dir", default="checkpoints")
    a("--resume", default=None, help="continue a run from its latest.pt")
    a("--export-state-dict", type=bool01, default=0, help="1: also write state_dict.pt (weights only)")
    a("--export-full-model", type=bool01, default=0, help="1: also write full_model.pt (pickled module; brittle)")
    a("--cache", default="auto", help="auto | off: run frozen layers once per image (default auto)")
    a("--cache-budget-mb", type=int, default=1024, help="memory limit for cached images/activations")
    return p


def seed_value(text: str) -> int:
    """--seed as typed: a whole number (its range is TrainConfig's check)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {MAX_SEED}, got {text!r}") from None


def given_flags(argv) -> set[str]:
    """Destinations of the flags actually typed (not left at their defaults)."""
    p, unset = build_parser(), object()  # not a string: argparse would type-convert that
    p.set_defaults(**{a.dest: unset for a in p._actions})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}


def config_from_args(args: argparse.Namespace, given: set[str] = frozenset()) -> tuple[TrainConfig, list[str], dict | None]:
    """(config, notes, the --resume checkpoint as read). With --resume, settings
    not given again continue the saved run's."""
    policy = args.policy or policy_from_flags(args.freeze_backbone, args.unfreeze_last, args.unfreeze_all)
    cfg = TrainConfig(
        data_dir=args.data_dir, arch=args.arch, weights=args.weights, policy=policy, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, dropout=args.dropout,
        augment=args.augment, seed=args.seed, device=args.device, num_workers=args.num_workers, amp=bool(args.amp),
        val_split=args.val_split, output_dir=args.output_dir, run_name=args.run_name or args.arch.lower(), resume=args.resume,
        export_state_dict=bool(args.export_state_dict), export_full_model=bool(args.export_full_model),
        cache=args.cache, cache_budget_mb=args.cache_budget_mb,
    )
    return continue_saved_run(cfg, given) if args.resume else (cfg.validate(), [], None)


def continue_saved_run(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, list[str], dict]:
    """cfg with the saved run's settings where none were typed again, notes saying
    which, and the checkpoint (read once: the engine takes it from here)."""
    from pathlib import Path

    from core.checkpoint import read_checkpoint
    from core.errors import ConfigError
    cfg.validate()  # what was typed is checked as typed
    ckpt = read_checkpoint(cfg.resume)  # its errors are the ones the engine would give
    saved = ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}
    refuse_changed_run_settings(cfg, ckpt, given)
    refuse_typed_weights(cfg, ckpt, given)
    run_folder = Path(cfg.resume).expanduser().resolve().parent
    if "output_dir" not in given and (run_folder / "args.json").is_file():
        cfg.output_dir = str(run_folder.parent)  # a new folder (engine.resume_run_dir) goes beside the run's
    restored = resumed_settings(saved, given, cfg)
    notes = []
    if "data_dir" in given and isinstance(saved.get("data_dir"), str) and \
            Path(saved["data_dir"]).expanduser().absolute() != Path(cfg.data_dir).expanduser().absolute():
        notes.append(f"--resume: training on {cfg.data_dir}; the saved run trained on {saved['data_dir']}")
    if not restored:
        return cfg, notes, ckpt
    if "data_dir" in restored and not Path(restored["data_dir"]).expanduser().is_dir():
        raise ConfigError(f"--resume: the saved run's data folder {restored['data_dir']} does not exist here; "
                          f"pass --data-dir")
    try:
        cfg = dataclasses.replace(cfg, **restored).validate()
    except ConfigError as e:
        raise ConfigError(f"--resume: the saved run's settings are not usable ({e}); give that flag again") from None
    return cfg, notes + ["--resume: continuing the run's " + ", ".join(f"{k}={v}" for k, v in restored.items())
                         + " (give a flag again to change it)"], ckpt


# What a resumed run keeps from its checkpoint whatever is typed (the optimizer
# state and the data pipeline depend on them; see engine.read_resume).
FIXED_ON_RESUME = {"arch": "--arch", "policy": "--policy", "dropout": "--dropout", "seed": "--seed",
                   "augment": "--augment", "val_split": "--val-split"}


def refuse_changed_run_settings(cfg: TrainConfig, ckpt: dict, given: set[str]) -> None:
    """A flag typed with --resume that would change one of FIXED_ON_RESUME is an
    error, not a NOTE: silently training with the saved value contradicts what
    was typed. Compared with what engine.read_resume would keep."""
    from core.config import AUTO_AUGMENT, as_type_of
    from core.engine import fixed_run_settings
    from core.errors import ConfigError
    freeze_flags = {"freeze_backbone", "unfreeze_last", "unfreeze_all"}
    typed = set(given) | ({"policy"} if given & freeze_flags else set())
    saved = fixed_run_settings(ckpt)
    for name, flag in FIXED_ON_RESUME.items():
        if name not in typed or name not in saved or saved[name] is None and name != "val_split":
            continue
        now, was = getattr(cfg, name), saved[name]
        if name == "augment":  # 'auto' and what it resolves to under the saved policy are the same run
            now, was = (AUTO_AUGMENT.get(saved.get("policy") or cfg.policy, a) if a == "auto" else a for a in (now, was))
        if (None if was is None else as_type_of(now, was)) != now:
            if name == "policy" and "policy" not in given:
                flag = "the freeze flags (--freeze-backbone/--unfreeze-last/--unfreeze-all), i.e. --policy"
            raise ConfigError(f"{flag} {now} cannot change on --resume: the saved run used {was}, and a resumed run "
                              f"keeps its {', '.join(FIXED_ON_RESUME.values())}. Leave {flag.split(' (')[0]} out to "
                              f"continue it, or start a new run (without --resume) to train with {now}")


def refuse_typed_weights(cfg: TrainConfig, ckpt: dict, given: set[str]) -> None:
    """--weights chooses where a new run starts; a resumed run continues from the
    weights in its checkpoint. A typed --weights other than the one the run
    started from would be ignored: an error instead, saying so."""
    from pathlib import Path

    from core.errors import ConfigError
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
    raise ConfigError(f"--weights {cfg.weights} cannot be used with --resume: a resumed run continues from the weights "
                      f"saved in {cfg.resume}" + (f" (the run started from {started})" if started else "") +
                      f". Leave --weights out to resume, or start a new run (without --resume) to train from "
                      f"{cfg.weights}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _train(args, given_flags(argv)))


def _train(args, given) -> int:
    from cli.train_output import print_training  # torch imports only after flags parsed (fast --help)
    from core.device import configure_threads
    configure_threads()
    cfg, notes, ckpt = config_from_args(args, given)
    return print_training(cfg, print_model=bool(args.print_model), notes=notes, resume_checkpoint=ckpt)


if __name__ == "__main__":
    exit_fast(main())
