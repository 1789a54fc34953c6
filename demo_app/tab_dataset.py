"""The Train tab's dataset builder: make a dataset in the page (a name, classes,
images dropped, pasted or captured from the webcam) or extend one, then train
on it. core.dataset_store does the work; this module lays out and wires."""
from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from core.dataset_store import DEFAULT_VAL_SPLIT, DatasetStore, val_split_for
from core.errors import UserError, render

from .context import PRIVATE, AppContext
from .inference import thumbnail
from .live_preview import WebcamStream
from .messages import error_markdown
from .text import md_text

BURST_FRAMES = 10
MAX_WEBCAM_PAGES = 64  # pages whose newest webcam frame is kept for Capture
THUMBNAILS = 60  # the newest images of a class shown (decoding hundreds on every change would be slow)
BURST_EVERY_S = 0.3  # the webcam stream's pace: a burst adds one frame this often
SPLITS = [("train: to learn from", "train"), ("val: to check the model with", "val")]
VAL_NOTE = (f"Without val/ images, Start holds out {DEFAULT_VAL_SPLIT:.0%} of each class (at least 1 image, the "
            f"same every time for one Seed) to check the model; each class then needs 2 images or more.")
FIELD_WORDS = {"dataset_name": "Dataset name", "class_name": "Class name", "image": "Image", "split": "Split"}


class DatasetBuilder:
    def __init__(self, ctx: AppContext, root=None):
        self.ctx = ctx
        self.store = DatasetStore(root or ctx.datasets_dir)
        self._webcam: dict[str, dict] = {}  # page -> {"frame": newest frame's bytes, "burst": frames left}
        # (at most MAX_WEBCAM_PAGES pages, oldest first out: frames are <= 8 MB, so this stays bounded)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ layout

    def layout(self) -> None:
        with gr.Accordion("Make a dataset here, or add to one (no folder needed)", open=False,
                          elem_id="ds-builder"):
            self.selected_image = gr.State(None)
            with gr.Row(equal_height=True):
                self.choice = gr.Dropdown([], label="Dataset", scale=6, elem_id="ds-choice",
                                          info=f"datasets under {self.store.root} and earlier zip uploads")
                self.refresh_btn = gr.Button("↻", scale=0, min_width=48, elem_id="ds-refresh")
            with gr.Row(equal_height=True):
                self.new_name = gr.Textbox(label="New dataset", placeholder="e.g. mugs vs bottles", scale=4,
                                           elem_id="ds-new-name")
                self.create_btn = gr.Button("Create", scale=1, elem_id="ds-create")
            self.status = gr.Markdown("", elem_id="ds-status")
            self.overview = gr.Markdown("", elem_id="ds-overview")
            with gr.Row(equal_height=True):
                self.class_name = gr.Textbox(label="New class", placeholder="e.g. mug", scale=4,
                                             elem_id="ds-class-name")
                self.add_class_btn = gr.Button("Add class", scale=1, elem_id="ds-add-class")
            self.cls = gr.Radio([], label="Add images to class", elem_id="ds-class")
            self.split = gr.Radio(SPLITS, value="train", label="as", elem_id="ds-split", info=VAL_NOTE)
            self.files = gr.File(file_count="multiple", file_types=["image"], type="filepath", height=110,
                                 label="Drop many images here (or click to choose)", elem_id="ds-files")
            with gr.Row(equal_height=False):
                self.paste = gr.Image(sources=["clipboard", "upload"], type="filepath", format="png", height=200,
                                      label="Paste an image (Ctrl+V after clicking here)", elem_id="ds-paste")
                with gr.Column():
                    self.webcam = WebcamStream(sources=["webcam"], streaming=True, height=200, label="Webcam: press ● to switch it on",
                                               elem_id="ds-webcam")
                    with gr.Row():
                        self.capture_btn = gr.Button("● Capture", size="sm", elem_id="ds-capture")
                        self.burst_btn = gr.Button(f"Burst ×{BURST_FRAMES}", size="sm", elem_id="ds-burst")
            self.gallery = gr.Gallery(label=f"Images of this class, newest first (up to {THUMBNAILS}; click one to "
                                            f"select it)", columns=6, height=230,
                                      allow_preview=False, object_fit="cover", buttons=[], elem_id="ds-gallery")
            with gr.Row():
                self.remove_btn = gr.Button("Remove selected image", size="sm", elem_id="ds-remove")
                self.rename_box = gr.Textbox(show_label=False, placeholder="new name for this class", scale=2,
                                             elem_id="ds-rename-name")
                self.rename_btn = gr.Button("Rename class", size="sm", elem_id="ds-rename")
                self.delete_btn = gr.Button("Delete class…", size="sm", variant="stop", elem_id="ds-delete")
            with gr.Row(visible=False, elem_id="ds-confirm") as self.confirm_row:
                self.confirm_text = gr.Markdown("")
                self.confirm_yes = gr.Button("Yes, delete it", variant="stop", size="sm", elem_id="ds-delete-yes")
                self.confirm_no = gr.Button("Cancel", size="sm", elem_id="ds-delete-no")
            self.use_btn = gr.Button("Use this dataset for training ↓", variant="primary", elem_id="ds-use")

    def wire(self, demo: gr.Blocks, data_dir: gr.Textbox, val_split: gr.Number, then: dict) -> None:
        """`data_dir`, `val_split`: the Train form's boxes that Use fills; `then`: the event that checks them."""
        self.form_data_dir, self.form_val_split = data_dir, val_split
        view = [self.choice, self.overview, self.cls, self.gallery, self.selected_image]  # (show()'s outputs)
        shown = {"show_progress": "hidden", **PRIVATE}
        demo.load(self.refresh, self.choice, self.choice, **shown)
        self.refresh_btn.click(self.refresh, self.choice, self.choice, **shown)
        self.choice.change(self.show, [self.choice, self.cls, self.split], view, **shown)
        gr.on([self.cls.change, self.split.change], self.show, [self.choice, self.cls, self.split], view, **shown)
        self.create_btn.click(self.create, self.new_name, [self.choice, self.new_name, self.status], **PRIVATE)
        gr.on([self.add_class_btn.click, self.class_name.submit], self.add_class, [self.choice, self.class_name],
              [self.status, self.class_name, *view], **PRIVATE)
        adding = [self.choice, self.cls, self.split]
        self.files.upload(self.add_files, [self.files, *adding], [self.files, self.status, *view], **PRIVATE)
        self.paste.input(self.add_pasted, [self.paste, *adding], [self.paste, self.status, *view], **PRIVATE)
        # Frames come every BURST_EVERY_S while the webcam is on; the page sends none while one is being
        # handled, and the handler only keeps the newest (or saves it during a burst).
        self.webcam.stream(self.frame, [self.webcam, *adding], [self.status, *view], stream_every=BURST_EVERY_S,
                           concurrency_limit=None, show_progress="hidden", **PRIVATE)
        self.capture_btn.click(self.capture, adding, [self.status, *view], **PRIVATE)
        self.burst_btn.click(self.burst, None, self.status, **shown)
        self.gallery.select(self.image_selected, None, self.selected_image, **shown)
        self.remove_btn.click(self.remove, [self.selected_image, *adding], [self.status, *view], **PRIVATE)
        self.rename_btn.click(self.rename, [self.choice, self.cls, self.rename_box],
                              [self.status, self.rename_box, *view], **PRIVATE)
        self.delete_btn.click(self.ask_delete, [self.choice, self.cls], [self.confirm_row, self.confirm_text],
                              **shown)
        self.confirm_no.click(lambda: gr.update(visible=False), None, self.confirm_row, **shown)
        self.confirm_yes.click(self.delete, [self.choice, self.cls], [self.confirm_row, self.status, *view],
                               **PRIVATE)
        self.use_btn.click(self.use, self.choice, [data_dir, val_split, self.status], **PRIVATE).success(**then)

    # ------------------------------------------------------------ the dataset list

    def entries(self):
        return self.store.datasets(self.ctx.uploads_dir)

    def refresh(self, current=None, select: str | None = None):
        entries = self.entries()
        values = [str(e.path) for e in entries]
        value = select if select in values else current if current in values else (values[0] if values else None)
        return gr.update(choices=[(e.label(), str(e.path)) for e in entries], value=value)

    def _editable(self, choice) -> str:
        """The chosen dataset's name, when it is one made here (uploads and typed paths are not changed)."""
        if not choice:
            raise UserError("choose a dataset first, or create one", field="dataset_name")
        path = Path(str(choice))
        if path.parent.resolve() != self.store.root.resolve():
            raise UserError(f"{path} is an upload or a folder outside {self.store.root}: it is trained on as it is; "
                            f"create a new dataset to add images", field="dataset_name")
        return path.name

    def show(self, choice, cls=None, split="train") -> dict:
        """The chosen dataset's classes with their counts, the class radio, the chosen class's thumbnails,
        and the dataset list's labels (their counts) redone; its value is left alone."""
        entries = self.entries()
        labels = gr.update(choices=[(e.label(), str(e.path)) for e in entries])
        entry = next((e for e in entries if str(e.path) == str(choice)), None)
        if entry is None:
            return {self.choice: labels, self.overview: "", self.cls: gr.update(choices=[], value=None),
                    self.gallery: [], self.selected_image: None}
        classes = entry.classes()
        cls = cls if cls in classes else (classes[0] if classes else None)
        train, val = entry.counts.get("train", {}), entry.counts.get("val", {})
        lines = ["| class | train | val |", "|---|---:|---:|"]
        lines += [f"| {md_text(c)} | {train.get(c, 0)} | {val.get(c, 0)} |" for c in classes]
        if not classes:
            lines = ["No classes yet: add at least two."]
        elif not entry.editable:
            lines.append("\nAn upload: trained on as it is (create a new dataset to add images).")
        thumbs = []
        if cls and entry.editable:
            for p in newest_first(self.store.images(entry.name, cls, split or "train"))[:THUMBNAILS]:
                t = thumbnail(str(p), 160)
                if t is not None:
                    thumbs.append((t, p.name))
        return {self.choice: labels, self.overview: "\n".join(lines), self.cls: gr.update(choices=classes, value=cls),
                self.gallery: thumbs, self.selected_image: None}

    # ------------------------------------------------------------ actions

    def _said(self, e: UserError, title: str) -> str:
        return error_markdown(title, render(e.message, FIELD_WORDS, field=e.field), "⚠")

    def create(self, name) -> dict:
        try:
            path = self.store.create(name)
        except UserError as e:
            return {self.status: self._said(e, "Not created")}
        return {self.choice: self.refresh(select=str(path)), self.new_name: "",
                self.status: f"Created **{md_text(path.name)}** in {md_text(path.parent)}. Now add classes."}

    def add_class(self, choice, name) -> dict:
        try:
            cls = self.store.add_class(self._editable(choice), name)
        except UserError as e:
            return {self.status: self._said(e, "Class not added")}
        return {**self.show(choice, cls), self.class_name: "",
                self.status: f"Added class **{md_text(cls)}**: drop, paste or capture its images."}

    def _add(self, files, choice, cls, split) -> dict:
        try:
            result = self.store.add_images(self._editable(choice), cls, files, split or "train")
        except UserError as e:
            return {self.status: self._said(e, "Not added")}
        mark = "⚠ " if result.refused or result.duplicates else "✔ "
        return {**self.show(choice, cls, split), self.status: mark + md_text(result.summary())}

    def add_files(self, files, choice, cls, split) -> dict:
        if not files:
            return gr.skip()
        return {**self._add([(Path(f).name, f) for f in files], choice, cls, split), self.files: None}

    def add_pasted(self, image, choice, cls, split) -> dict:
        if not image:
            return gr.skip()
        return {**self._add([("pasted", image)], choice, cls, split), self.paste: None}

    def _page(self, request: gr.Request | None) -> dict:
        key = getattr(request, "session_hash", None) or "-"
        with self._lock:
            page = self._webcam.pop(key, None) or {"frame": None, "burst": 0}
            self._webcam[key] = page  # the most recently used last
            while len(self._webcam) > MAX_WEBCAM_PAGES:
                self._webcam.pop(next(iter(self._webcam)))
            return page

    def frame(self, image: bytes | None, choice, cls, split, request: gr.Request = None):
        """A webcam frame (its JPEG bytes): kept as the page's newest; saved while a burst has frames left."""
        page = self._page(request)
        page["frame"] = image
        if not image or page["burst"] <= 0:
            return gr.skip()
        page["burst"] -= 1
        if page["burst"] > 0:  # mid-burst: saved and said; the thumbnails are redone once, after the last frame
            try:
                result = self.store.add_images(self._editable(choice), cls, [("webcam", image)], split or "train")
            except UserError as e:
                page["burst"] = 0
                return {self.status: self._said(e, "Not added")}
            return {self.status: f"Burst: {page['burst']} frame(s) to go · {md_text(result.summary())}"}
        return self._add([("webcam", image)], choice, cls, split)

    def capture(self, choice, cls, split, request: gr.Request = None) -> dict:
        frame = self._page(request)["frame"]
        if not frame:
            return {self.status: "⚠ Switch the webcam on first: press ● under its picture (allow the camera if "
                                 "the browser asks)."}
        return self._add([("webcam", frame)], choice, cls, split)

    def burst(self, request: gr.Request = None) -> str:
        page = self._page(request)
        if not page["frame"]:
            return "⚠ Switch the webcam on first: press ● under its picture."
        page["burst"] = BURST_FRAMES
        return f"Burst: capturing {BURST_FRAMES} frames, one every {BURST_EVERY_S} s…"

    @staticmethod
    def image_selected(evt: gr.SelectData):
        caption = evt.value.get("caption") if isinstance(evt.value, dict) else None
        return caption

    def remove(self, filename, choice, cls, split) -> dict:
        if not filename:
            return {self.status: "⚠ Click an image below first to select it."}
        try:
            self.store.remove_image(self._editable(choice), cls, filename, split or "train")
        except UserError as e:
            return {self.status: self._said(e, "Not removed")}
        return {**self.show(choice, cls, split), self.status: f"Removed {md_text(filename)}."}

    def rename(self, choice, cls, new) -> dict:
        try:
            name = self.store.rename_class(self._editable(choice), cls, new)
        except UserError as e:
            return {self.status: self._said(e, "Not renamed")}
        return {**self.show(choice, name), self.rename_box: "",
                self.status: f"Renamed **{md_text(cls)}** to **{md_text(name)}**."}

    def ask_delete(self, choice, cls) -> dict:
        entry = next((e for e in self.entries() if str(e.path) == str(choice)), None)
        if entry is None or not entry.editable or not cls:
            return {self.confirm_row: gr.update(visible=False)}
        n = sum(split.get(cls, 0) for split in entry.counts.values())
        return {self.confirm_row: gr.update(visible=True),
                self.confirm_text: f"Delete class **{md_text(cls)}** and its **{n}** image(s)? This cannot be undone."}

    def delete(self, choice, cls) -> dict:
        try:
            n = self.store.delete_class(self._editable(choice), cls)
        except UserError as e:
            return {self.confirm_row: gr.update(visible=False), self.status: self._said(e, "Not deleted")}
        return {**self.show(choice), self.confirm_row: gr.update(visible=False),
                self.status: f"Deleted class **{md_text(cls)}** ({n} image(s))."}

    def use(self, choice) -> dict:
        """The dataset into the Train form: its folder, and the validation fraction it needs."""
        if not choice:
            raise gr.Error("Choose or create a dataset first.", print_exception=False)
        split = val_split_for(choice)
        note = (f"Using it. {VAL_NOTE}" if split else "Using it, with its own val/ images to check the model.")
        return {self.status: note, self.form_data_dir: str(choice), self.form_val_split: split or 0}


def newest_first(paths: list[Path]) -> list[Path]:
    """The images last added first (a capture shows at once); unreadable ones last."""
    def added(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    return sorted(paths, key=added, reverse=True)
