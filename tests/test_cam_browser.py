"""Grad-CAM in the Predict tab, in a real browser (Playwright + Debian's Chromium):
a prediction shows the heatmap overlay beside the label, the opacity slider
re-blends it, the class choice changes it, and clicking an image in the batch
gallery shows that image's CAM. The checkpoint: ResNet-18, random init, head
trained one epoch on data/ (the overlay's content is checked against core.cam,
whatever the model learned)."""
from __future__ import annotations

import io
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, ROOT, launch_chromium, need_chromium, train_config, train_run

DATA = ROOT / "data"
SHOTS = Path(tempfile.gettempdir()) / "tl-resnet18-screenshots"
SHOTS.mkdir(parents=True, exist_ok=True)
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    sync_api = need_chromium()
    from demo_app.ui import build_app, launch_options
    base = tmp_path_factory.mktemp("cam_app")
    ckpt, uploads = base / "checkpoints", base / "uploads"
    _, _, end = train_run(train_config(DATA, ckpt, epochs=1, batch_size=16, policy="head", cache="auto",
                                       augment="none"))
    assert end.status == "completed"
    demo = build_app(ckpt, DATA, uploads)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpt, DATA, uploads))
    try:
        with sync_api.sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.set_default_timeout(60_000)  # a loaded 2-core machine is slow
            page.goto(url)
            yield {"page": page, "url": url, "best": f"{end.run_dir}/best_acc.pt"}
            browser.close()
    finally:
        demo.handlers.service.stop(wait=30)
        demo.close()


def shown_image(page, elem_id: str) -> np.ndarray:
    """The picture a gr.Image shows, fetched from the server as the browser did."""
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    with urllib.request.urlopen(src, timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), np.int16)


def core_cam(best, path, class_name=None):
    from core.cam import cam_for_image
    from core.images import load_rgb
    from core.predict import Predictor
    pred = Predictor.load(best)
    rgb = load_rgb(path)
    label = class_name or pred.predict_image(rgb, 1)[0][0]
    m = pred.cam(pred.preprocess(rgb)[None], [pred.class_names.index(label)])[0]
    return rgb, cam_for_image(m, rgb, pred.resize, pred.crop), label


def test_a_prediction_shows_its_cam_overlay(app, tmp_path):
    from core.cam import blend_cam
    page, best = app["page"], app["best"]
    page.get_by_role("tab", name="Predict").click()
    page.wait_for_function("document.querySelector('#checkpoint-info').innerText.includes('classes: cat, fish')")
    image = DATA / "val" / "fish" / "fish_005.jpg"
    page.locator("#predict-image input[type=file]").set_input_files(str(image))
    page.wait_for_function("document.querySelector('#cam-caption').innerText.includes('Grad-CAM for')"
                           " && document.querySelector('#cam-image img')")
    rgb, cam, label = core_cam(best, image)
    assert f"Grad-CAM for {label} (top-1" in page.locator("#cam-caption").inner_text()
    assert page.locator("#predict-label").inner_text().count(label) >= 1
    # the overlay is core's CAM of this image blended at opacity 0.5, at the image's size
    shown = shown_image(page, "cam-image")
    assert shown.shape == (256, 256, 3)
    assert np.abs(shown - np.asarray(blend_cam(rgb, cam, 0.5), np.int16)).mean() < 2
    assert np.abs(shown - np.asarray(rgb, np.int16)).mean() > 10  # a heatmap is on it
    page.screenshot(path=str(SHOTS / "predict_cam.png"), full_page=True)

    # the opacity slider re-blends: at 0 the photo itself
    before = page.locator("#cam-image img").first.get_attribute("src")
    box = page.locator("#cam-opacity input[type=number]")
    box.fill("0")
    box.press("Enter")
    page.wait_for_function(f"document.querySelector('#cam-image img').src !== {before!r}")
    assert np.abs(shown_image(page, "cam-image") - np.asarray(rgb, np.int16)).max() <= 1

    # another class: its own map
    other = "cat" if label == "fish" else "fish"
    page.locator("#cam-class input").click()
    page.get_by_role("option", name=other, exact=True).click()
    page.wait_for_function(f"document.querySelector('#cam-caption').innerText.includes('Grad-CAM for {other} (chosen')")
    box.fill("1")
    box.press("Enter")
    _, cam2, _ = core_cam(best, image, other)
    expected = np.asarray(blend_cam(rgb, cam2, 1.0), np.int16)
    for _ in range(100):  # the re-blend arrives after the slider's event
        if np.abs(shown_image(page, "cam-image") - expected).mean() < 2:
            break
        page.wait_for_timeout(200)
    assert np.abs(shown_image(page, "cam-image") - expected).mean() < 2

    # the batch gallery: a click shows that image's CAM
    page.locator("#cam-class input").click()
    page.get_by_role("option", name="top-1 (predicted)", exact=True).click()
    page.locator("#batch-folder input, #batch-folder textarea").first.fill(str(DATA / "val" / "cat"))
    page.locator("#batch-btn").click()
    page.wait_for_function("document.querySelectorAll('#batch-gallery button.thumbnail-item').length === 16")
    page.locator("#batch-gallery button.thumbnail-item").nth(2).click()
    page.wait_for_function("document.querySelector('#batch-cam-caption').innerText.includes('Grad-CAM for')"
                           " && document.querySelector('#batch-cam-image img')")
    caption = page.locator("#batch-cam-caption").inner_text()
    name = caption.split(":")[0].strip()
    assert (DATA / "val" / "cat" / name).is_file(), caption
    rgb, cam, _ = core_cam(best, DATA / "val" / "cat" / name)
    assert np.abs(shown_image(page, "batch-cam-image") - np.asarray(blend_cam(rgb, cam, 1.0), np.int16)).mean() < 2
    # ...the clicked thumbnail's image (its caption ends with the file name)
    title = page.locator("#batch-gallery button.thumbnail-item").nth(2).locator("img").get_attribute("title")
    assert title.endswith(f"· {name}"), (title, caption)
