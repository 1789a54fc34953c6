"""The Train tab's live preview: the webcam streams to a chosen checkpoint and
top-k bars follow what it sees. core.predict.Predictor does the work (the same
preprocessing as every other prediction).

No backlog by construction: Gradio's webcam takes a frame every `stream_every`
seconds only while no earlier frame of that page is still being answered
(frames in between are never sent); a slow model is simply asked less often.
A page's stream holds one of LIVE_PAGES slots while its webcam is on, so several
pages can watch at once; their frames take turns on the model (one at a time)."""
from __future__ import annotations

import base64
import binascii
import threading
import time
from collections import deque
from io import BytesIO
from pathlib import Path

import gradio as gr

from core.cam import blend_cam, cam_for_image
from core.device import torch_threads
from core.errors import UserError
from core.images import load_rgb

from . import runs
from .context import PRIVATE, AppContext
from .messages import say
from .tab_predict import PredictTab
from .text import md_text

STREAM_EVERY_S = 0.05  # at most 20 frames a second are asked for; fewer when answers take longer
RATE_WINDOW_S = 5.0
# Ask the camera for 320x240 (an "ideal", not a demand): the model sees a 224 crop
# anyway, and the browser's capture + JPEG encoding of 640x480 frames cost more than
# the model did (measured: ResNet-18 4-7 -> 16 frames/s end to end, bench/live_app_bench.py).
LIVE_CAMERA = gr.WebcamOptions(constraints={"video": {"width": 320, "height": 240}})
TOP_K = 5
MAX_FRAME_BYTES = 8 * 2**20  # a 4K camera's JPEG frame is ~2-3 MB; anything larger is not a webcam frame
# One torch thread per frame: a frame is 41 ms of one core for ResNet-18 (24 frames/s
# alone), while two threads beside the browser decoding and drawing the camera wait
# for each other: measured in the app, 7-16 frames/s with 2 threads, 16-17 with 1.
LIVE_THREADS = 1
# Pages streaming at once. A stream is one long job that holds its slot while the webcam is on
# (and up to 30 s after a client vanishes): with 1 slot a second page would wait for the first.
LIVE_PAGES = 8


class WebcamStream(gr.Image):
    """A streaming webcam whose frames reach the handler as the bytes the browser
    sent (a JPEG): nothing is re-encoded, and no frame is written to Gradio's
    cache (at a few frames a second that would fill the disk)."""

    is_template = True  # same frontend as gr.Image
    # (no __init__ of its own: Gradio sends the page the parameters of gr.Image's; give
    # sources=["webcam"], streaming=True)

    def preprocess(self, payload) -> bytes | None:
        """The frame's bytes; None for no frame, an undecodable one, or one larger
        than any camera frame (a client can send anything: nothing that size is kept)."""
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if url.startswith("data:") and "," in url:
            data = url.split(",", 1)[1]
            if len(data) > MAX_FRAME_BYTES * 4 // 3 + 4:  # not even decoded
                return None
            try:
                frame = base64.b64decode(data, validate=False)
            except (binascii.Error, ValueError):
                return None
            return frame if len(frame) <= MAX_FRAME_BYTES else None
        path = getattr(payload, "path", None)
        try:
            return Path(path).read_bytes() if path and Path(path).stat().st_size <= MAX_FRAME_BYTES else None
        except OSError:
            return None


class LivePreview:
    def __init__(self, ctx: AppContext, predict: PredictTab):
        self.ctx, self.predict = ctx, predict
        self._answers: dict[str, deque] = {}  # page -> times of its recent answers
        self.answered = 0  # frames answered since start (all pages)
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()

    def layout(self) -> None:
        with gr.Accordion("Try it live: the webcam through a trained model", open=True, elem_id="live-preview"):
            with gr.Row(equal_height=True):
                self.ckpt = gr.Dropdown([], label="Checkpoint (the newest run's best is chosen when a run ends)",
                                        scale=6, elem_id="live-ckpt")
                self.refresh_btn = gr.Button("↻", scale=0, min_width=48, elem_id="live-refresh")
            with gr.Row(equal_height=False):
                self.cam = WebcamStream(sources=["webcam"], streaming=True, webcam_options=LIVE_CAMERA, height=260,
                                        label="Webcam: press ● to start the live preview", elem_id="live-cam")
                with gr.Column():
                    self.label = gr.Label(num_top_classes=TOP_K, label="What the model sees", elem_id="live-label")
                    self.rate = gr.Markdown("", elem_id="live-rate")
                    self.with_cam = gr.Checkbox(False, label="Grad-CAM overlay (where it looks; about half as many frames a second)",
                                                elem_id="live-cam-toggle")
                # an <img> with the JPEG inline: a gr.Image output would write every frame's
                # overlay into Gradio's file cache (a few a second, never cleaned)
                self.overlay = gr.HTML("", label="Grad-CAM of the frame (top-1 class)", show_label=True, container=True,
                                       visible=False, elem_id="live-cam-overlay")

    def wire(self, demo: gr.Blocks, run_ended: list) -> None:
        """`run_ended`: events after which the newest checkpoint is chosen (a run's end)."""
        self.refresh_btn.click(self.refresh, self.ckpt, self.ckpt, show_progress="hidden", **PRIVATE)
        demo.load(self.refresh, self.ckpt, self.ckpt, show_progress="hidden", **PRIVATE)
        gr.on(run_ended, self.newest, None, self.ckpt, show_progress="hidden", **PRIVATE)
        self.with_cam.change(lambda on: gr.update(visible=on, value=""), self.with_cam, self.overlay,
                             show_progress="hidden", **PRIVATE)
        self.cam.stream(self.frame, [self.cam, self.ckpt, self.with_cam], [self.label, self.rate, self.overlay],
                        stream_every=STREAM_EVERY_S,
                        concurrency_limit=LIVE_PAGES, concurrency_id="live-preview", show_progress="hidden",
                        **PRIVATE)

    def refresh(self, current=None):
        choices = runs.checkpoint_choices(self.ctx.checkpoints_dir)
        values = [v for _, v in choices]
        return gr.update(choices=choices, value=current if current in values else (values[0] if values else None))

    def newest(self):
        """The best checkpoint of the run written last (the one just trained): the list's first."""
        choices = runs.checkpoint_choices(self.ctx.checkpoints_dir)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def frame(self, image: bytes | None, ckpt, with_cam=False, request: gr.Request = None):
        """One webcam frame -> {top-k bars, answers per second, and with_cam its Grad-CAM overlay}."""
        if not image:
            return gr.skip()
        try:
            pred = self.predict.load(ckpt, None, False)
            rgb = load_rgb(BytesIO(image), min_side=pred.resize)  # decoded once, for the CAM's blend too
            with self._model_lock, torch_threads(LIVE_THREADS):  # pages take turns (and restore threads in order)
                topk = pred.predict_image(rgb, TOP_K)
                overlay = self._overlay(pred, rgb, topk[0][0]) if with_cam else None
        except UserError as e:
            return {self.label: None, self.rate: f"⚠ {md_text(say(e))}"}
        rate = self._rate(getattr(request, "session_hash", None) or "-")
        self.answered += 1
        out = {self.label: {name: float(p) for name, p in topk},
               self.rate: f"{rate:.1f} frames answered per second" if rate else "answering…"}
        return {**out, self.overlay: overlay} if with_cam else out

    @staticmethod
    def _overlay(pred, rgb, top1: str) -> str:
        """core.cam's map of the top-1 class placed on the frame and blended, as the
        Predict tab shows it; as an <img> whose JPEG is inline (a data URL)."""
        maps = pred.cam(pred.preprocess(rgb)[None], [pred.class_names.index(top1)])
        blended = blend_cam(rgb, cam_for_image(maps[0], rgb, pred.resize, pred.crop), 0.5)
        buf = BytesIO()
        blended.save(buf, "JPEG", quality=85)
        return (f'<img alt="Grad-CAM of the frame" style="max-width:100%;max-height:260px" '
                f'src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">')

    def _rate(self, page: str) -> float:
        now = time.monotonic()
        with self._lock:
            while len(self._answers) > 1000:
                self._answers.pop(next(iter(self._answers)))
            times = self._answers.setdefault(page, deque())
            times.append(now)
            while times and now - times[0] > RATE_WINDOW_S:
                times.popleft()
            return (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 and times[-1] > times[0] else 0.0
