"""Grad-CAM in the Predict tab: the heatmap beside the top-k label, an opacity
slider that re-blends the kept map (no new CAM), a class choice (default: the
top-1), and the CAM of the image clicked in the batch gallery. The maps come
from core.cam through the tab's Predictor."""
from __future__ import annotations

import time

import gradio as gr
import numpy as np
from PIL import Image

from core.cam import CAM_LAYER, blend_cam, cam_for_image, class_index
from core.errors import UserError
from core.images import load_rgb

from .components import NotAnImage
from .context import PRIVATE
from .messages import say
from .text import md_text

TOP1 = "top-1 (predicted)"
SHOWN_SIDE = 640  # the page shows the blend at most this large: re-blending stays instant for 12 MP photos


class CamPanel:
    def __init__(self, tab):
        self.tab = tab  # the PredictTab: its checkpoint widgets and its load()

    # ------------------------------------------------------------ layout

    def layout_single(self) -> None:
        """Beside the top-k label: the overlay, its opacity and its class."""
        with gr.Column(min_width=160):
            self.image = gr.Image(type="pil", label="Grad-CAM: where the model looked", interactive=False,
                                  height=300, format="png", buttons=["download"], elem_id="cam-image")
            self.caption = gr.Markdown("", elem_id="cam-caption")
            self.opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity", elem_id="cam-opacity")
            self.cls = gr.Dropdown([TOP1], value=TOP1, label="CAM for class", elem_id="cam-class")
        self.kept = gr.State(None)  # (shown-size image, its map): what the slider re-blends

    def layout_batch(self) -> None:
        """Under the batch gallery: the CAM of the image clicked in it."""
        with gr.Row(equal_height=False):
            self.batch_image = gr.Image(type="pil", label="Grad-CAM of the image clicked in the gallery",
                                        interactive=False, height=300, format="png", elem_id="batch-cam-image")
            self.batch_caption = gr.Markdown("Click an image in the gallery to see its Grad-CAM.",
                                             elem_id="batch-cam-caption")
        self.gallery_paths = gr.State([])  # the gallery's images, in its order (set by the batch run)
        self.batch_kept = gr.State(None)

    @property
    def batch_view(self) -> list:
        """What shows the gallery's CAM: outputs of the page's batch events."""
        return [self.batch_image, self.batch_caption, self.batch_kept]

    def view_cleared(self) -> dict:
        """New (or no) batch results: the old gallery CAM goes."""
        return {self.batch_kept: None, self.batch_image: None,
                self.batch_caption: "Click an image in the gallery to see its Grad-CAM."}

    # ------------------------------------------------------------ events

    def wire(self) -> None:
        t = self.tab
        ckpt = t.checkpoint_inputs
        ckpt_changed = [c.change for c in ckpt]
        single = [self.image, self.caption, self.kept, self.cls]
        # One queue, in order, for everything that draws a CAM: a map still being computed
        # (at the opacity of its moment) must not land after a newer re-blend and undo it.
        one = {"concurrency_id": "cam-view", "concurrency_limit": 1, **PRIVATE}
        gr.on([t.predict_btn.click, t.image.change, self.cls.input, *ckpt_changed], self.single_shown,
              [t.image, self.cls, self.opacity, *ckpt], single, show_progress="minimal", **one)
        self.opacity.change(self.reblend, [self.kept, self.opacity], self.image, show_progress="hidden", **one)
        self.opacity.change(self.reblend, [self.batch_kept, self.opacity], self.batch_image, show_progress="hidden",
                            **one)
        t.batch_gallery.select(self.gallery_shown, [self.gallery_paths, self.cls, self.opacity, *ckpt],
                               [self.batch_image, self.batch_caption, self.batch_kept], **one)

    # ------------------------------------------------------------ work

    def compute(self, image, class_choice, selected, uploaded, trust):
        """(shown-size image, its map, caption markdown, class names) for a PIL
        image or a path; UserError says what went wrong."""
        pred = self.tab.load(selected, uploaded, trust)
        rgb = load_rgb(image)  # EXIF orientation applied, as the prediction does
        t0 = time.perf_counter()
        # a class the (newly chosen) checkpoint lacks falls back to the top-1, as the dropdown then shows
        chosen = class_index(pred.class_names, class_choice) if class_choice in pred.class_names else None
        probs = dict(pred.predict_image(rgb, len(pred.class_names)))
        idx = pred.class_names.index(max(probs, key=probs.get)) if chosen is None else chosen
        m = pred.cam(pred.preprocess(rgb)[None], [idx])[0]
        cam = cam_for_image(m, rgb, pred.resize, pred.crop)
        shown, cam = _shown_size(rgb, cam)
        ms = (time.perf_counter() - t0) * 1000
        arch = pred.info.get("arch") or type(pred.model).__name__
        what = "top-1" if chosen is None else "chosen class"
        caption = (f"Grad-CAM for **{md_text(pred.class_names[idx])}** ({what}, p={probs[pred.class_names[idx]]:.3f}) at "
                   f"{md_text(CAM_LAYER.get(arch, '?'))} · red = strongest evidence · {ms:.0f} ms")
        return shown, cam, caption, pred.class_names

    def single(self, image, class_choice, opacity, selected, uploaded, trust) -> dict:
        if image is None or isinstance(image, NotAnImage):
            return {self.image: None, self.caption: "", self.kept: None}
        try:
            shown, cam, caption, names = self.compute(image, class_choice, selected, uploaded, trust)
        except UserError as e:
            return {self.image: None, self.caption: "⚠ " + md_text(say(e)), self.kept: None}
        keep = class_choice if class_choice in names else TOP1
        return {self.image: blend_cam(shown, cam, opacity), self.caption: caption, self.kept: (shown, cam),
                self.cls: gr.update(choices=[TOP1, *names], value=keep)}

    def single_shown(self, *args) -> dict:
        """single() for the page: nothing a user does may leave a traceback."""
        try:
            return self.single(*args)
        except Exception as e:  # the model or image failing in a way core did not foresee
            return {self.image: None, self.caption: f"⚠ Grad-CAM failed: {md_text(type(e).__name__)}", self.kept: None}

    @staticmethod
    def reblend(kept, opacity):
        """The kept map over the kept image at the new opacity (no new CAM)."""
        if not kept:
            return gr.skip()
        shown, cam = kept
        return blend_cam(shown, cam, opacity)

    def gallery(self, paths, class_choice, opacity, selected, uploaded, trust, evt: gr.SelectData) -> dict:
        try:
            path = paths[evt.index]
        except (IndexError, TypeError):
            return {self.batch_image: None, self.batch_caption: "", self.batch_kept: None}
        try:
            shown, cam, caption, _ = self.compute(path, class_choice, selected, uploaded, trust)
        except UserError as e:
            return {self.batch_image: None, self.batch_caption: "⚠ " + md_text(say(e)), self.batch_kept: None}
        return {self.batch_image: blend_cam(shown, cam, opacity), self.batch_kept: (shown, cam),
                self.batch_caption: f"{md_text(_name(path))}: {caption}"}

    def gallery_shown(self, paths, class_choice, opacity, selected, uploaded, trust, evt: gr.SelectData) -> dict:
        try:
            return self.gallery(paths, class_choice, opacity, selected, uploaded, trust, evt)
        except Exception as e:
            return {self.batch_image: None, self.batch_caption: f"⚠ Grad-CAM failed: {md_text(type(e).__name__)}",
                    self.batch_kept: None}


def _shown_size(image: Image.Image, cam: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The image and its map at most SHOWN_SIDE on the long side."""
    if max(image.size) <= SHOWN_SIDE:
        return image, cam
    small = image.copy()
    small.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
    m = Image.fromarray(cam, mode="F").resize(small.size, Image.Resampling.BILINEAR)
    return small, np.clip(np.asarray(m, np.float32), 0, 1)


def _name(path) -> str:
    from pathlib import Path
    return Path(str(path)).name
