"""Issue 15, the app's part: what a hostile or careless client of the app must
not be able to do. The app is driven over HTTP the way the browser (and an
attacker) drives it: any event handler by its index, not only the documented
API, and app.py is run with its real flags. Each test failed on the code
before the fix (run against `git archive` of that commit)."""
from __future__ import annotations

import html
import json
import os
import pickle
import re
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from conftest import free_port, make_image_dataset, wait_until

gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
# Class folder names a zip (or a careless user) can bring: HTML, a Markdown link, a table
# cell break, emphasis and a bare URL, which a renderer would turn into a link.
HOSTILE = ("<b>bold", "[x](javascript:alert(1))", "www.evil.example | *em* _u_")
FILE_INPUTS = ("file", "uploadbutton", "image")


def launch(demo, ckpt, data, uploads, **extra) -> str:
    from demo_app.ui import launch_options
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpt, data, uploads), **extra)
    return url


def start_app_py(tmp_path, *flags, env=None) -> tuple[subprocess.Popen, str]:
    """app.py on a free loopback port with `flags`, once it answers: (process, url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--checkpoints-dir",
                             str(tmp_path / "ck"), *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"

    def started():
        assert proc.poll() is None, f"app.py exited: {proc.stdout.read()}"
        try:
            return httpx.get(url + "gradio_api/startup-events", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_until(started, 120, "app.py to answer")
    except BaseException:
        proc.kill()
        raise
    return proc, url


class Raw:
    """The app's HTTP interface as its own page uses it: every event handler,
    public or not, by its index in /config."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=120)

    def config(self) -> dict:
        return self.http.get("config").raise_for_status().json()

    def upload(self, path: Path, name: str | None = None) -> dict:
        r = self.http.post("gradio_api/upload", files=[("files", (name or path.name, path.read_bytes()))])
        server_path = r.raise_for_status().json()[0]
        return {"path": server_path, "orig_name": name or path.name, "meta": {"_type": "gradio.FileData"}}

    def call(self, fn_index: int, data: list) -> dict:
        """-> the 'process_completed' message: {'success': bool, 'output': {'data': [...]} or {'error': ...}}."""
        session = uuid.uuid4().hex
        r = self.http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                          "event_data": None, "trigger_id": None})
        if r.status_code != 200:
            return {"success": False, "output": {"error": f"HTTP {r.status_code}: {r.text}"}}
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "process_completed":
                        return msg
        raise AssertionError(f"event {fn_index} never completed")

    def close(self):
        self.http.close()


def file_endpoints(config: dict) -> list[tuple[int, list[dict]]]:
    """(fn_index, input components) of every event handler that takes a file."""
    comps = {c["id"]: c for c in config["components"]}
    out = []
    for d in config["dependencies"]:
        inputs = [comps[i] for i in d["inputs"]]
        if d.get("backend_fn", True) and any(c["type"] in FILE_INPUTS for c in inputs):
            out.append((d["id"], inputs))
    return out


def attack_values(inputs: list[dict], payload: dict | None, image: dict, path: str) -> list:
    """Each input of an event as an attacker fills it: files -> the payload
    (the image box -> `image`), every box taking text -> `path` (a server path of
    the payload), every boolean -> True; other inputs their default."""
    values = []
    for c in inputs:
        t, props = c["type"], c.get("props", {})
        if t == "image":
            values.append(image)
        elif t in ("file", "uploadbutton"):
            many = props.get("file_count") in ("multiple", "directory")
            values.append(([payload] if many else payload) if payload else None)
        elif t == "checkbox":
            values.append(True)
        elif t == "textbox" or (t == "dropdown" and props.get("allow_custom_value")):
            values.append(path)
        elif t in ("dropdown", "radio"):
            choices = [v for _, v in props.get("choices") or []]
            values.append([] if props.get("multiselect") else (choices[-1] if choices else None))
        else:
            values.append(props.get("value"))
    return values


def code_running_files(folder: Path, marker: Path) -> list[Path]:
    """Model files whose loading runs code: a torch.save zip and a bare pickle,
    each writing `marker` when unpickled."""
    import torch

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('the payload ran')",)

    folder.mkdir(parents=True, exist_ok=True)
    saved, bare = folder / "model.pt", folder / "model_legacy.pth"
    torch.save({"model_state": Payload(), "class_names": ["cat", "fish"]}, saved)
    bare.write_bytes(pickle.dumps(Payload(), protocol=2))
    return [saved, bare]


def send_payloads_everywhere(raw: Raw, files: list[Path], image: Path) -> list[tuple[str, dict]]:
    """Every file-taking event, with each payload as its files and as the path
    typed in its text boxes (and with nothing uploaded, so the typed path is
    what the handler loads), every boolean True. -> (what was sent, reply)."""
    config = raw.config()
    endpoints = file_endpoints(config)
    names = {d["id"]: d.get("api_name") for d in config["dependencies"]}
    assert len(endpoints) >= 8, endpoints  # checkpoint_info, predict(_shown), predict_batch(_shown), uploads
    img = raw.upload(image)
    replies = []
    for f in files:
        fd = raw.upload(f)
        for fn, inputs in endpoints:
            for label, payload, image_fd in (("upload", fd, img), ("typed path", None, img),
                                             ("as the image too", fd, fd)):
                reply = raw.call(fn, attack_values(inputs, payload, image_fd, fd["path"]))
                replies.append((f"{names[fn]} ({fn}) {f.name} {label}", reply))
    return replies


def reply_text(reply: dict) -> str:
    out = reply.get("output") or {}
    return json.dumps(out.get("data") if reply.get("success") else out.get("error"), ensure_ascii=False)


# ---------------------------------------------------------------- item 1: no client decides to unpickle

@pytest.fixture(scope="module")
def default_app(tmp_path_factory):
    """The app as `python app.py` starts it by default."""
    from demo_app.ui import build_app
    base = tmp_path_factory.mktemp("security_default")
    ckpt, uploads = base / "checkpoints", base / "uploads"
    demo = build_app(ckpt, DATA, uploads)
    url = launch(demo, ckpt, DATA, uploads)
    raw = Raw(url)
    try:
        yield {"url": url, "raw": raw, "demo": demo, "base": base}
    finally:
        raw.close()
        demo.close()


def test_no_client_can_make_the_server_unpickle(default_app, tmp_path):
    marker = tmp_path / "payload-ran"
    files = code_running_files(tmp_path / "evil", marker)
    image = sorted((DATA / "val" / "cat").glob("*.jpg"))[0]
    replies = send_payloads_everywhere(default_app["raw"], files, image)
    ran = marker.exists()
    assert not ran, "an uploaded pickle ran its code on the server"
    # The handlers really looked at the files: the checkpoint loaders refused them as pickles.
    predict = [reply_text(r) for what, r in replies if what.startswith("predict (") and "image too" not in what]
    assert predict and all("pickled" in t for t in predict), predict
    assert any("does not load such files" in t and "--allow-pickle-uploads" in t for t in predict), predict[0]
    # The page offers no Trust-pickle box on a default server.
    comps = {c["props"].get("elem_id"): c["props"] for c in default_app["raw"].config()["components"]}
    assert comps["trust-pickle"]["visible"] is False and comps["pickle-warning"]["visible"] is False


def test_only_the_owner_on_loopback_can_allow_pickles(tmp_path):
    """The same payload does run when the owner allows it (so the test above
    can see a run), and app.py refuses that flag on any address others reach."""
    from core.access import AccessPolicy
    from demo_app.ui import build_app
    ckpt, uploads = tmp_path / "checkpoints", tmp_path / "uploads"
    demo = build_app(ckpt, DATA, uploads, policy=AccessPolicy.make(False, allow_pickle=True))
    raw = Raw(launch(demo, ckpt, DATA, uploads))
    try:
        marker = tmp_path / "payload-ran"
        files = code_running_files(tmp_path / "evil", marker)
        comps = {c["props"].get("elem_id"): c["props"] for c in raw.config()["components"]}
        assert comps["trust-pickle"]["visible"] is True
        predict, inputs = next((fn, inputs) for fn, inputs in file_endpoints(raw.config())
                               if fn == next(d["id"] for d in raw.config()["dependencies"]
                                             if d.get("api_name") == "predict"))
        image = raw.upload(sorted((DATA / "val" / "cat").glob("*.jpg"))[0])
        raw.call(predict, attack_values(inputs, raw.upload(files[0]), image, ""))
        assert marker.exists(), "with --allow-pickle-uploads a ticked Trust pickle loads the file"
    finally:
        raw.close()
        demo.close()
    for flags in (["--host", "0.0.0.0", "--auth", "t:pw"], ["--share", "--auth", "t:pw"]):
        r = run_app(flags + ["--allow-pickle-uploads"])
        assert r.returncode == 2 and "--allow-pickle-uploads cannot be used with" in r.stderr, r.stderr


# ---------------------------------------------------------------- item 4: login, and folders when exposed

def run_app(flags: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    """app.py with `flags`, expected to refuse them (and so end) at once."""
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(free_port()), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_app_refuses_to_start_exposed_without_a_login(tmp_path):
    import app
    for flags in (["--host", "0.0.0.0"], ["--host", "192.168.1.20"], ["--share"]):
        r = run_app(flags)
        assert r.returncode == 2 and "--auth-file" in r.stderr and "--no-auth" in r.stderr, (flags, r.stderr)

    def settings(*flags):
        return app.plan(app.build_parser().parse_args(list(flags)))

    open_anyway = settings("--host", "0.0.0.0", "--no-auth")
    assert open_anyway.exposed and open_anyway.auth is None
    assert any("WITHOUT A LOGIN" in w and "pickled" in w for w in open_anyway.warnings), open_anyway.warnings
    logins = tmp_path / "logins.txt"
    logins.write_text("# class of 2025\nteacher:s3cret:with:colons\n\n  ana:pw2  \n")
    logins.chmod(0o600)
    s = settings("--host", "0.0.0.0", "--auth-file", str(logins), "--auth", "bob:pw3")
    assert s.auth == [("bob", "pw3"), ("teacher", "s3cret:with:colons"), ("ana", "pw2")] and s.exposed
    assert not any("chmod" in w for w in s.warnings)
    logins.chmod(0o644)
    assert any("chmod 600" in w for w in settings("--auth-file", str(logins)).warnings)
    loopback = settings()
    assert not loopback.exposed and loopback.auth is None and not loopback.warnings
    bad = tmp_path / "bad.txt"
    bad.write_text("teacher:ok\nno-colon-here-secretpw\n")
    for flags, said in ((["--auth-file", str(bad)], "line 2 must be USER:PASSWORD"),
                        (["--auth", "alone"], "--auth must be USER:PASSWORD"),
                        (["--auth", "a:"], "--auth must be USER:PASSWORD"),
                        (["--auth", "a:1", "--auth", "a:2"], "more than one password"),
                        (["--auth-file", str(tmp_path / "missing.txt")], "does not exist"),
                        (["--no-auth", "--auth", "a:b"], "contradicts"),
                        (["--host", "0.0.0.0", "--no-auth", "--data-root", str(tmp_path / "nope")], "not a folder")):
        with pytest.raises(app.FlagError, match=re.escape(said)) as e:
            settings(*flags)
        assert "secretpw" not in str(e.value)


def test_a_login_guards_every_route(tmp_path):
    """app.py --auth-file on 127.0.0.1: nothing answers before logging in."""
    logins = tmp_path / "logins.txt"
    logins.write_text("teacher:s3cret\n")
    logins.chmod(0o600)
    proc, url = start_app_py(tmp_path, "--auth-file", str(logins))
    try:
        outsider = httpx.Client(base_url=url, timeout=30)
        assert outsider.get("config").status_code == 401
        join = {"data": [str(DATA), 0, 1337], "fn_index": 0, "session_hash": "x", "event_data": None}
        assert outsider.post("gradio_api/queue/join", json=join).status_code == 401
        assert outsider.post("gradio_api/upload", files=[("files", ("a.txt", b"x"))]).status_code == 401
        assert outsider.post("login", data={"username": "teacher", "password": "wrong"}).status_code >= 400
        assert outsider.get("config").status_code == 401
        client = Client(url, auth=("teacher", "s3cret"), analytics_enabled=False, verbose=False)
        summary = client.predict(str(DATA), 0, 1337, api_name="/check_dataset")
        assert "**2 classes**" in summary
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A data root with a good dataset and three that reach out of it, and a
    private folder outside it."""
    base = tmp_path_factory.mktemp("confine")
    private = make_image_dataset(base / "private", classes=("secret_cat", "secret_fish"))
    root = base / "class-photos"
    good = make_image_dataset(root / "good")
    linked_class = make_image_dataset(root / "linked_class")
    (linked_class / "train" / "cat").rename(root / "moved")
    (linked_class / "train" / "cat").symlink_to(private / "train" / "secret_cat")
    linked_image = make_image_dataset(root / "linked_image")
    (linked_image / "val" / "cat" / "cat_0.jpg").unlink()
    (linked_image / "val" / "cat" / "cat_0.jpg").symlink_to(private / "val" / "secret_cat" / "secret_cat_0.jpg")
    (root / "to_private").symlink_to(private)
    (root / "loop").symlink_to(root / "loop")
    return {"base": base, "private": private, "root": root, "good": good, "linked_class": linked_class,
            "linked_image": linked_image}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch checkpoint trained on class folders with hostile names."""
    from demo_app.ui import build_app
    base = tmp_path_factory.mktemp("hostile")
    data = make_image_dataset(base / "data", classes=HOSTILE)
    # The same image in every class folder, under a name that is a link: at least two are
    # wrong whatever the model says, and the summary lists the wrong ones by name.
    check = base / "check"
    for i, c in enumerate(HOSTILE):
        (check / c).mkdir(parents=True)
        (check / c / f"[f](javascript:x) {i}.jpg").write_bytes((data / "val" / HOSTILE[0] / f"{HOSTILE[0]}_0.jpg").read_bytes())
    run = build_app(base / "checkpoints", data, base / "uploads").handlers.train.run
    frames = list(run.start(data_dir=str(data), weights_source="none", epochs=1, batch_size=4, seed=7, device="cpu"))
    status = frames[-1][run.status]
    assert "Completed" in status, status
    ckpt = next((base / "checkpoints").glob("*/best_acc.pt"))
    return {"data": data, "checkpoint": ckpt, "status": status, "base": base, "check": check}


def exposed_app(tmp_path, folders):
    from core.access import AccessPolicy
    from demo_app.ui import build_app
    ckpt, uploads = tmp_path / "checkpoints", tmp_path / "uploads"
    policy = AccessPolicy.make(True, [ckpt, DATA, uploads, folders["root"]])
    demo = build_app(ckpt, DATA, uploads, policy=policy)
    return demo, launch(demo, ckpt, DATA, uploads)


def test_exposed_app_reads_only_its_own_and_data_root_folders(tmp_path, folders, trained):
    import shutil
    demo, url = exposed_app(tmp_path, folders)
    client = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "dl"))
    h = demo.handlers
    private, root = folders["private"], folders["root"]
    ours = h.ctx.checkpoints_dir / "run" / "best_acc.pt"  # a checkpoint in the app's own folder
    ours.parent.mkdir(parents=True)
    shutil.copy(trained["checkpoint"], ours)
    try:
        refused = [str(private), str(root / "to_private"), str(root / ".." / private.name), "~", "/",
                   str(folders["linked_class"]), str(root / "loop")]
        for folder in refused:
            summary = client.predict(folder, 0, 1337, api_name="/check_dataset")
            assert summary.startswith("⚠ **Dataset problem:**") and "secret" not in summary, (folder, summary)
            assert "outside the folders this app may read" in summary, summary
            assert h.predict.show_examples(folder) == {h.predict.examples: [], h.predict.example_paths: []}
            with pytest.raises(AppError, match="outside the folders this app may read") as e:
                client.predict([], folder, 2, str(ours), None, False, api_name="/predict_batch")
            assert "secret" not in str(e.value)
        said = client.predict(str(folders["linked_class"]), 0, 1337, api_name="/check_dataset")
        assert "1 link(s) in it lead outside the folders this app may read" in rendered(said)[1]
        assert "train/cat" in rendered(said)[1]
        with pytest.raises(AppError, match="1 link.* lead outside the folders.*: cat/cat_0.jpg;"):
            client.predict([], str(folders["linked_image"] / "val"), 2, str(ours), None, False,
                           api_name="/predict_batch")
        image = handle_file(sorted((DATA / "val" / "cat").glob("*.jpg"))[0])
        outside_ckpt = str(trained["checkpoint"])  # a real checkpoint, outside every allowed folder
        with pytest.raises(AppError, match="'Checkpoint' .* is outside the folders"):
            client.predict(image, 2, outside_ckpt, None, False, api_name="/predict")
        assert "outside the folders" in h.predict.checkpoint_info(outside_ckpt, None, False)
        weights = private / "w.pth"
        weights.write_bytes(b"")
        with pytest.raises(AppError, match="'Weights file' .* is outside the folders"):
            client.submit(str(folders["good"]), "resnet18", "local file", str(weights), "head", 1, 4, 1e-3, 1e-4, 0,
                          "auto", 1, "cpu", 0, "", False, [], api_name="/train").result(timeout=60)
        # An uploaded weights file is copied into uploads/, so the path the page puts in the box is allowed.
        uploaded = h.train.weights_uploaded(str(trained["checkpoint"]))
        assert Path(uploaded).is_relative_to(h.ctx.uploads_dir) and h.ctx.policy.allows(uploaded)
        # Inside: the data root, the app's own data folder and checkpoint.
        for folder in (str(folders["good"]), str(DATA)):
            summary = client.predict(folder, 0, 1337, api_name="/check_dataset")
            assert "**2 classes**" in summary, summary
            assert len(h.predict.show_examples(folder)[h.predict.examples]) >= 4
        table, *_ = client.predict([], str(folders["good"] / "val"), 2, str(ours), None, False,
                                   api_name="/predict_batch")
        assert len(table["data"]) == 4
    finally:
        client.close()
        demo.close()


def test_uploaded_weights_copies_keep_only_the_newest(tmp_path, monkeypatch):
    """An exposed app copies each uploaded weights file into uploads/weights/ (up to 200 MB each); only the
    KEEP_UPLOADED_WEIGHTS most recently used copies stay."""
    import demo_app.tab_train as tab_train
    from core.access import AccessPolicy
    from demo_app.ui import build_app
    monkeypatch.setattr(tab_train, "KEEP_UPLOADED_WEIGHTS", 2)
    ckpt, uploads = tmp_path / "checkpoints", tmp_path / "uploads"
    h = build_app(ckpt, DATA, uploads, policy=AccessPolicy.make(True, [ckpt, DATA, uploads])).handlers
    files = []
    for i in range(3):  # as Gradio stores uploads: <cache>/<hash>/<name>
        f = tmp_path / "cache" / f"hash{i}" / "w.pth"
        f.parent.mkdir(parents=True)
        f.write_bytes(bytes([i]) * 10)
        files.append(f)
    first = Path(h.train.weights_uploaded(str(files[0])))
    h.train.weights_uploaded(str(files[1]))
    os.utime(first.parent, (0, 0))  # the oldest, until used again
    assert Path(h.train.weights_uploaded(str(files[0]))) == first and first.read_bytes() == files[0].read_bytes()
    third = Path(h.train.weights_uploaded(str(files[2])))
    assert sorted(d.name for d in (uploads / "weights").iterdir()) == ["hash0", "hash2"]
    assert third.read_bytes() == files[2].read_bytes()


def test_loopback_app_reads_any_folder(default_app, folders, trained):
    client = Client(default_app["url"], analytics_enabled=False, verbose=False)
    try:
        summary = client.predict(str(folders["private"]), 0, 1337, api_name="/check_dataset")
        assert "**2 classes**" in summary and "secret_cat" in rendered(summary)[1]
        summary = client.predict(str(folders["linked_class"]), 0, 1337, api_name="/check_dataset")
        assert "**2 classes**" in summary
        table, *_ = client.predict([], str(folders["private"] / "val"), 2, str(trained["checkpoint"]), None, False,
                                   api_name="/predict_batch")
        assert len(table["data"]) == 4
        p = default_app["demo"].handlers.predict
        assert len(p.show_examples(str(folders["private"]))[p.examples]) == 4
    finally:
        client.close()


# ---------------------------------------------------------------- item 8: names shown as text

def rendered(markdown: str) -> tuple[str, str]:
    """-> (HTML, its text): CommonMark with tables, as Gradio's renderer (marked) reads Markdown."""
    from markdown_it import MarkdownIt
    out = MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)
    return out, html.unescape(re.sub(r"<[^>]+>", "", out))


def assert_shown_as_text(markdown: str, names):
    out, text = rendered(markdown)
    for name in names:
        assert name in text, f"{name!r} not shown as itself in:\n{markdown}\n->\n{out}"
    assert not re.search(r"<(a|img|b|em|del)\b", out), out


def test_user_strings_render_as_text(default_app, trained, tmp_path):
    client = Client(default_app["url"], analytics_enabled=False, verbose=False)
    h = default_app["demo"].handlers.predict
    data, ckpt = trained["data"], str(trained["checkpoint"])
    try:
        summary = client.predict(str(data), 0, 1337, api_name="/check_dataset")
        assert "**3 classes**" in summary
        assert_shown_as_text(summary, HOSTILE)
        # a zip of the same folders (its name becomes a safe folder name)
        zpath = tmp_path / "[z](javascript:alert(1)).zip"
        with zipfile.ZipFile(zpath, "w") as z:
            for p in sorted(data.rglob("*.jpg")):
                z.write(p, p.relative_to(data).as_posix())
        _, said = client.predict(handle_file(zpath), 0, 1337, api_name="/upload_dataset_zip")
        assert_shown_as_text(said, HOSTILE)
        missing = data / "<b>gone"
        summary = client.predict(str(missing), 0, 1337, api_name="/check_dataset")
        assert_shown_as_text(summary, [str(missing)])
        # the checkpoint's classes, its batch results and the per-class line of the run's end
        assert_shown_as_text(h.checkpoint_info(ckpt, None, False), [", ".join(HOSTILE)])
        table, _, _, batch = client.predict([], str(trained["check"]), 2, ckpt, None, False,
                                            api_name="/predict_batch")
        rows = table["data"]
        wrong = [f"{r[0]} → {r[1]}" for r in rows if r[5].startswith("✗")]
        assert len(wrong) >= 2 and all("[f](javascript:x)" in w for w in wrong), rows
        assert_shown_as_text(batch, [f"{r[1]} × " for r in rows] + wrong)
        assert_shown_as_text(trained["status"], HOSTILE)
        # a non-image whose name is HTML, dropped on the image box: the message beside it
        raw = default_app["raw"]
        junk = tmp_path / "junk.png"
        junk.write_text("not an image")
        name = "<img src=x onerror=alert(1)>.png"
        predict_shown = next(d["id"] for d in raw.config()["dependencies"] if d.get("api_name") == "predict_shown")
        reply = raw.call(predict_shown, [raw.upload(junk, name), 2, ckpt, None, False, 0])  # 0: the min-confidence slider
        shown = reply["output"]["data"][1]
        assert "Not an image" in shown
        assert_shown_as_text(shown, [name])
        # and in the API's error (HTML, not Markdown): escaped once, not twice
        with pytest.raises(AppError) as e:
            client.predict(handle_file(junk), 2, ckpt, None, False, api_name="/predict")
        assert "junk.png: not an image file" in str(e.value)
    finally:
        client.close()


# ---------------------------------------------------------------- items 5 and 6: clear errors, never NaN

def damaged_copies(ckpt: Path, folder: Path) -> dict[str, Path]:
    import torch
    c = torch.load(ckpt, weights_only=True)
    n = len(c["class_names"])
    state = dict(c["model_state"])
    state["bn1.running_var"] = -state["bn1.running_var"].abs() - 1  # sqrt of a negative: NaN everywhere
    huge = dict(c["model_state"])
    huge["fc.weight"] = huge["fc.weight"].sign() * 3e38  # finite, but the logits overflow: inf - inf = NaN
    variants = {"negative_variance": {**c, "model_state": state}, "overflowing_head": {**c, "model_state": huge},
                "names_one_string": {**c, "class_names": "abcdefgh"[:n]},  # once read as n one-letter classes
                "names_ints": {**c, "class_names": list(range(n))},
                "names_duplicate": {**c, "class_names": ["a"] * n},
                "names_nested": {**c, "class_names": [["a"]] + [f"c{i}" for i in range(1, n)]}}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, obj in variants.items():
        torch.save(obj, folder / f"{name}.pt")
        out[name] = folder / f"{name}.pt"
    return out


def test_damaged_checkpoints_give_clear_errors_never_a_result(default_app, trained, tmp_path):
    client = Client(default_app["url"], analytics_enabled=False, verbose=False)
    h = default_app["demo"].handlers.predict
    image = handle_file(sorted((DATA / "val" / "cat").glob("*.jpg"))[0])
    try:
        for name, path in damaged_copies(trained["checkpoint"], tmp_path).items():
            with pytest.raises(AppError) as e:
                label, _ = client.predict(image, 2, None, handle_file(path), False, api_name="/predict")
                pytest.fail(f"{name}: answered {label}")
            said = str(e.value)
            assert path.name in said and "internal error" not in said and "verbose error" not in said, (name, said)
            said = h.predict_shown(str(DATA / "val" / "cat" / "cat_000.jpg"), 2, str(path), None, False)
            label, shown = said[h.label], said[h.pred_time]
            assert label is None and shown.startswith("⚠ **Checkpoint problem:**"), (name, shown)
            said = h.predict_batch_shown(None, str(DATA / "val"), 2, str(path), None, False)
            table, summary = said[h.batch_table], said[h.batch_summary]
            assert table is None and summary.startswith("⚠ **Checkpoint problem:**"), (name, summary)
            assert "classified" not in summary and "internal error" not in summary  # no result, NaN or not
            info = h.checkpoint_info(str(path), None, False)  # an overflowing head only shows when it runs
            assert info.startswith("⚠") or name == "overflowing_head", (name, info)
            assert "internal error" not in info
    finally:
        client.close()


def test_a_full_disk_during_training_is_said_plainly(tmp_path):
    """A save that cannot be written (the file-size limit stands in for a full
    disk: the same short write) ends the run with the reason, not 'internal error'."""
    script = f"""
import resource, signal, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
from pathlib import Path
from conftest import make_image_dataset
data = make_image_dataset(Path({str(tmp_path)!r}) / "data")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # a checkpoint is ~45 MB
import gradio as gr
from demo_app.ui import build_app
run = build_app(Path({str(tmp_path)!r}) / "ck", data, Path({str(tmp_path)!r}) / "up").handlers.train.run
try:
    frames = list(run.start(data_dir=str(data), weights_source="none", epochs=1, batch_size=4, seed=7, device="cpu"))
    print("STATUS", frames[-1][run.status])
except gr.Error as e:
    print("ERROR", e.message)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TL_OFFLINE": "1"})
    said = [line for line in r.stdout.splitlines() if line.startswith(("STATUS", "ERROR"))]
    assert said and said[-1].startswith("ERROR"), r.stdout + r.stderr
    assert "internal error" not in said[-1] and "enforce fail" not in said[-1], said[-1]
    assert re.search(r"too large|no space|could not be (written|saved)|cannot write", said[-1], re.I), said[-1]


def test_the_apps_file_copies_are_removed_when_old_and_when_it_stops(tmp_path, monkeypatch):
    """Gradio copies each upload (and each file handed out) into its cache and never empties it by itself: a
    long-running server would fill its disk. The app removes copies older than CACHE_CLEANUP's age on its
    schedule, and all of them when it stops."""
    import demo_app.ui as ui
    monkeypatch.setattr(ui, "CACHE_CLEANUP", (1, 2))  # check every second, remove after 2 s
    ckpt, uploads = tmp_path / "checkpoints", tmp_path / "uploads"
    demo = ui.build_app(ckpt, DATA, uploads)
    raw = Raw(launch(demo, ckpt, DATA, uploads))
    try:
        image = next((DATA / "val" / "cat").glob("*.jpg"))
        old = Path(raw.upload(image)["path"])
        assert old.is_file()
        wait_until(lambda: not old.exists(), 60, "the upload's copy to be removed after 2 s")
        new = Path(raw.upload(image, "other.jpg")["path"])
        assert new.is_file()
    finally:
        raw.close()
        demo.close()
    assert not new.exists()


def test_sessions_kept_in_memory_are_capped(tmp_path, monkeypatch):
    """Every new session (a script's call, a page load) gets a state object in memory (~400 KB here); Gradio
    keeps 10,000 by default. The app keeps SESSIONS_KEPT, dropping the oldest."""
    import demo_app.ui as ui
    monkeypatch.setattr(ui, "SESSIONS_KEPT", 3)
    ckpt, uploads = tmp_path / "checkpoints", tmp_path / "uploads"
    demo = ui.build_app(ckpt, DATA, uploads)
    raw = Raw(launch(demo, ckpt, DATA, uploads))
    try:
        refresh = next(d["id"] for d in raw.config()["dependencies"] if d.get("api_name") == "refresh_checkpoints")
        for _ in range(6):
            assert raw.call(refresh, [None])["success"]
        assert len(demo.state_holder.session_data) == 3
    finally:
        raw.close()
        demo.close()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_app_py_stopped_by_a_signal_removes_its_cache_copies(tmp_path, sig):
    """`kill`, `docker stop` (SIGTERM) and a closed terminal (SIGHUP) stop app.py the way Ctrl-C does, so its
    uploads' copies go too (Python's default would end the process on the spot and leave them)."""
    import signal
    cache = tmp_path / "cache"
    proc, url = start_app_py(tmp_path, env={"GRADIO_TEMP_DIR": str(cache)})
    try:
        raw = Raw(url)
        copy = Path(raw.upload(next((DATA / "val" / "cat").glob("*.jpg")))["path"])
        raw.close()
        assert copy.is_file() and copy.is_relative_to(cache)
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not copy.exists() and not [f for f in cache.rglob("*") if f.is_file() and f.stat().st_size]


@pytest.mark.browser
@pytest.mark.browser
def test_names_render_as_text_in_the_browser(default_app, trained):
    """Gradio's own Markdown renderer (marked, GFM: tables, autolinks), in Chromium."""
    from conftest import launch_chromium, need_chromium
    sync_api = need_chromium()  # skipped without Chromium; a failure under CI
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(default_app["url"])
            page.wait_for_selector("#dataset-summary")
            page.wait_for_function("document.querySelector('#dataset-summary').innerText.includes('classes')")
            box = page.locator("#data-dir input, #data-dir textarea").first
            box.fill(str(trained["data"]))
            box.press("Enter")
            page.wait_for_function("document.querySelector('#dataset-summary').innerText.includes('3 classes')")
            page.get_by_role("tab", name="Predict").click()
            ckpt = page.locator("#checkpoint input").first
            ckpt.fill(str(trained["checkpoint"]))
            ckpt.press("Enter")
            page.wait_for_function("document.querySelector('#checkpoint-info').innerText.includes('classes:')")
            folder = page.locator("#batch-folder input, #batch-folder textarea").first
            folder.fill(str(trained["check"]))
            page.locator("#batch-btn").click()
            page.wait_for_function("document.querySelector('#batch-summary').innerText.includes('wrong:')")
            for elem_id in ("dataset-summary", "checkpoint-info", "batch-summary"):
                found = page.evaluate(f"""(() => {{ const el = document.querySelector('#{elem_id}');
                    return {{text: el.innerText, tags: el.querySelectorAll('a, img, b, em, del, table table').length}};
                    }})()""")
                assert found["tags"] == 0, (elem_id, page.inner_html(f"#{elem_id}"))
                text = " ".join(found["text"].split())
                assert all(name in text for name in HOSTILE), (elem_id, text)
            assert "[f](javascript:x)" in page.locator("#batch-summary").inner_text()
        finally:
            browser.close()
