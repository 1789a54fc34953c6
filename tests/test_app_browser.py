"""The Gradio app in a real browser: Playwright (Python) driving Debian's Chromium.

Needs `pip install playwright` and `apt-get install chromium` (/usr/bin/chromium);
`playwright install` cannot download browsers on offline machines. Takes a
screenshot of each tab (train.png, predict.png, model.png): into a temporary
folder, or into assets/ (the README's images) with UPDATE_SCREENSHOTS=1, so an
ordinary test run leaves the checkout unchanged."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from conftest import free_port, launch_chromium, need_chromium

ROOT = Path(__file__).resolve().parent.parent
ASSETS = (ROOT / "assets" if os.environ.get("UPDATE_SCREENSHOTS") == "1"
          else Path(tempfile.gettempdir()) / "tl-resnet18-screenshots")
ASSETS.mkdir(parents=True, exist_ok=True)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def sync_api():
    """Skipped without Chromium or playwright; under CI (CI=true) a failure (conftest.absent)."""
    return need_chromium()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from demo_app.ui import build_app, launch_options
    base = tmp_path_factory.mktemp("browser_app")
    ckpt, uploads, data = base / "checkpoints", base / "uploads", ROOT / "data"
    demo = build_app(ckpt, data, uploads)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpt, data, uploads))
    try:
        yield {"url": url, "demo": demo, "checkpoints": ckpt}
    finally:
        demo.handlers.service.stop(wait=30)
        demo.close()


@pytest.fixture(autouse=True)
def no_run_left(app):
    """A test that failed mid-run leaves no run behind to refuse the next test's Start."""
    yield
    app["demo"].handlers.service.stop(wait=120)


@pytest.fixture(scope="module")
def page(sync_api, app):
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(60_000)  # a loaded 2-core CI machine is slow
        origin = app["url"].rstrip("/")
        pg.outside_requests = []
        pg.on("request", lambda r: pg.outside_requests.append(r.url)
              if not r.url.startswith((origin, "data:", "blob:")) else None)
        pg.goto(app["url"])
        pg.wait_for_selector("#train-status")
        pg.wait_for_function("document.querySelector('#dataset-summary').innerText.includes('classes')")
        try:
            yield pg
        finally:
            browser.close()


def status_text(page) -> str:
    return page.locator("#train-status").inner_text()


def wait_js(page, expression: str, timeout: float, what: str, arg=None) -> None:
    """page.wait_for_function (polled on every animation frame), failing with `what`
    and the status shown. Timeouts are generous: a loaded 2-core CI machine is slow."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function(expression, arg=arg, timeout=timeout * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                             f"status: {status_text(page)!r}") from None


def wait_status(page, pattern: str, timeout: float) -> str:
    """The status once it matches `pattern` (a regex, JavaScript's dialect)."""
    wait_js(page, "(p) => new RegExp(p).test(document.querySelector('#train-status').innerText)",
            timeout, f"the status to match {pattern!r}", arg=pattern)
    return status_text(page)


def start(page) -> None:
    """Press Start and wait until the status shows this new run (not the last one's result)."""
    before = status_text(page)
    page.locator("#start-btn").click()
    wait_js(page, "(b) => document.querySelector('#train-status').innerText !== b", 60,
            "the status to leave the last run's result", arg=before)


def wait_start_enabled(page, timeout: float = 60) -> None:
    """Start comes back (enabled) once the run's stream has ended: its last frame is on the page."""
    wait_js(page, "!document.querySelector('#start-btn').disabled", timeout, "Start to be enabled again")


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def row_count(page, elem_id: str) -> int:
    """Data rows of a gr.Dataframe (its grid's aria-rowcount counts the header too)."""
    return int(page.locator(f"#{elem_id} [role=grid]").get_attribute("aria-rowcount")) - 1


def rows_js(elem_id: str) -> str:
    return f"(+document.querySelector('#{elem_id} [role=grid]').getAttribute('aria-rowcount') - 1)"


def first_column(page, elem_id: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#{elem_id} [role=gridcell][data-col='0']").all_inner_texts()]


PLOT_DATA_JS = """(id) => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  if (!gd || !gd.data) return null;
  return gd.data.map(t => ({name: t.name, n: (t.x || []).length}));
}"""


def trace_points(page, elem_id: str) -> list[int]:
    """Marker points drawn per scatter trace, read from the SVG."""
    traces = page.locator(f"#{elem_id} .js-plotly-plot g.trace.scatter")
    return [traces.nth(i).locator("path.point").count() for i in range(traces.count())]


def fill_text(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a gr.Dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def configure(page, epochs: int, batch_size: int = 8, augment: str = "auto") -> None:
    page.locator("#weights-source").get_by_text("None (random init)").click()
    page.locator("#policy").get_by_text("Head only (fc)").click()
    set_number(page, "epochs", epochs)
    set_number(page, "batch-size", batch_size)
    choose(page, "augment", augment)
    device = page.locator("#device input")
    if not device.count():  # the Advanced accordion is closed: its fields are not on the page
        page.locator("#train-settings").get_by_text("Advanced", exact=True).click()
        device.wait_for()
    if device.input_value() != "cpu":  # a GPU host trains on the CPU too: the same pace as here
        choose(page, "device", "cpu")


def wait_images_loaded(page, selector: str, at_least: int) -> None:
    page.locator(selector).first.scroll_into_view_if_needed()
    wait_js(page, f"""(() => {{
        const imgs = Array.from(document.querySelectorAll('{selector}'));
        imgs.forEach(i => i.loading = 'eager');
        return imgs.length >= {at_least} && imgs.every(i => i.complete && i.naturalWidth > 0); }})()""",
            120, f"{at_least} loaded images in {selector}")
    page.evaluate("window.scrollTo(0, 0)")


# Every change of the epochs table or the charts, as the page showed it: a
# MutationObserver records each state, so a state that lasts one frame is seen
# too (polling could miss it; waiting for the end would not see the live charts).
RECORD_JS = """() => {
  const rows = () => { const g = document.querySelector('#epochs-table [role=grid]');
                       return g ? +g.getAttribute('aria-rowcount') - 1 : null; };
  const points = (id) => { const gd = document.querySelector('#' + id + ' .js-plotly-plot');
    if (!gd || !gd.data) return null;  // per trace: points in Plotly's data, markers drawn in the SVG
    const drawn = Array.from(gd.querySelectorAll('g.trace.scatter')).map(t => t.querySelectorAll('path.point').length);
    return gd.data.map((t, i) => [(t.x || []).length, drawn[i] ?? -1]); };
  window.tlSeen = [];
  const snap = () => {
    const s = {rows: rows(), loss: points('loss-plot'), acc: points('acc-plot'),
               status: document.querySelector('#train-status').innerText};
    const last = window.tlSeen[window.tlSeen.length - 1];
    if (!last || JSON.stringify(last) !== JSON.stringify(s)) window.tlSeen.push(s);
  };
  snap();
  new MutationObserver(snap).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                     characterData: true});
}"""


def seen_live(epoch: int, total: int) -> str:
    """JS: the page showed `epoch` table rows and `epoch` points on both traces of both
    charts (in Plotly's data and drawn) while the status said epoch `epoch` of a run
    still going."""
    return f"""() => window.tlSeen.some(s => s.rows === {epoch}
        && [s.loss, s.acc].every(p => p && p.length >= 2 && p.slice(0, 2).every(([n, drawn]) => n === {epoch}
                                                                               && drawn === {epoch}))
        && s.status.includes('Epoch {epoch}/{total}'))"""


def test_charts_grow_live_and_stop_ends_a_long_run(page, app):
    """The charts are drawn as epochs end, not only at the end: one point per trace
    after epoch 1, two after epoch 2, while the run goes on; then Stop ends it.
    Head only with random crops: nothing is cached, so each epoch runs the backbone
    (seconds here, still far more than the app's MIN_FRAME_S pacing of 0.25 s on
    a fast host; the device is the CPU on a GPU host too)."""
    configure(page, epochs=300, augment="standard")
    page.evaluate(RECORD_JS)
    start(page)
    wait_js(page, seen_live(1, 300), 300, "one point per trace after epoch 1")
    wait_js(page, seen_live(2, 300), 300, "two points per trace after epoch 2")
    seen = page.evaluate("window.tlSeen")
    first = next(i for i, s in enumerate(seen) if s["rows"] == 1)
    assert all(s["rows"] <= 1 for s in seen[:first]), "epoch rows appeared out of order"
    # Start is greyed out while the run trains (a second click would be ignored silently)...
    button = page.locator("#start-btn")
    assert button.is_disabled() and "Training" in button.inner_text()
    page.locator("#stop-btn").click()
    text = wait_status(page, r"Stopped", timeout=60)
    m = re.search(r"after (\d+) completed epoch", text)
    assert m, text
    done = int(m.group(1))
    assert 2 <= done < 300 and "best_acc.pt" in text
    # ...and comes back once the stream has sent its last frame. The Stop button's
    # reply can land before that frame: the table must catch up to the status.
    wait_start_enabled(page)
    assert "Start training" in button.inner_text()
    assert app["demo"].handlers.service.current.done.wait(30), "the run ended"
    wait_js(page, f"{rows_js('epochs-table')} === {done}", 30, f"{done} epoch rows")


def test_a_refused_start_says_why_and_gives_start_back(page, app):
    """A refused Start (here: 0 epochs) raises; Start used to stay greyed out
    until a reload, because .then() does not run after an error."""
    configure(page, epochs=0)
    page.locator("#start-btn").click()
    wait_status(page, r"Training not started", timeout=30)
    wait_start_enabled(page)
    assert "Start training" in page.locator("#start-btn").inner_text()
    # Stop with nothing running leaves the status alone (a pop-up says so)
    page.locator("#stop-btn").click()
    page.get_by_text("No training run is in progress.").first.wait_for(timeout=30_000)
    assert "Training not started" in status_text(page)


def test_a_reloaded_page_follows_the_run_to_its_end(page, app):
    """Reloading during a run used to leave a status that never changed; the
    page now follows the run: its settings, live status, the epoch table, and
    Stop from there ends it with the result."""
    # A run that only ends when stopped: while the server trains, a reload can take
    # longer than a short run (a 3- and a 5-epoch run were over before the page was back).
    configure(page, epochs=300)
    page.locator("#policy").get_by_text("Full fine-tune").click()
    start(page)
    page.reload()
    page.wait_for_selector("#train-status")
    wait_status(page, r"in progress", timeout=120)
    assert page.locator("#epochs input[type=number]").input_value() == "300"  # the run's settings, not the defaults
    wait_js(page, f"{rows_js('epochs-table')} >= 1", 300, "an epoch row on the followed page")
    page.locator("#stop-btn").click()
    text = wait_status(page, r"Stopped", timeout=120)
    done = int(re.search(r"after (\d+) completed epoch", text).group(1))
    wait_js(page, f"{rows_js('epochs-table')} === {done}", 30, f"{done} epoch rows")
    page.wait_for_function("document.querySelector('#dataset-summary').innerText.includes('classes')")


def test_train_two_epochs_fills_both_charts(page, app):
    configure(page, epochs=2)
    start(page)
    text = wait_status(page, r"Completed", timeout=300)
    assert "Best epoch" in text and "best_acc.pt" in text
    assert row_count(page, "epochs-table") == 2
    grid = page.locator("#epochs-table [role=grid]").inner_text()  # losses and accuracies with 4 decimals
    assert len(re.findall(r"(?<![\d.])\d+\.\d{4}(?![\d])", grid)) == 2 * 4, grid
    for plot in ("loss-plot", "acc-plot"):
        page.wait_for_function(f"(() => {{ const d = ({PLOT_DATA_JS})('{plot}');"
                               f" return d && d.length >= 2 && d[0].n === 2 && d[1].n === 2; }})()")
        data = page.evaluate(PLOT_DATA_JS, plot)
        names = [d["name"] for d in data]
        assert any(n.endswith("train") for n in names) and any(n.endswith("val") for n in names), names
        assert trace_points(page, plot)[:2] == [2, 2], f"{plot}: one point per epoch expected"

    # Compare policies: overlay the earlier (stopped) run on the accuracy chart
    current = re.search(r"/([^/]+)/best_acc\.pt", text).group(1)
    page.locator("#compare input").click()
    options = page.get_by_role("option")
    earlier = [t for t in options.all_inner_texts() if not t.startswith(current)]
    assert earlier, options.all_inner_texts()
    options.filter(has_text=earlier[0]).click()
    page.keyboard.press("Escape")
    page.wait_for_function(f"(() => {{ const d = ({PLOT_DATA_JS})('acc-plot'); return d && d.length === 3; }})()")
    assert page.evaluate(PLOT_DATA_JS, "acc-plot")[2]["n"] >= 1
    page.locator("#header").click()
    page.screenshot(path=str(ASSETS / "train.png"), full_page=True)


def test_local_weights_file_run(page, app, mobilenet_weights):
    """The 'Local file' weights path in the UI, with real ImageNet MobileNetV2 weights
    (../shared: skipped where absent, a failure under CI). Its curves make the README screenshot."""
    weights = mobilenet_weights
    choose(page, "arch", "mobilenet_v2")
    assert not page.locator("#weights-path").is_visible()
    page.locator("#weights-source").get_by_text("Local file").click()
    page.locator("#weights-path").wait_for(state="visible")
    fill_text(page, "weights-path", str(weights))
    page.locator("#policy").get_by_text("Head only (classifier)").click()
    page.wait_for_function("document.querySelector('#policy-info').innerText.includes('2,562')")  # 1280*2+2
    set_number(page, "epochs", 6)
    set_number(page, "batch-size", 8)
    start(page)
    text = wait_status(page, r"Completed|Could not", timeout=300)
    assert "Completed" in text, text
    assert row_count(page, "epochs-table") == 6
    best = float(re.search(r"val_acc (\d\.\d+)", text).group(1))
    assert best >= 0.75, f"pretrained features should reach a good val accuracy, got {best}"
    # the earlier run picked under "Compare policies" stays overlaid on the new curves
    page.wait_for_function(f"(() => {{ const d = ({PLOT_DATA_JS})('acc-plot'); return d && d.length === 3"
                           f" && d[0].n === 6 && d[2].n >= 1; }})()")
    page.locator("#header").click()
    page.screenshot(path=str(ASSETS / "train.png"), full_page=True)


def test_predict_tab_labels_an_uploaded_image(page, app, tmp_path, sync_api):
    page.get_by_role("tab", name="Predict").click()
    page.wait_for_function("document.querySelector('#checkpoint input').value.includes('best_acc.pt')")
    page.wait_for_function("document.querySelector('#checkpoint-info').innerText.includes('classes: cat, fish')")
    image = sorted((ROOT / "data" / "val" / "fish").glob("*.jpg"))[0]
    page.locator("#predict-image input[type=file]").set_input_files(str(image))
    page.wait_for_function("/(cat|fish)/.test(document.querySelector('#predict-label').innerText)"
                           " && document.querySelector('#predict-time').innerText.includes('ms')")
    assert re.search(r"\d+%", page.locator("#predict-label").inner_text())

    page.locator("#batch-folder input, #batch-folder textarea").first.fill(str(ROOT / "data" / "val"))
    page.locator("#batch-btn").click()
    page.wait_for_function(f"{rows_js('batch-table')} === 32", timeout=60_000)
    wait_images_loaded(page, "#batch-gallery img", 32)

    # click-to-predict: an example from the dataset's val split replaces the uploaded image
    wait_images_loaded(page, "#examples img", 8)
    from core.predict import Predictor, list_images
    from demo_app.runs import checkpoint_choices
    example = list_images(ROOT / "data" / "val" / "cat")[0]  # the first thumbnail
    (label, p), _ = Predictor.load(checkpoint_choices(app["checkpoints"])[0][1]).predict_image(example, 2)
    uploaded_src = page.locator("#predict-image img").first.get_attribute("src")
    page.locator("#examples button.thumbnail-item").first.click()
    page.wait_for_function(f"document.querySelector('#predict-image img').src !== {uploaded_src!r}")
    percents = {f"{int(p * 100)}%", f"{round(p * 100)}%"}
    shows_core_result = f"""(() => {{
        const top = document.querySelector('#predict-label [data-testid=label-output-value]');
        const text = document.querySelector('#predict-label').innerText;
        return top && top.innerText.trim() === {label!r} && {sorted(percents)!r}.some(x => text.includes(x)); }})()"""
    try:
        page.wait_for_function(shows_core_result, timeout=15_000)
    except sync_api.TimeoutError:
        shown = page.locator("#predict-label").inner_text()
        raise AssertionError(f"expected {label} {percents} (core's prediction), the page shows {shown!r}") from None
    assert "32" in page.locator("#batch-summary").inner_text()
    page.screenshot(path=str(ASSETS / "predict.png"), full_page=True)

    # choosing another checkpoint re-labels the image on screen (it used to keep the old model's answer)
    def percents_of(p):
        return sorted({f"{int(p * 100)}%", f"{round(p * 100)}%"})

    for other_label, other_path in checkpoint_choices(app["checkpoints"])[1:]:
        (label2, p2), _ = Predictor.load(other_path).predict_image(example, 2)
        if percents_of(p2) != sorted(percents):
            break
    else:
        pytest.fail("every checkpoint gives the same answer; nothing to tell apart")
    choose(page, "checkpoint", other_label)
    page.wait_for_function(f"""(() => {{
        const top = document.querySelector('#predict-label [data-testid=label-output-value]');
        const text = document.querySelector('#predict-label').innerText;
        return top && top.innerText.trim() === {label2!r} && {percents_of(p2)!r}.some(x => text.includes(x)); }})()""",
                           timeout=15_000)
    # ...and clears the batch results, which were the other model's
    page.wait_for_function("document.querySelector('#batch-summary').innerText.includes('The checkpoint changed')")
    assert page.evaluate(rows_js("batch-table")) == 0

    # a file that is no image: the old label goes, the reason stands in its place
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a photo")
    page.locator("#predict-image input[type=file]").set_input_files(str(not_image))
    page.wait_for_function("document.querySelector('#predict-time').innerText.includes('Not an image')")
    assert "notes.jpg: not an image file" in page.locator("#predict-time").inner_text()
    assert page.locator("#predict-label [data-testid=label-output-value]").count() == 0


def test_model_tab_shows_the_layers(page):
    page.get_by_role("tab", name="Model").click()
    choose(page, "model-arch", "resnet18")  # the Train tab may have switched it to mobilenet_v2
    page.wait_for_function("document.querySelector('#model-totals').innerText.includes('11,177,538')")
    page.wait_for_function(f"{rows_js('model-table')} >= 10")
    page.wait_for_function("document.querySelectorAll('#model-table [role=gridcell][data-col=\\'0\\']').length >= 18")
    names = first_column(page, "model-table")
    for layer in ("conv1", "bn1", "maxpool", "fc"):
        assert layer in names, names
    assert "1000 outputs" in page.locator("#model-base").inner_text()
    assert "2 outputs" in page.locator("#model-transfer").inner_text()
    page.locator("#model-policy").get_by_text("Full fine-tune").click()
    page.wait_for_function("document.querySelector('#model-totals').innerText.includes('100.00%')")
    page.locator("#model-policy").get_by_text("Head only (fc)").click()
    page.wait_for_function("document.querySelector('#model-totals').innerText.includes('1,026')")
    page.locator("#model-policy").get_by_text("Last stage + head").click()
    page.wait_for_function("document.querySelector('#model-totals').innerText.includes('8,394,754')")
    page.screenshot(path=str(ASSETS / "model.png"), full_page=True)


def test_page_made_no_outside_requests(page):
    assert page.outside_requests == []
