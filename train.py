"""Train a transfer-learning classifier (ResNet-18 by default).

    python train.py --data-dir data --device cpu --epochs 10 --batch-size 16 --lr 0.001 \
        --weight-decay 0.0001 --freeze-backbone 1 --unfreeze-last 0 --unfreeze-all 0 \
        --seed 1337 --num-workers 0 --amp 0

Flags and output lines match the reference chapter's train.py; the extra flags
(--policy, --arch, --weights, --augment, --resume, ...) are documented in README."""
from __future__ import annotations

import argparse

from cli.common import ArgumentParser, bool01, exit_fast, run_cli
from core.config import MAX_SEED, TrainConfig, policy_from_flags


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """defaults=False: a flag not typed is absent from the parsed namespace (argparse.SUPPRESS)."""
    p = ArgumentParser(description="Transfer learning with ResNet-18: train, validate, checkpoint.")

    def a(*flags, **kw):
        p.add_argument(*flags, **kw if defaults else dict(kw, default=argparse.SUPPRESS))
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
    a("--num-workers", type=int, default=None,
      help="DataLoader worker processes that decode images (default: min(4, CPU cores - 1); "
           "0 = decode in this process, one thread per core)")
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
    return set(vars(build_parser(defaults=False).parse_args(argv)))


def config_from_args(args: argparse.Namespace, given: set[str] = frozenset()) -> tuple[TrainConfig, list[str], dict | None]:
    """(config, notes, the --resume checkpoint as read). With --resume, settings
    not given again continue the saved run's."""
    policy = args.policy or policy_from_flags(args.freeze_backbone, args.unfreeze_last, args.unfreeze_all)
    cfg = TrainConfig(
        data_dir=args.data_dir, arch=args.arch, weights=args.weights, policy=policy, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, dropout=args.dropout,
        augment=args.augment, seed=args.seed, device=args.device, num_workers=default_num_workers() if args.num_workers is None else args.num_workers,
        amp=bool(args.amp),
        val_split=args.val_split, output_dir=args.output_dir, run_name=args.run_name or args.arch.lower(), resume=args.resume,
        export_state_dict=bool(args.export_state_dict), export_full_model=bool(args.export_full_model),
        cache=args.cache, cache_budget_mb=args.cache_budget_mb,
    )
    if not args.resume:
        return cfg.validate(), [], None
    from core.resume import continue_saved_run
    return continue_saved_run(cfg, given)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _train(args, given_flags(argv)))


def default_num_workers() -> int:
    from core.loader import default_num_workers as default
    return default()


def _train(args, given) -> int:
    from cli.train_output import print_training  # torch imports only after flags parsed (fast --help)
    from core import distributed
    from core.device import configure_threads
    configure_threads()
    cfg, notes, ckpt = config_from_args(args, given)
    # Under torchrun: join the process group (README "Scaling"); one process otherwise.
    group = distributed.init_from_env(cfg.device)
    try:
        return print_training(cfg, print_model=bool(args.print_model), notes=notes, resume_checkpoint=ckpt)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    exit_fast(main())
