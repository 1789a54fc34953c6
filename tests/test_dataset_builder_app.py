"""The dataset builder and the live preview of the app, called as the page calls
them (handlers of a built app; no browser): what each says and writes."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.models import build_model


def plain(markdown: str) -> str:
    """Markdown as read: md_text's backslash escapes removed."""
    return re.sub(r"\\(.)", r"\1", markdown)


def jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture
def app(tmp_path):
    from demo_app.ui import build_app
    demo = build_app(tmp_path / "checkpoints", tmp_path / "data", tmp_path / "uploads")
    return demo.handlers


@pytest.fixture
def pets(app, tmp_path):
    b = app.train.builder
    b.create("pets")
    choice = str(tmp_path / "data" / "pets")
    for cls in ("cat", "mug"):
        b.add_class(choice, cls)
    return choice


def test_burst_saves_one_frame_per_streamed_frame_then_stops(app, pets, tmp_path):
    b = app.train.builder
    assert "Switch the webcam on first" in b.capture(pets, "mug", "train")[b.status]
    assert "Switch the webcam on first" in b.burst()
    assert b.status not in b.frame(jpeg((0, 200, 0)), pets, "mug", "train")  # kept as the newest frame only
    assert list((tmp_path / "data" / "pets" / "train" / "mug").iterdir()) == []
    out = b.capture(pets, "mug", "train")  # one capture = one image
    assert "added 1 image" in out[b.status]
    assert "Capturing 10" in b.burst().replace("capturing", "Capturing")
    said = [b.frame(jpeg((0, 200, 20 * i + 10)), pets, "mug", "train") for i in range(12)]
    assert all(b.status in s for s in said[:10]) and "9 frame(s) to go" in said[0][b.status]
    assert b.status not in said[10] and b.status not in said[11]  # the burst is over: frames are only kept
    saved = sorted((tmp_path / "data" / "pets" / "train" / "mug").iterdir())
    assert len(saved) == 11 and all(p.suffix == ".jpg" for p in saved)
    assert saved[-1].read_bytes() in {jpeg((0, 200, 20 * i + 10)) for i in range(10)} | {jpeg((0, 200, 0))}


def test_refusals_are_said_and_uploads_are_not_changed(app, pets, tmp_path):
    b = app.train.builder
    assert "Class not added" in b.add_class(pets, "a/b")[b.status]
    assert "already exists" in b.add_class(pets, "CAT")[b.status]
    assert "Not created" in b.create("..")[b.status]
    upload = tmp_path / "uploads" / "zip_1" / "train" / "x"
    upload.mkdir(parents=True)
    assert "is an upload" in b.add_class(str(upload.parent.parent), "y")[b.status]
    assert not (upload.parent / "y").exists()
    notes = tmp_path / "notes.png"
    notes.write_text("hello")
    out = b.add_files([str(notes)], pets, "cat", "train")
    assert "refused 1: notes.png: not a supported image" in plain(out[b.status])
    # the dataset list shows made ones and uploads, with counts
    choices = b.refresh()["choices"]
    assert [c[0] for c in choices] == ["pets — 2 classes: cat 0, mug 0", "upload: zip_1 — 1 classes: x 0"]


def test_use_fills_the_form_with_the_folder_and_a_val_split_when_there_is_no_val(app, pets, tmp_path):
    b = app.train.builder
    out = b.use(pets)
    assert out[b.form_data_dir] == pets and out[b.form_val_split] == 0.2
    assert "holds out 20%" in out[b.status]
    b.add_files([str(_png(tmp_path / "v.png"))], pets, "cat", "val")
    b.add_files([str(_png(tmp_path / "w.png", (0, 0, 250)))], pets, "mug", "val")
    out = b.use(pets)
    assert out[b.form_val_split] == 0 and "own val/" in out[b.status]
    # a pasted image, then removed again by its thumbnail's caption (its file name); a class renamed
    out = b.add_pasted(str(_png(tmp_path / "p.png", (9, 9, 9))), pets, "cat", "train")
    assert "added 1 image" in plain(out[b.status]) and out[b.paste] is None
    name = next(caption for _, caption in out[b.gallery] if caption.startswith("pasted_"))
    assert "Click an image" in b.remove(None, pets, "cat", "train")[b.status]
    assert "Removed" in b.remove(name, pets, "cat", "train")[b.status]
    assert not (Path(pets) / "train" / "cat" / name).exists()
    assert "Not renamed" in b.rename(pets, "cat", "mug")[b.status]
    assert "Renamed" in b.rename(pets, "cat", "Katze")[b.status]
    assert sorted(p.name for p in (Path(pets) / "val").iterdir()) == ["Katze", "mug"]
    # deleting a class asks first: the confirmation names it and its images
    ask = b.ask_delete(pets, "mug")
    assert "Delete class **mug** and its **1** image(s)?" in ask[b.confirm_text]
    assert "Deleted class" in b.delete(pets, "mug")[b.status]


def _png(path: Path, color=(250, 0, 0)) -> Path:
    Image.new("RGB", (32, 32), color).save(path)
    return path


def test_live_preview_answers_a_streamed_frame_with_the_checkpoints_classes(app, tmp_path, monkeypatch):
    from core.predict import Predictor
    from demo_app.live_preview import LIVE_THREADS, MAX_FRAME_BYTES, WebcamStream
    run = tmp_path / "checkpoints" / "mobilenet_v2-head_1"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc\n")  # a run the app lists
    torch.save({"model_state": build_model("mobilenet_v2", 2).state_dict(), "class_names": ["cat", "my mug"],
                "arch": "mobilenet_v2"}, run / "best_acc.pt")
    live = app.train.live
    ckpt = live.newest()["value"]
    assert ckpt == str(run / "best_acc.pt")
    frame = jpeg((10, 200, 10), (640, 480))

    class Payload:
        url, path = "data:image/jpeg;base64," + base64.b64encode(frame).decode(), None
    data = WebcamStream(sources=["webcam"], streaming=True).preprocess(Payload())
    assert data == frame  # the browser's bytes, not re-encoded
    threads_used, predict_image = [], Predictor.predict_image

    def spy(self, *a, **k):
        threads_used.append(torch.get_num_threads())
        return predict_image(self, *a, **k)
    before = torch.get_num_threads()
    monkeypatch.setattr(Predictor, "predict_image", spy)
    out = [live.frame(data, ckpt) for _ in range(4)][-1]
    assert threads_used == [LIVE_THREADS] * 4 and torch.get_num_threads() == before  # one thread per frame, then back
    assert set(out[live.label]) == {"cat", "my mug"} and abs(sum(out[live.label].values()) - 1) < 1e-5
    assert "frames answered per second" in out[live.rate] and live.answered == 4
    assert live.overlay not in out  # no CAM unless asked for
    with_cam = live.frame(data, ckpt, True)
    # the overlay comes inline (no file in Gradio's cache per frame): a JPEG of the frame's size
    inline = re.fullmatch(r'<img [^>]*src="data:image/jpeg;base64,([^"]+)">', with_cam[live.overlay])
    assert inline and Image.open(io.BytesIO(base64.b64decode(inline.group(1)))).size == (640, 480)
    assert set(with_cam[live.label]) == {"cat", "my mug"}
    assert "⚠" in live.frame(data, str(tmp_path / "missing.pt"))[live.rate]

    # a client can send anything as a frame: one larger than any camera's is dropped, not decoded or kept
    huge = "data:image/jpeg;base64," + base64.b64encode(b"\xff" * (MAX_FRAME_BYTES + 1)).decode()

    class Huge:
        url, path = huge, None
    assert WebcamStream(sources=["webcam"], streaming=True).preprocess(Huge()) is None


def test_the_builder_keeps_the_newest_frame_of_a_bounded_number_of_pages(app):
    from demo_app.tab_dataset import MAX_WEBCAM_PAGES
    builder = app.train.builder

    class Request:
        def __init__(self, page):
            self.session_hash = page
    builder.frame(b"first page's frame", None, None, "train", Request("first"))
    for i in range(MAX_WEBCAM_PAGES + 20):  # many pages (or made-up session ids)
        builder.frame(b"x", None, None, "train", Request(f"page{i}"))
        builder.frame(b"newest", None, None, "train", Request("first"))  # an active page stays
    assert len(builder._webcam) == MAX_WEBCAM_PAGES and builder._webcam["first"]["frame"] == b"newest"
