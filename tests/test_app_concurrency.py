"""Several users at once and safe server defaults (issue 5, items 6 and 7), through
the app's HTTP API: two sessions racing for Start, predicts served during a
training run, the upload size limit, the bind address and the file route."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_until
from test_app_api import CHECKPOINT, DATA, ROOT, STATUS, free_port, run_dir_of, train_job

gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

TEST_LIMIT = "256kb"  # the fixture's app runs with this upload limit instead of the real one
TEST_LIMIT_BYTES = 256 * 1024


def new_client(app) -> Client:
    return Client(app["url"], analytics_enabled=False, verbose=False, download_files=str(app["downloads"]))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app as app.py launches it (same launch_options, default_concurrency_limit=1),
    except for a small upload limit set through demo_app.ui.MAX_FILE_SIZE."""
    import demo_app.ui as ui
    base = tmp_path_factory.mktemp("conc_app")
    ckpt, uploads = base / "checkpoints", base / "uploads"
    demo = ui.build_app(ckpt, DATA, uploads)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ui, "MAX_FILE_SIZE", TEST_LIMIT)
        opts = ui.launch_options(ckpt, DATA, uploads)
    _, url, _ = demo.queue(default_concurrency_limit=1).launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **opts)
    try:
        yield {"url": url, "demo": demo, "checkpoints": ckpt, "downloads": base / "downloads",
               "service": demo.handlers.service}
    finally:
        demo.handlers.service.stop(wait=30)
        demo.close()


def run_dirs(app) -> list[Path]:
    return sorted(p for p in app["checkpoints"].iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def race(app):
    """Two sessions (two Clients) press Start at the same moment with the same settings."""
    clients = [new_client(app), new_client(app)]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def press_start(i):
        try:
            barrier.wait(timeout=30)
            job = train_job(clients[i], epochs=2)
            results[i] = ("completed", job.result(timeout=240), time.monotonic())
        except AppError as e:
            results[i] = ("refused", str(e), time.monotonic())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = ("other", repr(e), time.monotonic())

    try:
        threads = [threading.Thread(target=press_start, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a Start request never returned (deadlock?)"
    finally:
        for c in clients:
            c.close()
    return {"results": results, "run_dirs": run_dirs(app)}


def race_winner(race):
    (_, final, _), = [r for r in race["results"] if r[0] == "completed"]
    return final


# ---------------------------------------------------------------- several users

def test_two_sessions_press_start_one_trains_the_other_is_told_why(race, app):
    kinds = sorted(r[0] for r in race["results"])
    assert kinds == ["completed", "refused"], race["results"]
    (_, final, t_done), = [r for r in race["results"] if r[0] == "completed"]
    (_, message, t_refused), = [r for r in race["results"] if r[0] == "refused"]
    assert "already in progress" in message and "press Stop" in message, message
    assert "Traceback" not in message
    assert t_refused < t_done, "the refusal came at once, while the other run was still training"
    assert "Completed" in final[STATUS] and "2 epoch(s)" in final[STATUS], final[STATUS]
    assert [p.name for p in race["run_dirs"]] == [run_dir_of(final[STATUS]).name], "exactly one run on disk"
    assert app["service"].current.done.is_set(), "the run is over (its lock released) when its stream ends"


def test_20_concurrent_predicts_during_training_are_all_correct(race, app):
    from core.predict import Predictor
    ckpt = race_winner(race)[CHECKPOINT]["value"]
    images = sorted((DATA / "val").rglob("*.jpg"))[:20]
    assert len(images) == 20
    reference = Predictor.load(ckpt, "cpu")  # its own instance, not the app's cached one
    expected = {p: dict(reference.predict_image(p, 2)) for p in images}

    trainer = new_client(app)
    clients = [new_client(app) for _ in range(4)]
    try:
        # Full fine-tune, many epochs: still training long after the predicts are answered.
        job = train_job(trainer, policy="full", epochs=50, batch_size=4, run_name="busy")
        def training():
            assert not job.done(), job.result()
            h = app["service"].current
            return h is not None and h.run_dir is not None and not h.done.is_set()
        wait_until(training, 240, "the training run to start")
        handle = app["service"].current

        barrier = threading.Barrier(len(images))
        answers: dict = {}

        def ask(i, path):
            try:
                barrier.wait(timeout=30)
                sub = clients[i % len(clients)].submit(handle_file(path), 2, ckpt, None, False, api_name="/predict")
                answers[path] = sub.result(timeout=120)
            except BaseException as e:  # noqa: BLE001 - reported below
                answers[path] = e

        threads = [threading.Thread(target=ask, args=(i, p), daemon=True) for i, p in enumerate(images)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a predict request never returned (deadlock?)"
        errors = {p.name: a for p, a in answers.items() if isinstance(a, BaseException)}
        assert not errors, errors
        served = 0
        for path in images:
            label, timing = answers[path]
            conf = {c["label"]: c["confidence"] for c in label["confidences"]}
            want = expected[path]
            assert label["label"] == max(want, key=want.get), path.name
            assert set(conf) == set(want), path.name
            for name, p in want.items():
                assert conf[name] == pytest.approx(p, abs=1e-4), (path.name, name)
            assert sum(conf.values()) == pytest.approx(1.0, abs=1e-4)
            assert "ms" in timing
            served += 1
        assert served == 20
        # All of them were answered while the run kept training.
        assert app["service"].current is handle and not handle.done.is_set() and not job.done()

        stop_status = trainer.predict(api_name="/stop")
        end = job.result(timeout=120)
        for status in (stop_status, end[STATUS]):
            assert "Stopped" in status, status
        assert handle.done.is_set()
    finally:
        app["service"].stop(wait=60)
        for c in clients + [trainer]:
            c.close()


# ---------------------------------------------------------------- safe server defaults

def test_upload_over_the_size_limit_is_refused(app, tmp_path):
    from gradio.utils import _parse_file_size
    import demo_app.ui as ui
    real = _parse_file_size(ui.launch_options(tmp_path / "c", tmp_path / "d", tmp_path / "u")["max_file_size"])
    assert real is not None and 0 < real <= 1024 ** 3, "the app sets an upload limit of at most 1 GB"

    url = app["url"] + "gradio_api/upload"
    too_big = httpx.post(url, files={"files": ("big.bin", b"\0" * (TEST_LIMIT_BYTES + 1))}, timeout=60)
    assert too_big.status_code == 413, (too_big.status_code, too_big.text)
    assert "maximum allowed size" in too_big.text
    at_limit = httpx.post(url, files={"files": ("fits.bin", b"\1" * TEST_LIMIT_BYTES)}, timeout=60)
    assert at_limit.status_code == 200, (at_limit.status_code, at_limit.text)
    (stored,) = at_limit.json()
    assert Path(stored).stat().st_size == TEST_LIMIT_BYTES
    image = sorted((DATA / "val" / "cat").glob("*.jpg"))[0]
    ok = httpx.post(url, files={"files": (image.name, image.read_bytes(), "image/jpeg")}, timeout=60)
    assert ok.status_code == 200 and Path(ok.json()[0]).read_bytes() == image.read_bytes()


class AppProcess:
    """`python app.py ...` in the repo root; stdout and stderr lines are collected by threads."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "app.py"), *map(str, args)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.pumps = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                      for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.pumps:
            t.start()

    def _pump(self, stream, sink):
        for line in stream:
            sink.append(line)
            self.lines.put(line)

    def wait_for(self, *texts: str, timeout: float) -> str:
        """The first line containing any of `texts`."""
        deadline = time.monotonic() + timeout
        while True:
            for ln in self.out + self.err:
                if any(text in ln for text in texts):
                    return ln
            exited = self.proc.poll() is not None and not any(t.is_alive() for t in self.pumps)
            assert time.monotonic() < deadline and not (exited and self.lines.empty()), \
                f"no {texts!r} within {timeout} s (rc={self.proc.poll()}):\n{''.join(self.out + self.err)[-3000:]}"
            try:
                self.lines.get(timeout=0.5)
            except queue.Empty:
                pass

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def listen_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.split(":")
            if state != "0A" or int(p, 16) != port:  # 0A: LISTEN
                continue
            if v6:
                found.add("::1" if addr == "0" * 24 + "01000000" else
                          "::" if set(addr) == {"0"} else f"v6:{addr}")
            else:
                found.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
    return found


def http_get(url: str, timeout: float = 10) -> httpx.Response:
    return httpx.get(url, timeout=timeout)


def test_app_binds_loopback_by_default_and_serves_only_its_folders(tmp_path):
    from gradio.utils import _parse_file_size
    import demo_app.ui as ui
    ckpt = tmp_path / "checkpoints"
    kept = ckpt / "some-run" / "metrics.csv"
    kept.parent.mkdir(parents=True)
    kept.write_text("epoch,train_loss\n1,0.5\n")
    port = free_port()
    app = AppProcess("--port", port, "--checkpoints-dir", ckpt)
    try:
        line = app.wait_for("Transfer-learning app:", timeout=150)
        assert f"http://127.0.0.1:{port}" in line
        base = f"http://127.0.0.1:{port}"
        def config_answered():
            assert app.proc.poll() is None, "".join(app.out + app.err)
            try:
                r = http_get(f"{base}/config")
            except httpx.TransportError:
                return None
            return r if r.status_code == 200 else None
        config = wait_until(config_answered, 120, "the server to answer /config")

        assert listen_addresses(port) == {"127.0.0.1"}, listen_addresses(port)
        assert not any("WARNING" in ln for ln in app.err), "".join(app.err)
        assert config.json()["max_file_size"] == _parse_file_size(ui.MAX_FILE_SIZE), "app.py sets the upload limit"

        def status(path) -> int:
            return http_get(f"{base}/gradio_api/file={path}").status_code
        assert status("/etc/passwd") in (403, 404)
        assert status(f"{ckpt}/../../../../../../etc/passwd") in (403, 404)
        assert status(ROOT / "core" / "engine.py") in (403, 404)
        assert status(ROOT / "app.py") in (403, 404)
        ok = http_get(f"{base}/gradio_api/file={kept}")
        assert ok.status_code == 200 and ok.text == kept.read_text(), "files under the checkpoints folder are served"
    finally:
        app.close()


def test_exposed_host_prints_a_warning(tmp_path):
    app = AppProcess("--host", "0.0.0.0", "--port", free_port(), "--checkpoints-dir", tmp_path / "checkpoints",
                     "--auth", "teacher:pw")  # (without a login, app.py refuses 0.0.0.0: tests/test_security_app.py)
    try:
        # The warning comes before the app is built; the URL line after (so: no warning at all).
        app.wait_for("WARNING: listening on", "Transfer-learning app:", timeout=150)
        warnings = [ln for ln in app.err if "WARNING: listening on 0.0.0.0" in ln]
        assert warnings, f"no exposure warning on stderr:\n{''.join(app.out + app.err)}"
        line = warnings[0]
        assert "anyone who can reach port" in line and "after logging in" in line and "--host 127.0.0.1" in line
        assert "pickled model files are never loaded" in line
    finally:
        app.close()
