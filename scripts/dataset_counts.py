"""Print image counts per split and class, as the reference does:
    train: N images | classes=[...] | per_class={...}     (or `val: MISSING`)"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def count_lines(data_dir) -> list[str]:
    from core.data import scan_split
    root = Path(data_dir)
    lines = []
    for name in ("train", "val", "test"):
        d = root / name
        if d.is_dir():
            split = scan_split(d, name)
            lines.append(split.summary_line())
            if split.skipped:
                lines.append(f"  ({len(split.skipped)} non-image or unreadable entries ignored in {name}/)")
        elif name != "test":
            lines.append(f"{name}: MISSING")
    return lines


def layout_problems(data_dir) -> list[str]:
    """What train.py would refuse or warn about (images loose in train/, class
    folders that differ between splits, ...): the counts alone do not show it."""
    from cli.common import say
    from core.data import scan_dataset
    from core.errors import DatasetError
    try:
        return [say(w) for w in scan_dataset(data_dir).warnings]
    except DatasetError as e:  # its advice names train.py's flags (--val-split)
        return [f"train.py would refuse this folder: {say(e.message, e.field)}"]


def report(data_dir) -> None:
    print("\n".join(count_lines(data_dir)))
    for problem in layout_problems(data_dir):
        print(f"WARNING: {problem}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data_dir):  # (False, not an exception, for a folder this user may not read)
        print(f"error: {args.data_dir} is not a folder", file=sys.stderr)
        return 2
    from cli.common import run_cli
    return run_cli(lambda: report(args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
