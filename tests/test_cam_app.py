"""The Predict tab's Grad-CAM handlers (demo_app/cam_panel.py), called as the page
calls them: the overlay and its class, the opacity re-blend that computes no new
CAM, a class the checkpoint lacks, a bad checkpoint, the gallery click."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_dataset, train_config, train_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cam_app")
    data = make_image_dataset(base / "ds", n_train=4, n_val=2, size=(64, 48))
    _, _, end = train_run(train_config(data, base / "ck", epochs=1, policy="head"))
    from demo_app.ui import build_app
    tabs = build_app(base / "ck", data, base / "up").handlers
    return {"tab": tabs.predict, "best": f"{end.run_dir}/best_acc.pt", "data": data}


def test_overlay_class_and_reblend(setup, monkeypatch):
    from core.cam import blend_cam
    from core.predict import Predictor
    tab, best = setup["tab"], setup["best"]
    cam = tab.cam
    image = Image.open(next((setup["data"] / "val" / "cat").iterdir())).convert("RGB")
    out = cam.single(image, "top-1 (predicted)", 0.5, best, None, False)
    shown, kept = out[cam.image], out[cam.kept]
    assert shown.size == image.size and kept[1].shape == (48, 64)
    assert "Grad-CAM for" in out[cam.caption] and "(top-1" in out[cam.caption]
    assert out[cam.cls]["choices"] == ["top-1 (predicted)", "cat", "fish"]
    # the slider re-blends what is kept: no new CAM
    calls = []
    monkeypatch.setattr(Predictor, "cam", lambda *a, **k: calls.append(1))
    again = cam.reblend(kept, 0.0)
    assert calls == [] and np.array_equal(np.asarray(again), np.asarray(kept[0]))
    assert np.array_equal(np.asarray(cam.reblend(kept, 0.8)), np.asarray(blend_cam(kept[0], kept[1], 0.8)))
    monkeypatch.undo()
    # a chosen class: its caption; a class this checkpoint lacks: back to the top-1
    fish = cam.single(image, "fish", 0.5, best, None, False)
    assert "Grad-CAM for fish (chosen class" in fish[cam.caption].replace("**", "")
    gone = cam.single(image, "dog", 0.5, best, None, False)
    assert "(top-1" in gone[cam.caption] and gone[cam.cls]["value"] == "top-1 (predicted)"


def test_problems_are_said_in_place(setup, tmp_path):
    cam = setup["tab"].cam
    image = Image.new("RGB", (40, 30), "white")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage" * 100)
    out = cam.single_shown(image, "top-1 (predicted)", 0.5, None, str(broken), False)
    assert out[cam.image] is None and out[cam.kept] is None and out[cam.caption].startswith("⚠")
    assert "broken.pt is not a PyTorch checkpoint" in out[cam.caption].replace("\\", "")  # markdown-escaped
    assert cam.single_shown(None, "top-1 (predicted)", 0.5, setup["best"], None, False)[cam.image] is None


def test_gallery_click_shows_that_images_cam(setup):
    tab, best = setup["tab"], setup["best"]
    folder = setup["data"] / "val"
    result = tab.predict_batch(None, str(folder), 2, best, None, False)
    paths = result[tab.cam.gallery_paths]
    assert len(paths) == len(result[tab.batch_gallery]) == 4
    # the gallery's order: its captions end with the names of those paths
    assert all(cap.endswith(p.split("/")[-1]) for (_, cap), p in zip(result[tab.batch_gallery], paths))
    out = tab.cam.gallery(paths, "top-1 (predicted)", 1.0, best, None, False, SimpleNamespace(index=3))
    assert out[tab.cam.batch_caption].replace("\\", "").startswith(paths[3].split("/")[-1] + ": Grad-CAM for")
    assert out[tab.cam.batch_image].size == Image.open(paths[3]).size
    assert tab.cam.gallery(paths, None, 1.0, best, None, False, SimpleNamespace(index=99))[tab.cam.batch_image] is None
