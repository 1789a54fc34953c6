"""What the tabs of one app share: its folders, the one training service and
the access policy (which folders a user may name, whether pickles load)."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gradio.utils import get_upload_folder

from core.access import AccessPolicy
from core.errors import UserError

from .session import TrainingService

# Events the page needs but a remote program should not call (no API endpoint).
PRIVATE = {"api_visibility": "private"}
# Handlers of several outputs return {component: value} for those that change
# (so adding an output cannot shift another); when none does, gr.skip(): Gradio
# would take an empty dict for one value.


def served_folder(prefix: str) -> Path:
    """A new folder in Gradio's cache for files a handler writes and hands out (a CSV, a report): served
    from there without a second copy, and removed with the other cache files (ui.CACHE_CLEANUP)."""
    root = Path(get_upload_folder())
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def keep_newest(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently written folders under `root` (the app's caches of uploads'
    exports and weights). Another process may remove one meanwhile."""
    def written(d: Path) -> float:
        try:
            return d.stat().st_mtime
        except OSError:
            return 0.0
    if not root.is_dir():
        return
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.is_symlink()), key=written, reverse=True)
    for d in folders[keep:]:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class AppContext:
    checkpoints_dir: Path
    data_dir: Path  # the demo set, the Dataset folder box's first value
    uploads_dir: Path
    datasets_dir: Path | None = None  # where the page makes datasets (data/<name>/); default: data_dir
    service: TrainingService = field(default_factory=TrainingService)
    policy: AccessPolicy = field(default_factory=AccessPolicy)  # loopback: any folder; pickles never

    def __post_init__(self):
        self.checkpoints_dir, self.data_dir, self.uploads_dir = map(
            Path, (self.checkpoints_dir, self.data_dir, self.uploads_dir))
        self.datasets_dir = Path(self.datasets_dir or self.data_dir)

    def folders_note(self) -> str | None:
        """For the folder boxes' info line: when others can reach the app, which folders it reads."""
        return f"this app reads folders under {self.policy.describe_roots()} only" if self.policy.exposed else None

    def dataset_folder(self, data_dir) -> str:
        """The folder box's value; empty is a mistake to say, not the demo set to use silently.
        When others can reach the app, a folder outside its allowed ones (or linking out of them) is refused."""
        folder = (data_dir or "").strip()
        if not folder:
            raise UserError(f"{{setting}} is empty: enter the folder that holds train/ and val/ "
                            f"(the demo set is {self.data_dir})", field="data_dir")
        self.policy.check_tree(folder, "Dataset folder")
        return folder
