"""The Gradio app: the three tabs (tab_train, tab_predict, tab_model: each
its layout, its events and its handlers) assembled on one page, and the
options it is launched with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from core.access import AccessPolicy

from .context import AppContext
from .session import TrainingService
from .tab_evaluate import EvaluateTab
from .tab_model import ModelTab
from .tab_predict import PredictTab
from .tab_train import TrainTab

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_SIZE = "200mb"
# Sessions whose state Gradio keeps in memory (its default, 10,000, is ~4 GB here: a script opening a session
# per call grows the server); the oldest go first, so this is far above the pages open at once.
SESSIONS_KEPT = 500

CSS = """
#header h1 { margin-bottom: 0.1em; }
#header p { color: var(--body-text-color-subdued); margin-top: 0; }
#train-status, #predict-time { min-height: 2.6em; }
#train-status p { font-size: 1.02em; }
#policy-info { font-size: 0.92em; }
.section-title h3 { margin: 0.2em 0 0 0; }
#pickle-warning { font-size: 0.85em; color: #b45309; }
#start-btn, #stop-btn { min-height: 46px; font-size: 1.05em; }
/* the status line itself explains a failed run; hide the tracker's "Error" badge over it and over the progress strip */
#train-status [data-testid="status-tracker"]:has(.error),
#train-progress [data-testid="status-tracker"]:has(.error) { display: none !important; }
"""
THEME = gr.themes.Default(primary_hue="blue", secondary_hue="orange")

HEADER = """# Transfer learning with ResNet-18
Train an image classifier on your own folders in minutes: a pretrained backbone, a new head, and a freeze policy you choose. Everything runs on this machine."""


def launch_options(checkpoints_dir, data_dir, uploads_dir=None) -> dict:
    """Keyword arguments for `demo.launch`: only the app's own folders are served."""
    uploads_dir = Path(uploads_dir) if uploads_dir else ROOT / "uploads"
    folders = [Path(checkpoints_dir), Path(data_dir), uploads_dir]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    return {"allowed_paths": [str(f.resolve()) for f in folders], "max_file_size": MAX_FILE_SIZE,
            "css": CSS, "theme": THEME, "show_error": False, "state_session_capacity": SESSIONS_KEPT}


@dataclass
class AppHandlers:
    """The tabs of one built app, and what they share (tests and tools reach them as `demo.handlers`)."""
    ctx: AppContext
    train: TrainTab
    predict: PredictTab
    model: ModelTab
    evaluate: EvaluateTab

    @property
    def service(self) -> TrainingService:
        return self.ctx.service


CACHE_CLEANUP = (3600, 86400)  # (every N s, remove files older than M s)


def build_app(checkpoints_dir, data_dir, uploads_dir=None, policy: AccessPolicy | None = None) -> gr.Blocks:
    """`policy`: which folders a user may name and whether pickles load (app.py
    makes it from its flags); default: this machine only, no pickles."""
    ctx = AppContext(checkpoints_dir, data_dir, uploads_dir or ROOT / "uploads", policy=policy or AccessPolicy())
    predict, model = PredictTab(ctx), ModelTab()
    train = TrainTab(ctx, predict, model)  # its runs end in the Predict tab, its settings show in the Model tab
    evaluate = EvaluateTab(ctx, predict)
    # Gradio copies every upload and every file the app hands out into its cache, never emptied by default:
    # hourly, drop copies older than a day (a download link stays good that long; all go when the app stops).
    with gr.Blocks(title="Transfer learning with ResNet-18", analytics_enabled=False,
                   delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(HEADER, elem_id="header")
        with gr.Tabs(elem_id="tabs"):
            for tab in (train, predict, evaluate, model):
                tab.layout()
        for tab in (train, predict, evaluate, model):
            tab.wire(demo)
    demo.handlers = AppHandlers(ctx, train, predict, model, evaluate)
    return demo
