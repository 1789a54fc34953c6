"""The Gradio app through its HTTP API: launched in-process on 127.0.0.1 and
driven with gradio_client, the way a remote program (or the browser) uses it."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from conftest import free_port, make_image_dataset, wait_until

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from demo_app.ui import build_app, launch_options
    base = tmp_path_factory.mktemp("api_app")
    ckpt, uploads = base / "checkpoints", base / "uploads"
    demo = build_app(ckpt, DATA, uploads)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpt, DATA, uploads))
    client = Client(url, analytics_enabled=False, verbose=False, download_files=str(base / "downloads"))
    try:
        yield {"url": url, "client": client, "demo": demo, "checkpoints": ckpt, "uploads": uploads,
               "service": demo.handlers.service}
    finally:
        demo.handlers.service.stop(wait=30)
        client.close()
        demo.close()


def built(tmp_path, data=DATA, **kw):
    """The handlers of a freshly built (not launched) app with folders of its own
    and its own training service: its tabs, called directly as the page would."""
    from demo_app.ui import build_app
    return build_app(tmp_path / "ck", data, tmp_path / "up", **kw).handlers


def start(tabs, data, **settings):
    """The Train tab's Start stream (a generator of {component: value} frames) for a
    small CPU run from random init; `settings` override the form's defaults."""
    return tabs.train.run.start(compare=[], **{"data_dir": str(data), "weights_source": "none", "seed": 7,
                                               "device": "cpu", **settings})


def finished(tabs) -> bool:
    """The service's last run is over (the worker sets `done` just before releasing the lock)."""
    return tabs.service.current is None or tabs.service.current.done.is_set()


def train_job(client, **kw):
    args = {"data_dir": str(DATA), "weights_source": "none", "epochs": 2, "batch_size": 8, "policy": "head"}
    args.update(kw)
    return client.submit(api_name="/train", **args)


# Outputs of /train over the API (gr.State is not part of it):
STATUS, LOSS, ACC, TABLE, LOG, COMPARE, CHECKPOINT = range(7)


def table_rows(out) -> list:
    t = out[TABLE]
    return (t.get("data") if isinstance(t, dict) else t) or []


def plot_traces(out, idx) -> list[dict]:
    plot = out[idx]
    fig = json.loads(plot["plot"]) if isinstance(plot.get("plot"), str) else plot["plot"]
    return fig["data"]


@pytest.fixture(scope="module")
def trained(app):
    """One 2-epoch run on the demo data; every streamed output is kept."""
    job = train_job(app["client"])
    final = job.result(timeout=300)
    return {"outputs": job.outputs(), "final": final}


def run_dir_of(status: str) -> Path:
    return Path(re.search(r"`([^`]+)/best_acc\.pt`", status).group(1))


def as_shown(markdown: str) -> str:
    """The text a Markdown output shows: user strings in it are escaped
    (demo_app/text.py), so tests read the rendering, as the page does."""
    import html

    from markdown_it import MarkdownIt
    out = MarkdownIt("commonmark").enable("table").render(markdown)
    return html.unescape(re.sub(r"<[^>]+>", "", out))


# ---------------------------------------------------------------- training

def test_train_streams_one_update_per_epoch(trained, app):
    outs, final = trained["outputs"], trained["final"]
    sizes = [len(table_rows(o)) for o in outs]
    assert 1 in sizes and 2 in sizes, f"expected an update after epoch 1 and after epoch 2, got table sizes {sizes}"
    assert sizes == sorted(sizes), "epoch rows only ever grow"
    assert "Completed" in final[STATUS] and "Best epoch" in final[STATUS]
    rows = table_rows(final)
    assert [r[0] for r in rows] == [1, 2]
    assert all(0 <= r[2] <= 1 and 0 <= r[4] <= 1 for r in rows)
    # shown with fixed decimals (an accuracy of 1.0 used to read "1" beside "0.9688")
    shown = final[TABLE]["metadata"]["display_value"]
    assert all(re.fullmatch(r"\d+\.\d{4}", cell) for row in shown for cell in row[1:5]), shown
    for idx in (LOSS, ACC):
        traces = plot_traces(final, idx)
        assert [len(t["x"]) for t in traces[:2]] == [2, 2], "train and val curves with one point per epoch"
    assert "EPOCH 1/2" in final[LOG] and "EPOCH 2/2" in final[LOG] and "BEST:" in final[LOG]

    run = run_dir_of(final[STATUS])
    assert run.parent == app["checkpoints"]
    for name in ("best_acc.pt", "best_loss.pt", "latest.pt", "metrics.csv", "args.json"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
    assert final[CHECKPOINT]["value"] == str(run / "best_acc.pt"), "the Predict tab preselects the new run"
    assert run.name in [c[1] for c in final[COMPARE]["choices"]]
    assert finished(app["demo"].handlers)


@pytest.mark.parametrize("min_frame_s", [0.0, 3600.0])
def test_fast_epochs_are_coalesced_into_fewer_frames_without_losing_rows(tmp_path, monkeypatch, min_frame_s):
    """Epoch frames are spaced MIN_FRAME_S apart; every frame carries the whole
    history, so held-back epochs appear in the next frame and all in the last."""
    from demo_app import tab_train_run
    monkeypatch.setattr(tab_train_run, "MIN_FRAME_S", min_frame_s)
    data = make_image_dataset(tmp_path / "ds")
    tabs = built(tmp_path, data)
    run = tabs.train.run
    frames = list(start(tabs, data, epochs=5, batch_size=4))
    epoch_frames = [f for f in frames if f[run.status].startswith("▶ Epoch")]
    rows = [len(f[run.epochs_table].data) for f in frames]  # a Styler over the table
    assert len(epoch_frames) == (5 if min_frame_s == 0 else 1)
    assert rows == sorted(rows) and rows[-1] == 5 and "Completed" in frames[-1][run.status]
    assert all(f"EPOCH {e}/5" in frames[-1][run.log_box] for e in range(1, 6))


def test_mixed_precision_checkbox_reaches_the_engine(tmp_path):
    data = make_image_dataset(tmp_path / "ds")
    tabs = built(tmp_path, data)
    final = list(start(tabs, data, policy="last", epochs=1, batch_size=4, amp=True))[-1]
    assert "Completed" in final[tabs.train.run.status]
    assert "NOTE: --amp 1" in final[tabs.train.run.log_box]  # bf16 here, or "no effect" on a CPU without it: said either way
    run = run_dir_of(final[tabs.train.run.status])
    assert json.loads((run / "args.json").read_text())["amp"] is True


def test_stop_mid_epoch_keeps_completed_epochs_and_refuses_a_second_start(trained, app):
    from core.checkpoint import read_checkpoint
    client = app["client"]
    # Full fine-tune: slow batches, so Stop lands in the middle of an epoch.
    job = train_job(client, policy="full", epochs=50, batch_size=4)
    def first_epoch_shown():
        assert not job.done(), job.result()
        return any(len(table_rows(o)) >= 1 for o in job.outputs())
    wait_until(first_epoch_shown, 240, "the first epoch's row")

    # Only one run at a time: a second Start is refused with a clear message.
    with pytest.raises(AppError, match="already in progress"):
        train_job(client).result(timeout=60)

    # Predict keeps working while training runs.
    ckpt = trained["final"][CHECKPOINT]["value"]
    label, _ = client.predict(handle_file(sorted((DATA / "val" / "cat").glob("*.jpg"))[0]), 2, ckpt, None, False,
                              api_name="/predict")
    assert label["label"] in ("cat", "fish")

    h = app["service"].current  # into epoch 2: wait for a trained batch of it, not a guessed delay
    wait_until(lambda: h.epoch == 2 and h.phase == "train" and h.progress[0] >= 1, 240, "a trained batch of epoch 2")
    t0 = time.monotonic()
    stop_status = client.predict(api_name="/stop")
    final = job.result(timeout=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"Stop took {elapsed:.1f} s"  # one batch of 4 at most, with headroom for a busy CI box
    for status in (stop_status, final[STATUS]):
        assert "Stopped" in status, status
        assert re.search(r"during (validation of )?epoch 2", status), status
        assert "after 1 completed epoch" in status
    assert len(table_rows(final)) == 1
    assert [len(t["x"]) for t in plot_traces(final, ACC)[:2]] == [1, 1], "partial curves"

    run = run_dir_of(final[STATUS])
    ck = read_checkpoint(run / "latest.pt")
    assert ck["epoch"] == 1 and ck["policy"] == "full"
    assert read_checkpoint(run / "best_acc.pt")["epoch"] == 1
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2
    assert finished(app["demo"].handlers)
    assert client.predict(api_name="/stop") == "No training run is in progress."


def test_imagenet_weights_offline_gives_the_fix(app):
    with pytest.raises(AppError) as e:
        train_job(app["client"], weights_source="imagenet").result(timeout=120)
    msg = str(e.value)
    assert "ImageNet weights for resnet18 are not cached and cannot be downloaded (TL_OFFLINE=1 is set" in msg and "'Pretrained weights' = None (random init)" in msg
    assert "--weights" not in msg  # the app's field, not the CLI flag
    assert "Traceback" not in msg
    assert finished(app["demo"].handlers)


def test_bad_settings_are_refused_before_training(app):
    with pytest.raises(AppError, match="'Epochs' must be an integer from 1"):
        train_job(app["client"], epochs=0).result(timeout=60)
    for field in ("epochs", "batch_size", "seed"):  # a fraction is refused, not silently rounded
        label = field.replace("_", " ").capitalize()
        with pytest.raises(AppError, match=f"'{label}' must be a whole number"):
            train_job(app["client"], **{field: 1.5}).result(timeout=60)
        with pytest.raises(AppError, match=f"'{label}' is empty: enter a whole number"):
            train_job(app["client"], **{field: None}).result(timeout=60)
    with pytest.raises(AppError, match="needs the path of a state_dict"):
        train_job(app["client"], weights_source="local file", weights_path="").result(timeout=60)
    with pytest.raises(AppError, match="does not exist"):
        train_job(app["client"], data_dir=str(DATA / "nope")).result(timeout=60)


def test_a_weights_path_is_checked_like_the_clis(tmp_path):
    """The weights box is checked by core's check_model_file: a device is not a file
    (it used to be said not to exist), an empty file is said to be empty."""
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    tabs = built(tmp_path)
    for path, said in (("/dev/zero", "/dev/zero is not a regular file"), (str(empty), "is empty (0 bytes)"),
                       (str(tmp_path / "no.pth"), "does not exist")):
        with pytest.raises(gr.Error, match=re.escape(said)):
            list(start(tabs, DATA, weights_source="local file", weights_path=path))


def test_local_weights_file_transfer_learns(app, mobilenet_weights, catfish_mini):
    """Real ImageNet MobileNetV2 weights from a local file: head-only training on real photos works."""
    final = train_job(app["client"], data_dir=str(catfish_mini), arch="mobilenet_v2", weights_source="local file",
                      weights_path=str(mobilenet_weights), epochs=2, batch_size=16).result(timeout=300)
    assert "Completed" in final[STATUS], final[STATUS]
    assert max(r[4] for r in table_rows(final)) >= 0.8, "pretrained features should separate cats from fish"


# ---------------------------------------------------------------- dataset

def test_check_dataset_counts_and_errors(app):
    summary = app["client"].predict(str(DATA), 0, 1337, api_name="/check_dataset")
    assert "**2 classes**" in summary
    assert "| cat | 20 | 16 |" in summary and "| fish | 20 | 16 |" in summary
    # a problem replaces the summary (a pop-up would fade and leave the last good one saying all is well)
    missing = app["client"].predict(str(DATA / "missing"), 0, 1337, api_name="/check_dataset")
    assert missing.startswith("⚠ **Dataset problem:**") and "does not exist" in missing
    for bad in (5, -0.5):  # refused when checked, not first at Start
        said = app["client"].predict(str(DATA), bad, 1337, api_name="/check_dataset")
        assert said.startswith("⚠") and "fraction between 0 and 1" in said
    # an emptied folder box is said, not silently replaced by the demo set
    empty = app["client"].predict("  ", 0, 1337, api_name="/check_dataset")
    assert empty.startswith("⚠") and "'Dataset folder' is empty" in as_shown(empty) and "**2 classes**" not in empty
    with pytest.raises(AppError, match="'Dataset folder' is empty"):
        train_job(app["client"], data_dir="").result(timeout=60)
    # the dataset's warnings name the app's fields, not the CLI's flags
    ignored = as_shown(app["client"].predict(str(DATA), 0.5, 1337, api_name="/check_dataset"))
    assert "'Validation fraction (Advanced)' 0.5 ignored" in ignored and "--val-split" not in ignored


def test_dataset_zip_upload(app, tmp_path):
    ds = make_image_dataset(tmp_path / "mini", n_train=3, n_val=2)
    zpath = tmp_path / "mini.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(ds.rglob("*.jpg")):
            z.write(p, Path("mini") / p.relative_to(ds))
    folder, summary = app["client"].predict(handle_file(zpath), 0, 1337, api_name="/upload_dataset_zip")
    assert Path(folder).parent.parent == app["uploads"] and (Path(folder) / "train" / "cat").is_dir()
    assert "**2 classes**" in summary and "| cat | 3 | 2 |" in summary and "very few training images" in summary
    # the same zip again: its earlier extraction, not another copy; another zip: a folder of its own
    again, said = app["client"].predict(handle_file(zpath), 0, 1337, api_name="/upload_dataset_zip")
    assert again == folder and said.startswith("The same zip as before: using its extraction")
    assert len([p for p in app["uploads"].iterdir() if p.is_dir()]) == 1
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        for p in sorted(ds.rglob("*.jpg"))[1:]:
            z.write(p, p.relative_to(ds))
    other, _ = app["client"].predict(handle_file(tmp_path / "other.zip"), 0, 1337, api_name="/upload_dataset_zip")
    assert other != folder and (Path(other) / "train").is_dir()
    assert len([p for p in app["uploads"].iterdir() if p.is_dir()]) == 2


def test_bad_zip_uploads_give_clear_errors(app, tmp_path):
    """Refused in the summary (raised, the error badged the folder box and hid its path)."""
    def refusal(path) -> str:
        _, summary = app["client"].predict(handle_file(path), 0, 1337, api_name="/upload_dataset_zip")
        assert summary.startswith("⚠ **Zip refused:**"), summary
        assert summary.endswith("The Dataset folder above is unchanged.")
        return as_shown(summary)
    not_zip = tmp_path / "photos.zip"
    not_zip.write_bytes(b"this is not a zip")
    assert "photos.zip is not a zip file" in refusal(not_zip)
    no_train = tmp_path / "flat.zip"
    with zipfile.ZipFile(no_train, "w") as z:
        z.writestr("cat/a.jpg", b"x")
    assert "no train/ folder" in refusal(no_train)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../train/cat/a.jpg", b"x")
    assert "escapes its folder" in refusal(evil)
    # extracted but without val/: the folder box points at it and the fix names the app's field
    no_val = tmp_path / "noval.zip"
    ds = make_image_dataset(tmp_path / "nv", n_train=3, val=False)
    with zipfile.ZipFile(no_val, "w") as z:
        for p in sorted(ds.rglob("*.jpg")):
            z.write(p, p.relative_to(ds))
    folder, summary = app["client"].predict(handle_file(no_val), 0, 1337, api_name="/upload_dataset_zip")
    assert (Path(folder) / "train" / "cat").is_dir() and "val is missing" in summary
    assert "'Validation fraction (Advanced)' = 0.2 to hold out" in as_shown(summary) and "--val-split" not in summary
    fixed = app["client"].predict(folder, 0.25, 1337, api_name="/check_dataset")  # the fix it names works
    assert "**2 classes**" in fixed


# ---------------------------------------------------------------- predict

def test_predict_confidences_sum_to_one(trained, app):
    ckpt = trained["final"][CHECKPOINT]["value"]
    image = sorted((DATA / "val" / "fish").glob("*.jpg"))[0]
    label, timing = app["client"].predict(handle_file(image), 2, ckpt, None, False, api_name="/predict")
    conf = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(conf) == {"cat", "fish"}
    assert sum(conf.values()) == pytest.approx(1.0, abs=1e-4)
    assert label["label"] == max(conf, key=conf.get)
    assert re.search(r"\d+ ms", timing)
    top1, _ = app["client"].predict(handle_file(image), 1, ckpt, None, False, api_name="/predict")
    assert len(top1["confidences"]) == 1


def test_predict_batch_table_gallery_and_csv(trained, app, tmp_path):
    ckpt = trained["final"][CHECKPOINT]["value"]
    junk = tmp_path / "notes.jpg"
    junk.write_text("not really an image")
    good = sorted((DATA / "val" / "cat").glob("*.jpg"))[:2]
    table, gallery, csv_path, summary = app["client"].predict(
        [handle_file(p) for p in good + [junk]], str(DATA / "val"), 2, ckpt, None, False, api_name="/predict_batch")
    rows = table["data"]
    assert len(rows) == 3 + 32
    assert [r[0] for r in rows[:3]] == [good[0].name, good[1].name, "notes.jpg"]
    assert "not a supported image" in rows[2][4], "an unreadable file is reported, not fatal"
    assert all(r[1] in ("cat", "fish") and 0.5 <= r[2] <= 1 for r in rows if not r[4])
    shown = [r[2] for r in table["metadata"]["display_value"]]  # p with fixed decimals, blank for a failure
    assert shown[2] == "" and all(re.fullmatch(r"[01]\.\d{4}", v) for i, v in enumerate(shown) if i != 2), shown
    assert len(gallery) == 34 and all(re.match(r"(✗ \(folder: (cat|fish)\) )?(cat|fish) \d+% · ", g["caption"])
                                      for g in gallery)
    lines = Path(csv_path).read_text().strip().splitlines()
    assert lines[0].startswith("file,path,top1,p,topk,error") and len(lines) == 36
    assert "34" in summary and "could not be read" in summary
    assert summary.endswith(f"by `{Path(ckpt).parent.name}/best_acc.pt`")  # which model said so
    # the folder's val/<class>/ images are checked against their folder names, the uploads are not;
    # the count agrees with the engine's own validation of this checkpoint
    import torch

    from core.metrics import per_class
    from demo_app.text import md_text
    saved = torch.load(ckpt, weights_only=True)
    right = sum(r["correct"] for r in per_class(saved["val_confusion"], saved["class_names"]))
    assert f"against the folder names: **{right}/32** right" in summary, summary
    checks = [r[5] for r in rows]
    assert checks[:3] == ["", "", ""] and checks[3:].count("✓") == right
    assert all(c == "✓" or re.fullmatch(r"✗ folder: (cat|fish)", c) for c in checks[3:])
    wrong = [r for r in rows[3:] if r[5] != "✓"]
    assert all(r[5].split()[-1] != r[1] and f"{r[5].split()[-1]}/" in r[0] for r in wrong)
    if wrong:  # listed in the summary, and first in the gallery
        assert f"wrong: {md_text(wrong[0][0])} → {wrong[0][1]}" in summary
        assert gallery[0]["caption"].startswith("✗ (folder: ") and wrong[0][0] in gallery[0]["caption"]
    assert lines[0].endswith(",folder_class") and lines[1].endswith(",") and lines[-1].rsplit(",", 1)[1] == "fish"


def test_predict_errors_are_clear(trained, app, tmp_path):
    client = app["client"]
    image = handle_file(sorted((DATA / "val" / "cat").glob("*.jpg"))[0])
    with pytest.raises(AppError, match="No checkpoint selected"):
        client.predict(image, 2, None, None, False, api_name="/predict")
    text = tmp_path / "readme.png"
    text.write_text("hello, not an image")
    with pytest.raises(AppError, match="readme.png: not an image file"):
        client.predict(handle_file(text), 2, trained["final"][CHECKPOINT]["value"], None, False, api_name="/predict")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(AppError, match=r"broken.pt is not a PyTorch checkpoint .* it looks like some other binary data"):
        client.predict(image, 2, None, handle_file(broken), False, api_name="/predict")
    with pytest.raises(AppError, match="add some images first"):
        client.predict([], "", 2, trained["final"][CHECKPOINT]["value"], None, False, api_name="/predict_batch")


def test_a_full_model_loads_only_where_the_server_allows_pickles(trained, app, tmp_path):
    """Unpickling runs the file's code: a default server refuses it whatever the
    client sends as 'trust'; started with --allow-pickle-uploads, Trust pickle works."""
    from PIL import Image

    from core.access import AccessPolicy
    from core.checkpoint import export_full_model, model_from_checkpoint, read_checkpoint
    ckpt = trained["final"][CHECKPOINT]["value"]
    full = export_full_model(model_from_checkpoint(read_checkpoint(ckpt)), ["cat", "fish"], tmp_path / "full.pt")
    cat = sorted((DATA / "val" / "cat").glob("*.jpg"))[0]
    for trust in (False, True):
        with pytest.raises(AppError, match="pickled Python objects.*does not load such files.*--allow-pickle-uploads"):
            app["client"].predict(handle_file(cat), 2, None, handle_file(full), trust, api_name="/predict")
    owner = built(tmp_path, policy=AccessPolicy.make(False, allow_pickle=True)).predict
    with pytest.raises(gr.Error, match="tick 'Trust pickle'"):
        owner.predict(Image.open(cat), 2, None, str(full), False)
    assert set(owner.predict(Image.open(cat), 2, None, str(full), True)[owner.label]) == {"cat", "fish"}


def test_refresh_checkpoints_preselects_newest_best_acc(trained, app):
    update = app["client"].predict(None, api_name="/refresh_checkpoints")
    newest = max((p for p in app["checkpoints"].iterdir() if (p / "metrics.csv").exists()),
                 key=lambda p: (p / "metrics.csv").stat().st_mtime)
    assert update["value"] == str(newest / "best_acc.pt")
    # each label names the epoch its file really holds, and that epoch's metric
    from core.checkpoint import saved_epoch
    labels = {path: label for label, path in update["choices"]}
    assert {Path(p).name for p in labels} >= {"best_acc.pt", "best_loss.pt", "latest.pt"}
    for path, label in labels.items():
        m = re.search(r" · epoch (\d+) · (val_acc|val_loss) (\d+\.\d{3})$", label)
        assert m and int(m.group(1)) == saved_epoch(path), label
        assert m.group(2) == ("val_loss" if path.endswith("best_loss.pt") else "val_acc")


# ---------------------------------------------------------------- model tab

def test_model_summary_rows_and_totals(app):
    table, totals, base, transfer, base_raw, transfer_raw = app["client"].predict(
        "resnet18", "head", 2, api_name="/model_summary")
    rows = {r[0]: r for r in table["data"]}
    for name in ("conv1", "bn1", "maxpool", "layer4", "fc"):
        assert name in rows
    assert rows["fc"][4].startswith("✔") and rows["conv1"][4] == "frozen"
    assert "BatchNorm" in rows["bn1"][5] and "MaxPool" in rows["maxpool"][5]
    assert rows["maxpool"][2] == "1x64x56x56"
    assert "11,177,538" in totals and "1,026" in totals
    assert "1000 outputs" in base and "2 outputs" in transfer
    assert "out_features=1000" in base_raw and "out_features=2" in transfer_raw
    full = app["client"].predict("resnet18", "full", 2, api_name="/model_summary")
    assert "100.00%" in full[1]
    mnv2 = app["client"].predict("mobilenet_v2", "last", 10_000, api_name="/model_summary")
    # MobileNetV2's BatchNorms sit inside its blocks: each block row says so, and whether they train;
    # a stage that trains only in part says so instead of a plain "trains".
    m_rows = {r[0]: r for r in mnv2[0]["data"]}
    assert m_rows["features"][4].startswith("◐ partly") and m_rows["features.13"][4] == "frozen"
    assert "52 BatchNorm layer(s) inside (13 of them train" in m_rows["features"][5]
    assert m_rows["features.14"][4] == "✔ trains" and "3 BatchNorm layer(s) inside (they train" in m_rows["features.14"][5]
    assert "BatchNorm layer(s) inside (frozen" in m_rows["features.13"][5]
    assert m_rows["classifier.0"][4].startswith("–")  # dropout: no weights, neither frozen nor training
    # A BatchNorm that trains (full fine-tune) keeps its green "trains" cell beside the yellow highlight.
    model = app["demo"].handlers.model
    styled = model.summary("resnet18", "full", 2)[model.table]
    styles = {(styled.data.iloc[r]["layer"], styled.data.columns[c]): css
              for (r, c), css in styled._compute().ctx.items()}
    assert "#fef3c7" in str(styles[("bn1", "type")]) and "#bbf7d0" in str(styles[("bn1", "trains")])
    assert "10000 outputs" in mnv2[3] or "10,000 outputs" in mnv2[3]
    for bad in (10**8, 1, 0, -3):  # the handler checks the range (the box's own check logged tracebacks)
        with pytest.raises(AppError, match=r"'Classes' must be from 2 to 10,000 \(got"):
            app["client"].predict("resnet18", "head", bad, api_name="/model_summary")
    with pytest.raises(AppError, match="'Classes' must be a whole number"):
        app["client"].predict("resnet18", "head", 2.5, api_name="/model_summary")
    for bad in (10**8, float("inf"), "lots", 1):  # and the handler itself, for other callers
        with pytest.raises(gr.Error, match="'Classes' must be"):
            model.summary("resnet18", "head", bad)


def test_model_tab_and_predictor_loads_leave_the_training_rng_alone(trained):
    """A run's dropout draws from torch's global RNG. The Model tab and loading a
    predictor (done while a run trains, from other threads) must not draw from it,
    or the app's run would stop matching the same command in the CLI."""
    import torch

    from core.predict import Predictor
    from demo_app import modelview
    before = torch.random.get_rng_state()
    modelview.model_view.cache_clear()
    modelview.model_view("mobilenet_v2", "last", 3, 0.2)
    modelview.policy_markdown("resnet18", "full", 7)
    pred = Predictor.load(trained["final"][CHECKPOINT]["value"])
    assert torch.equal(before, torch.random.get_rng_state())
    assert pred.model.fc.weight.device.type == "cpu" and pred.model.fc.weight.dtype == torch.float32


# ---------------------------------------------------------------- security and CLI

def test_file_route_serves_only_the_apps_folders(trained, app):
    def status(path) -> int:
        try:
            with urllib.request.urlopen(f"{app['url']}gradio_api/file={path}", timeout=10) as r:
                r.read(100)
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    assert status("/etc/passwd") in (403, 404)
    assert status(ROOT / "app.py") in (403, 404)
    assert status(ROOT / "core" / "config.py") in (403, 404)
    assert status(sorted((DATA / "val" / "cat").glob("*.jpg"))[0]) == 200  # the data folder is allowed


def test_app_cli_help_and_flags():
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--share", "--checkpoints-dir", "--data-dir"):
        assert flag in out.stdout
    import app as app_module
    args = app_module.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.share is False
    assert app_module.is_loopback("127.0.0.1") and not app_module.is_loopback("0.0.0.0")
    # a folder that cannot be created is named as such, before any server starts
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--checkpoints-dir", "/proc/no/such", "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot create the folder /proc/no" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Transfer-learning app:" not in out.stdout
    # a port that another program listens on: one line with the flag to change, before any URL is printed
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in out.stderr, out.stderr
    assert f"--port {port + 1}" in out.stderr and "Transfer-learning app:" not in out.stdout


def test_app_run_matches_the_engine_run(trained, tmp_path):
    """Same settings, same numbers: the app adds nothing to (and loses nothing from) core's training."""
    import dataclasses

    from core.config import TrainConfig
    from core.engine import train
    from core.events import RunEnded
    run = run_dir_of(trained["final"][STATUS])
    args = json.loads((run / "args.json").read_text())
    cfg = TrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(TrainConfig) if f.name in args})
    cfg.output_dir = str(tmp_path)
    ended = [ev for ev in train(cfg) if isinstance(ev, RunEnded)][0]
    app_rows = table_rows(trained["final"])
    assert len(ended.history) == len(app_rows) == 2
    for mine, theirs in zip(app_rows, ended.history):
        assert mine[1] == pytest.approx(theirs["train_loss"], abs=1e-4)
        assert mine[3] == pytest.approx(theirs["val_loss"], abs=1e-4)
        assert mine[4] == pytest.approx(theirs["val_acc"], abs=1e-4)


def test_busy_message_names_the_phase_a_run_is_in():
    """The 'already in progress' message says what the running run is doing,
    not 'epoch 1' while it is still decoding images."""
    from core.config import TrainConfig
    from demo_app.session import RunHandle
    h = RunHandle(TrainConfig(epochs=5, run_name="cats"))
    said = {}
    for phase, epoch in (("setup", 0), ("run", 0), ("decode", 0), ("cache", 0), ("train", 2), ("val", 2)):
        h.phase, h.epoch = phase, epoch
        said[phase] = h.describe()
    assert "setting up" in said["setup"] and "setting up" in said["run"]
    assert "decoding images" in said["decode"] and "running the frozen layers" in said["cache"]
    assert "epoch 2/5" in said["train"] and "epoch 2/5" in said["val"]


def test_run_list_and_examples_tolerate_what_users_have(tmp_path, monkeypatch):
    """A metrics.csv with blank cells (a resumed reference run) and a data folder
    given as ~/...: the run list and the examples gallery still work."""
    from demo_app import datasets, plots, runs
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("epoch,train_loss,val_acc,val_loss\n1,0.7,0.5,\n2,0.6,0.75,0.55\n")
    rows = runs.read_metrics(csv_file)
    assert rows[0] == {"epoch": 1, "train_loss": 0.7, "val_acc": 0.5} and rows[1]["val_loss"] == 0.55
    assert plots._series(rows, "val_loss") == ([2], [0.55])
    # a text cell: that row names no checkpoint's epoch, and the Predict list still builds
    csv_file.write_text("epoch,val_acc,val_loss\n1,0.5,0.6\n2,n/a,0.5\n")
    assert {k: r["epoch"] for k, r in runs.file_rows(runs.read_metrics(csv_file)).items()} == \
        {"best_acc.pt": 1, "best_loss.pt": 1, "latest.pt": 1}
    monkeypatch.setenv("HOME", str(tmp_path))
    make_image_dataset(tmp_path / "photos", n_train=2, n_val=2)
    examples = datasets.example_images("~/photos")
    assert len(examples) == 4 and all(Path(p).is_file() for p, _ in examples)


def test_a_page_opened_during_a_run_follows_it_to_the_end(tmp_path):
    """A reload (or a second tab) during a run used to show a status that never
    changed. Now the page follows the run: status, charts and epoch table fill
    in as epochs end, then the final status and the new best checkpoint."""
    from demo_app.tab_train_run import READY
    data = make_image_dataset(tmp_path / "ds", n_train=6, n_val=2)
    tabs = built(tmp_path, data)
    train, run, predict = tabs.train, tabs.train.run, tabs.predict
    assert next(run.watch())[run.status] == READY  # nothing running
    starter = start(tabs, data, policy="full", epochs=3, batch_size=2)
    next(starter)  # the run is started; the starting page then goes away (reload)
    # the reloaded page's form shows the run's settings
    # (an empty run name stays empty: the default would name a later run of another policy after this one)
    assert {name: train.followed_settings()[component] for name, component in train.form.items()} == {
        "data_dir": str(data), "arch": "resnet18", "weights_source": "none", "weights_path": "", "policy": "full",
        "epochs": 3, "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.0, "augment": "auto", "seed": 7,
        "device": "cpu", "val_split": 0, "run_name": "", "amp": False}
    frames = list(run.watch(poll_s=0.05))
    assert all("in progress" in f[run.status] for f in frames[:-1]) and len(frames) >= 2
    tables = [f[run.epochs_table] for f in frames[:-1] if run.epochs_table in f]
    rows = [0 if t is None else len(t.data) for t in tables]
    assert rows == sorted(rows) and rows[-1] >= 2  # epochs appear as they end (the last may end with the run)
    # between epochs the status line alone moves on, with the phase's progress
    assert any(re.search(r"(epoch \d/3, (train|val) batch \d+/\d+|running the frozen layers|decoding images)",
                         f[run.status]) for f in frames[:-1]), [f[run.status] for f in frames]
    final = frames[-1]
    assert "Completed" in final[run.status] and len(final[run.epochs_table].data) == 3
    # the accuracy chart and the run state (which 'Compare policies' draws from) hold the run too
    state = final[run.run_state]
    assert [len(t.x) for t in final[run.acc_plot].data[:2]] == [3, 3] and len(state["history"]) == 3
    assert state["run"] and state["run"] in final[predict.ckpt]["value"]
    assert "EPOCH 3/3" in final[run.log_box] and "BEST:" in final[run.log_box]  # the run log, as the CLI prints it
    assert final[predict.ckpt]["value"].endswith("best_acc.pt")
    best = max(r["epoch"] for r in state["history"] if r["best"])
    assert f"epoch {best}" in final[predict.ckpt_info]  # its description is redone (the path may be the one already shown)
    # Start is greyed out on the following page while the run trains, and back at its end.
    assert all(f[run.start_btn]["interactive"] is False for f in frames[:-1])
    assert final[run.start_btn]["interactive"] is True
    assert train.followed_settings() == gr.skip()  # nothing to follow now
    assert all(set(f) <= set(run.watch_outputs) for f in frames)  # only outputs the page wires to watch()
    for _ in starter:  # the original stream still ends normally
        pass


def test_wrong_kinds_of_path_are_named_as_such(trained, app, tmp_path):
    """A file where a folder belongs (and the reverse) is not 'does not exist'."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    said = as_shown(app["client"].predict(str(a_file), 0, 1337, api_name="/check_dataset"))
    assert "is a file, not a folder" in said
    with pytest.raises(AppError, match="is a folder, not a .pt file"):
        train_job(app["client"], weights_source="local file", weights_path=str(tmp_path)).result(timeout=60)
    with pytest.raises(gr.Error, match="is a file; give the folder"):
        app["demo"].handlers.predict.predict_batch(None, str(a_file), 2, trained["final"][CHECKPOINT]["value"], None,
                                                   False)


def test_the_page_shows_predict_problems_in_place_of_the_old_answer(trained, app, tmp_path):
    """Raised, a problem left the previous image's label on screen under an
    error badge (and toasted twice); the page's handlers clear it and say why."""
    from PIL import Image

    from demo_app.components import SafeImage
    from demo_app.tab_predict import BATCH_STALE
    p = app["demo"].handlers.predict
    ckpt = trained["final"][CHECKPOINT]["value"]
    image = Image.open(sorted((DATA / "val" / "cat").glob("*.jpg"))[0])
    said = p.predict_shown(image, 2, ckpt, None, False)
    assert set(said[p.label]) == {"cat", "fish"} and "Prediction took" in said[p.pred_time]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage" * 100)
    said = p.predict_shown(image, 2, ckpt, str(broken), False)
    assert said[p.label] is None and said[p.pred_time].startswith("⚠ **Checkpoint problem:**")
    assert "broken.pt" in as_shown(said[p.pred_time])
    # a non-image dropped on the page: the image box hands over its message, shown in place of the old label
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    not_image = SafeImage(type="pil").preprocess(gr.FileData(path=str(text), orig_name="notes.jpg"))
    said = p.predict_shown(not_image, 2, ckpt, None, False)
    assert said[p.label] is None and said[p.pred_time].startswith("⚠ **Not an image:**")
    assert as_shown(said[p.pred_time]).startswith("⚠ Not an image: notes.jpg: not an image file")
    cleared = {p.batch_table: None, p.batch_gallery: None, p.batch_csv: None}
    said = p.predict_batch_shown([], "", 2, ckpt, None, False)
    assert said.items() >= cleared.items() and said[p.batch_summary].startswith("⚠ **No images:**")
    # another checkpoint chosen: results of the old one are cleared, and the page says how to redo them
    shown = p.predict_batch_shown(None, str(DATA / "val"), 2, ckpt, None, False)
    assert len(shown[p.batch_table].data) == 32  # a Styler over the table
    stale = p.batch_stale(shown[p.batch_summary])
    assert stale.items() >= {**cleared, p.batch_summary: BATCH_STALE}.items()
    assert stale[p.cam.gallery_paths] == [] and stale[p.cam.batch_image] is None  # the gallery's CAM goes too
    assert p.batch_stale(BATCH_STALE) == gr.skip()  # nothing more to clear
    assert p.batch_stale("⚠ **No images:** add some") == gr.skip()


def test_weights_note_says_whether_imagenet_weights_are_here(tmp_path, monkeypatch):
    """The preselected 'ImageNet' cannot work on an offline machine without the
    file; the page says so before Start instead of only after it."""
    import torch

    from core.models import imagenet_cache_path
    from demo_app.tab_train import weights_note
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert "not on this machine yet" in weights_note("resnet18")["info"]
    # with another source chosen, the note is about that source
    assert weights_note("resnet18", "none")["info"].startswith("Random init")
    assert "state_dict (.pth) of a mobilenet_v2 backbone" in weights_note("mobilenet_v2", "local file")["info"]
    cached = imagenet_cache_path("resnet18")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert "in the torch cache" in weights_note("resnet18")["info"]
    assert "not on this machine yet" in weights_note("mobilenet_v2")["info"]


def test_a_bare_state_dict_is_described_as_having_no_class_names(trained, app, tmp_path):
    import torch

    sd = tmp_path / "weights.pt"
    torch.save(torch.load(trained["final"][CHECKPOINT]["value"], weights_only=True)["model_state"], sd)
    h = app["demo"].handlers.predict
    info = h.checkpoint_info(None, str(sd), False)
    assert "classes: class_0, class_1 (this file stores no class names" in as_shown(info), info
    assert "no class names" not in h.checkpoint_info(trained["final"][CHECKPOINT]["value"], None, False)
    assert "val by class" not in info  # a bare state_dict has no validation results


def test_run_status_and_checkpoint_info_give_val_accuracy_by_class(trained, app):
    best = trained["final"][CHECKPOINT]["value"]
    m = re.search(r"Val by class at that epoch: cat (\d+)/16.* · fish (\d+)/16", as_shown(trained["final"][STATUS]))
    assert m, trained["final"][STATUS]
    acc = float(re.search(r"val_acc (\d\.\d+)", trained["final"][STATUS]).group(1))
    assert round((int(m.group(1)) + int(m.group(2))) / 32, 3) == acc  # the same epoch's counts
    info = app["demo"].handlers.predict.checkpoint_info(best, None, False)
    epoch = re.search(r"Best epoch \*\*(\d+)", trained["final"][STATUS]).group(1)
    assert f"val by class at epoch {epoch}: cat" in as_shown(info), info


def test_uploaded_images_are_not_checked_against_their_folder(trained, app):
    """An upload's folder is not the user's labelling (even a val/cat/ file given
    as an upload); images from the folder box are checked."""
    h = app["demo"].handlers.predict
    cat = sorted((DATA / "val" / "cat").glob("*.jpg"))[0]
    said = h.predict_batch([str(cat)], "", 2, trained["final"][CHECKPOINT]["value"], None, False)
    assert said[h.batch_table].data["check"].tolist() == [""] and "against the folder names" not in said[h.batch_summary]
    table = h.predict_batch([], str(DATA / "val" / "cat"), 2, trained["final"][CHECKPOINT]["value"], None,
                            False)[h.batch_table]
    assert all(c == "✓" or c == "✗ folder: cat" for c in table.data["check"]) and len(table.data) == 16


def test_stop_from_a_page_that_did_not_start_the_run_preselects_its_best_checkpoint(tmp_path):
    """Stop's status says the best checkpoint is preselected in the Predict tab; on a
    page other than the starting one that was untrue. It now is, description too."""
    data = make_image_dataset(tmp_path / "ds", n_train=6, n_val=2)
    tabs = built(tmp_path, data)
    starter = start(tabs, data, policy="full", epochs=50, batch_size=2)
    next(starter)
    wait_until(lambda: tabs.service.current.history, 240, "the end of the first epoch")
    said = tabs.train.run.stop_shown()  # this page never ran the Start stream
    status, ckpt, info = said[tabs.train.run.status], said[tabs.predict.ckpt], said[tabs.predict.ckpt_info]
    assert "Stopped" in status and "preselected in the Predict tab" in status
    best = re.search(r"`([^`]+best_acc\.pt)`", status).group(1)
    assert ckpt["value"] == best and best in [v for _, v in ckpt["choices"]]
    assert "epoch" in info and "best_acc.pt" in as_shown(info)
    list(starter)  # the starting page's stream ends too


@pytest.mark.parametrize("core_says,field,app_says", [
    ("{choice:device=cuda} was requested but CUDA is not available; use {choice:device=cpu} or {choice:device=auto}",
     "device", "use 'Device (Advanced)' = cpu or 'Device (Advanced)' = auto"),
    ("with policy 'head' ... use ImageNet weights or {choice:policy=full}", "policy", "or 'Freeze policy' = full"),
    ("cannot tell the architecture from the state_dict keys; pass {setting}", "arch", "pass 'Architecture'"),
    ("or train without pretrained weights: {choice:weights=none}, or a local file: {choice:weights=PATH.pth}",
     "weights", "'Pretrained weights' = None (random init), or a local file: 'Pretrained weights' = Local file"),
    ("/a/train looks like a split itself: pass its parent, {setting} /a", "data_dir", "pass its parent, 'Dataset folder' /a"),
    ("add /x/val/<class>/ folders, or pass {choice:val_split=0.2} to hold out", "data_dir",
     "or pass 'Validation fraction (Advanced)' = 0.2 to")])
def test_core_messages_name_the_apps_fields_and_choices(core_says, field, app_says):
    from demo_app.messages import say
    said = say(core_says, field)
    assert app_says in said and "--" not in said and "{" not in said, said


def test_a_refused_pickle_is_worded_by_field_not_by_text(trained, tmp_path):
    """load_file's refusal carries field="trust_pickle": the CLI says predict.py --trust-pickle 1,
    the app ticks its box, or says it cannot when its owner did not allow pickles."""
    from cli.common import say as cli_say
    from core.access import AccessPolicy
    from core.checkpoint import export_full_model, model_from_checkpoint, read_checkpoint
    from core.fileio import load_file
    from core.errors import CheckpointError
    ckpt = trained["final"][CHECKPOINT]["value"]
    full = export_full_model(model_from_checkpoint(read_checkpoint(ckpt)), ["cat", "fish"], tmp_path / "full.pt")
    with pytest.raises(CheckpointError) as e:
        load_file(full)
    assert e.value.field == "trust_pickle"
    assert ("Only if you trust where it came from: predict.py --trust-pickle 1 (in the app: tick 'trust pickle'). "
            "Training (--resume, --weights) needs") in cli_say(e.value.message, e.value.field)
    for allow, advice in ((True, "Only if you trust where it came from: tick 'Trust pickle'. Training (resuming, "
                                 "'Pretrained weights')"), (False, "this app does not load such files")):
        tab = built(tmp_path, policy=AccessPolicy.make(False, allow_pickle=allow)).predict
        with pytest.raises(CheckpointError) as e:
            tab.load(None, str(full), False)
        assert advice in e.value.message and "{" not in e.value.message, e.value.message
        assert e.value.message.startswith("full.pt contains pickled") and str(tmp_path) not in e.value.message  # upload: its name


def test_dataset_summary_rewrites_warnings_not_class_names(app, tmp_path):
    """Class folders and paths are shown as they are; only the warnings' advice
    is worded for the app."""
    data = make_image_dataset(tmp_path / "ds", classes=("--lr 3", "fish"), n_train=3, n_val=2)
    train = app["demo"].handlers.train
    said = train.check_dataset(str(data), 0.5)
    summary, n = said[train.ds_summary], said[train.n_classes]
    assert n == 2 and "| \\-\\-lr 3 | 3 | 2 |" in summary and "for ['--lr 3', 'fish']" in as_shown(summary)
    assert "'Validation fraction (Advanced)' 0.5 ignored" in as_shown(summary)


# ---------------------------------------------------------------- errors in the app's words

# Settings core may name that the app never sets (it leaves them at their defaults) or has no
# widget for: a message about one cannot reach the app's screen.
NOT_IN_THE_APP = {"num_workers", "export_state_dict", "export_full_model", "cache", "cache_budget_mb", "image_size",
                  "resize_size", "extra", "freeze_backbone", "unfreeze_last", "unfreeze_all"}


def test_every_setting_core_can_name_has_a_label_in_the_app():
    """core names settings by field ({setting}, {setting:F}, {choice:F=V}, field=F, TrainConfig's
    checks); each one the app can meet is worded by the app's labels, none falls back to a bare name."""
    import dataclasses

    from core.config import TrainConfig
    from demo_app.messages import FIELD_LABELS
    named = {f.name for f in dataclasses.fields(TrainConfig)}
    for source in (ROOT / "core").glob("*.py"):
        text = source.read_text(encoding="utf-8")
        named |= {a or b for a, b in re.findall(r'field="([a-z_]+)"|\{(?:setting|choice):([a-z_]+)', text)}
    missing = sorted(named - set(FIELD_LABELS) - NOT_IN_THE_APP)
    assert not missing, f"settings core names with no app label: {missing}"


def test_every_error_the_app_shows_names_its_fields_not_cli_flags(app, trained, tmp_path):
    """A walk through the errors, warnings and notes the page shows for bad input
    (each form field, the dataset, weights, checkpoints, images, the Model tab):
    each is in the app's words: its field labels, no CLI flag, no placeholder."""
    import torch

    from cli.common import FLAG_NAMES
    from demo_app.components import SafeImage
    from demo_app.messages import FIELD_LABELS
    tabs = app["demo"].handlers
    train, run, predict, model = tabs.train, tabs.train.run, tabs.predict, tabs.model
    shown: list[tuple[str, str, str]] = []  # (what, text, the label it should name or "")

    def said(what, fn, *args, label="", **kw):
        try:
            out = fn(*args, **kw)
        except gr.Error as e:
            shown.append((what, e.message, label))
            return
        texts = [v for v in (out.values() if isinstance(out, dict) else [out]) if isinstance(v, str)]
        shown.append((what, "\n".join(texts), label))

    def start_refused(what, label="", **form):
        """Start with a bad form: the status it shows, and its pop-up."""
        frames = []
        with pytest.raises(gr.Error) as e:
            for frame in run.start(**{"data_dir": str(DATA), "weights_source": "none", "device": "cpu", **form}):
                frames.append(frame)
        shown.append((what, frames[-1][run.status] + "\n" + e.value.message, label))

    settings = {"epochs": [0, 1.5, None], "batch_size": [0, 2.5], "lr": [0, "fast"], "weight_decay": [-1],
                "dropout": [1.0], "seed": [-1, 0.5], "val_split": [5], "run_name": ["a b/c"], "data_dir": ["", "/no/such"]}
    for field, values in settings.items():
        for value in values:
            start_refused(f"{field}={value!r}", FIELD_LABELS[field] if field != "data_dir" or value == "" else "",
                          **{field: value})
    for path in ("", str(tmp_path), str(tmp_path / "none.pth")):
        start_refused(f"weights {path!r}", weights_source="local file", weights_path=path)
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    ds_noval = make_image_dataset(tmp_path / "noval", n_train=3, val=False)
    for folder, split in ((str(DATA / "missing"), 0), (str(DATA / "val" / "cat" / "cat_000.jpg"), 0),
                          (str(tmp_path / "flat"), 0), (str(DATA / "train"), 0), (str(ds_noval), 0),
                          (str(DATA), 0.5), (str(DATA), 3), ("", 0)):
        said(f"dataset {folder} {split}", train.check_dataset_shown, folder, split, 1337)
    ckpt = trained["final"][CHECKPOINT]["value"]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage" * 100)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    not_image = SafeImage(type="pil").preprocess(gr.FileData(path=str(text), orig_name="notes.jpg"))
    image = sorted((DATA / "val" / "cat").glob("*.jpg"))[0]
    for args in ((str(image), 2, None, None, False), (str(image), 2, None, str(broken), False),
                 (not_image, 2, ckpt, None, False)):
        said("predict", predict.predict_shown, *args)
        said("checkpoint", predict.checkpoint_info, *args[2:])
    from core.checkpoint import export_full_model, model_from_checkpoint, read_checkpoint
    full = export_full_model(model_from_checkpoint(read_checkpoint(ckpt)), ["cat", "fish"], tmp_path / "full.pt")
    said("pickle refused", predict.predict_shown, str(image), 2, None, str(full), True)
    said("pickle refused", predict.checkpoint_info, None, str(full), True)
    for files, folder in (([], ""), ([], str(image)), ([], str(tmp_path / "flat"))):
        said(f"batch {folder}", predict.predict_batch_shown, files, folder, 2, ckpt, None, False)
    for n in (1, 2.5, "lots"):
        said(f"classes {n}", model.summary, "resnet18", "head", n, label="'Classes'")
    said("stop", run.stop)
    weights = tmp_path / "resnet18_weights.pth"
    torch.save(torch.load(ckpt, weights_only=True)["model_state"], weights)
    start_refused("weights of another arch", "'Architecture'", arch="mobilenet_v2", weights_source="local file",
                  weights_path=str(weights))
    start_refused("imagenet offline", "'Pretrained weights'", weights_source="imagenet")  # (TL_OFFLINE=1: conftest)
    if not torch.cuda.is_available():  # a run that fails once started, in its worker
        start_refused("device cuda", FIELD_LABELS["device"], device="cuda")

    flags = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(f) for f in FLAG_NAMES.values()) + r")(?![\w-])")
    bare = re.compile(r"\b(?:" + "|".join(f for f in FIELD_LABELS if "_" in f) + r")\b")
    assert len(shown) >= 40
    for what, text, label in shown:
        assert text.strip(), what
        assert not flags.search(text), (what, text)
        assert "{setting" not in text and "{choice" not in text, (what, text)
        assert not bare.search(text), (what, text)
        assert label in text.replace("\\", ""), (what, label, text)  # (Markdown escapes the quotes)
