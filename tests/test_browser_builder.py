"""Make a dataset in the browser and watch the trained model on the webcam, in
Chromium with its fake camera (an animated test pattern). One flow: create a
dataset, a class from dropped photos and one from webcam captures (one capture
and a burst), delete a class after confirming, train 2 epochs, and see the
live preview answer. Screenshots (builder.png, live.png) go into assets/ with
UPDATE_SCREENSHOTS=1 (else a temporary folder), as in test_app_browser.py."""
from __future__ import annotations

import re
import time

import pytest

from conftest import FAKE_CAMERA, ROOT, launch_chromium, need_chromium, wait_until
from test_app_browser import ASSETS, choose, configure, free_port, start, wait_js, wait_start_enabled, wait_status

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from demo_app.ui import build_app, launch_options
    base = tmp_path_factory.mktemp("builder_app")
    ckpt, uploads, data = base / "checkpoints", base / "uploads", base / "data"
    demo = build_app(ckpt, data, uploads)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpt, data, uploads))
    try:
        yield {"url": url, "demo": demo, "data": data}
    finally:
        demo.handlers.service.stop(wait=60)
        demo.close()


@pytest.fixture(scope="module")
def page(app):
    sync_api = need_chromium()
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p, *FAKE_CAMERA)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(app["url"])
        pg.wait_for_selector("#train-status")
        try:
            yield pg
        finally:
            browser.close()


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_text(page, elem_id: str, pattern: str, timeout: float = 60) -> str:
    wait_js(page, "([id, p]) => new RegExp(p).test(document.querySelector('#' + id).innerText)", timeout,
            f"#{elem_id} to match {pattern!r} (it shows {text_of(page, elem_id)!r})", arg=[elem_id, pattern])
    return text_of(page, elem_id)


def count_in_overview(page, cls: str) -> int:
    m = re.search(rf"^{re.escape(cls)}\s+(\d+)\s+\d+$", text_of(page, "ds-overview"), re.M)
    return int(m.group(1)) if m else -1


def webcam_on(page, elem_id: str) -> None:
    """Grant the (fake) camera, then press the webcam's ● Record: frames start streaming."""
    page.locator(f"#{elem_id} [title='grant webcam access'] button").click()
    page.locator(f"#{elem_id} button[aria-label='capture photo']").get_by_text("Record").click()
    page.locator(f"#{elem_id} button[aria-label='capture photo']").get_by_text("Stop").wait_for()


def test_build_a_dataset_train_it_and_watch_it_live(page, app):
    data = app["data"]
    page.locator("#ds-builder").get_by_text("Make a dataset here").click()
    page.locator("#ds-new-name input, #ds-new-name textarea").first.fill("Mugs & Cats")
    page.locator("#ds-create").click()
    wait_text(page, "ds-status", "Created")
    assert (data / "Mugs & Cats" / "train").is_dir()

    def add_class(name, said=None):  # (each answer names the class: the previous one cannot match)
        page.locator("#ds-class-name input, #ds-class-name textarea").first.fill(name)
        page.locator("#ds-add-class").click()
        wait_text(page, "ds-status", said or f"Added class {re.escape(name)}\\b")

    add_class("cat")
    add_class("../x", "contains '/'")  # refused, said in the page, nothing written
    add_class("my mug")
    add_class("oops")

    # dropped files: six photos at once (one of them twice: skipped as a duplicate)
    page.locator("#ds-class").get_by_text("cat", exact=True).click()
    photos = sorted((ROOT / "data" / "train" / "cat").glob("*.jpg"))[:6]
    page.locator("#ds-files input[type=file]").set_input_files([str(p) for p in photos] + [str(photos[0])])
    wait_text(page, "ds-status", r"added 6 image")
    assert "1 exact duplicate" in text_of(page, "ds-status")
    wait_until(lambda: count_in_overview(page, "cat") == 6, 30, "the overview to count 6 cats")
    stored = sorted((data / "Mugs & Cats" / "train" / "cat").iterdir())
    assert sorted(p.read_bytes() for p in stored) == sorted(p.read_bytes() for p in photos)  # bytes as they came

    # webcam: one capture adds one image, a burst adds several
    page.locator("#ds-class").get_by_text("my mug", exact=True).click()
    wait_text(page, "ds-overview", "my mug")
    webcam_on(page, "ds-webcam")
    mug = data / "Mugs & Cats" / "train" / "my mug"
    wait_until(lambda: app["demo"].handlers.train.builder._webcam and any(
        p["frame"] for p in app["demo"].handlers.train.builder._webcam.values()), 60, "a first webcam frame")
    page.locator("#ds-capture").click()
    wait_text(page, "ds-status", r"added 1 image")
    assert len(list(mug.iterdir())) == 1
    page.locator("#ds-burst").click()
    wait_until(lambda: len(list(mug.iterdir())) >= 6, 90, "the burst's frames on disk")
    wait_text(page, "ds-status", r"^✔ added 1 image", timeout=90)  # the burst's last frame (no "to go")
    shot = sorted(mug.iterdir())
    assert all(p.suffix == ".jpg" for p in shot)  # the browser's JPEG frames, stored as sent
    page.locator("#ds-webcam button[aria-label='capture photo']").get_by_text("Stop").click()
    wait_js(page, "document.querySelectorAll('#ds-gallery img').length >= 6", 30, "the class's thumbnails")
    page.locator("#ds-builder").screenshot(path=str(ASSETS / "builder.png"))

    # deleting a class asks first
    page.locator("#ds-class").get_by_text("oops", exact=True).click()
    page.locator("#ds-delete").click()
    page.locator("#ds-confirm").wait_for(state="visible")
    assert "Delete class oops and its 0 image(s)?" in text_of(page, "ds-confirm")
    assert (data / "Mugs & Cats" / "train" / "oops").is_dir()  # nothing gone before Yes
    page.locator("#ds-delete-yes").click()
    wait_text(page, "ds-status", "Deleted class oops")
    assert sorted(p.name for p in (data / "Mugs & Cats" / "train").iterdir()) == ["cat", "my mug"]

    # train on it: the form gets its folder and a validation fraction (no val/ images)
    page.locator("#ds-use").click()
    wait_text(page, "dataset-summary", r"2 classes")
    assert page.locator("#data-dir input, #data-dir textarea").first.input_value() == str(data / "Mugs & Cats")
    assert "20% held out" in text_of(page, "dataset-summary")
    configure(page, epochs=2)  # random init, head only, on the CPU; then MobileNetV2, the quicker live model
    choose(page, "arch", "mobilenet_v2")
    page.locator("#policy").get_by_text("Head only (classifier)").click()
    start(page)
    text = wait_status(page, r"Completed|Could not|stopped", timeout=300)
    assert "Completed" in text, text
    wait_start_enabled(page)

    # live preview: the run's best checkpoint is chosen, the webcam streams to it
    live = app["demo"].handlers.train.live
    page.wait_for_function("document.querySelector('#live-ckpt input').value.includes('best_acc.pt')")
    page.locator("#live-preview").scroll_into_view_if_needed()
    webcam_on(page, "live-cam")
    wait_text(page, "live-label", r"(cat|my mug)", timeout=90)
    wait_text(page, "live-rate", r"frames answered per second", timeout=90)
    # the preview asks the camera for 320x240 (cheaper to capture and send than the builder's full frames)
    assert page.evaluate("[document.querySelector('#live-cam video').videoWidth,"
                         " document.querySelector('#live-cam video').videoHeight]") == [320, 240]
    n0, t0 = live.answered, time.monotonic()
    wait_until(lambda: live.answered >= n0 + 3, 60, "three more answered frames")
    rate = (live.answered - n0) / (time.monotonic() - t0)
    print(f"live preview in the browser: {rate:.1f} frames answered per second")
    page.locator("#live-cam-toggle input").check()  # the optional Grad-CAM overlay of each frame
    wait_js(page, "(() => { const i = document.querySelector('#live-cam-overlay img');"
                  " return i && i.complete && i.naturalWidth > 0; })()", 120, "the Grad-CAM overlay")
    page.locator("#live-preview").screenshot(path=str(ASSETS / "live.png"))
    # a second page watches at the same time (a stream holds its slot while its webcam is on)
    other = page.context.browser.new_page(viewport={"width": 1440, "height": 1000})
    other.goto(app["url"])
    other.wait_for_selector("#live-ckpt input")
    other.wait_for_function("document.querySelector('#live-ckpt input').value.includes('best_acc.pt')")
    other.locator("#live-preview").scroll_into_view_if_needed()
    n_first = live.answered
    webcam_on(other, "live-cam")
    wait_text(other, "live-label", r"(cat|my mug)", timeout=90)
    assert live.answered > n_first and "⚠" not in text_of(other, "live-rate")
    other.locator("#live-cam button[aria-label='capture photo']").get_by_text("Stop").click()
    other.close()
    # stopping the webcam stops the answers at once: no queue of old frames is worked off
    page.locator("#live-cam button[aria-label='capture photo']").get_by_text("Stop").click()
    time.sleep(0.5)  # (a frame in flight when Stop was pressed may still be answered)
    stopped = live.answered
    time.sleep(2)
    assert live.answered - stopped <= 1, f"{live.answered - stopped} frames answered after the webcam stopped"
    assert not page.errors, page.errors
