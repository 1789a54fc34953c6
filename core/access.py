"""Which server folders the app may read for a user, and whether it may unpickle.

On the owner's own machine (the app on a loopback address) any folder is
allowed. When others can reach the app (--host not loopback, or --share), a
path typed into it must lie, after resolving symlinks, inside one of `roots`:
the app's own folders and the --data-root folders. Without that, Classify all
on `~` showed the server's private images and a class folder linked to /usr
listed its files. Unpickling (which runs the file's code) is never the
client's decision: only the owner's `allow_pickle`, refused when exposed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, UserError


@dataclass(frozen=True)
class AccessPolicy:
    exposed: bool = False
    roots: tuple[Path, ...] = ()  # resolved; only consulted when exposed
    allow_pickle: bool = False

    @classmethod
    def make(cls, exposed: bool, roots=(), allow_pickle: bool = False) -> "AccessPolicy":
        if exposed and allow_pickle:
            raise ConfigError("unpickling uploaded files runs their code: it is only allowed on this machine's own "
                              "address (127.0.0.1), not when others can reach the app")
        resolved = []
        for r in roots:
            p = Path(r).expanduser().resolve()
            if p not in resolved:
                resolved.append(p)
        return cls(bool(exposed), tuple(resolved), bool(allow_pickle))

    def allows(self, path) -> bool:
        if not self.exposed:
            return True
        try:
            real = Path(path).expanduser().resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            return False
        return any(real.is_relative_to(r) for r in self.roots)

    def describe_roots(self) -> str:
        return ", ".join(str(r) for r in self.roots) or "none"

    def check(self, path, field: str) -> Path:
        """`path` as the app should use it (~ expanded); UserError if the policy
        forbids it. Checked before anything looks at the path, so a refusal says
        nothing about whether it exists."""
        p = Path(str(path).strip()).expanduser()
        if not self.allows(p):
            raise UserError(f"'{field}' {path} is outside the folders this app may read while others can reach it "
                            f"({self.describe_roots()}); whoever runs the app can add a folder with --data-root")
        return p

    def check_tree(self, folder, field: str, limit: int = 3) -> Path:
        """`folder` checked as `check` does, and every symlink under it too (a
        class folder or an image linked elsewhere): UserError naming up to
        `limit` of those that lead outside. Links are not followed further, as
        the folder scans (Path.rglob) do not follow them."""
        root = self.check(folder, field)
        if not self.exposed or not root.is_dir():
            return root
        bad = links_outside(root, self.allows)
        if bad:
            shown = ", ".join(str(p.relative_to(root)) for p in bad[:limit])
            more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
            raise UserError(f"'{field}' {folder}: {len(bad)} link(s) in it lead outside the folders this app may read "
                            f"while others can reach it: {shown}{more}; remove them, or whoever runs the app can add "
                            f"their targets with --data-root")
        return root

    def outside(self, paths) -> list[str]:
        """The `paths` this policy forbids (none when not exposed)."""
        return [p for p in paths if not self.allows(p)] if self.exposed else []


def links_outside(root: Path, allowed) -> list[Path]:
    """Symlinks under `root` (not followed) whose target `allowed` rejects; unreadable folders are skipped."""
    bad, stack = [], [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for e in sorted(entries, key=lambda e: e.name):
            try:
                if e.is_symlink():
                    if not allowed(e.path):
                        bad.append(Path(e.path))
                elif e.is_dir():
                    stack.append(Path(e.path))
            except OSError:
                continue
    return sorted(bad)
