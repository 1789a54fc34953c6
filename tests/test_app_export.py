"""Export from the app's Predict tab, through its HTTP API (gradio_client, as a
remote program or the page uses it): the files come back as downloads that load
and compute what the checkpoint computes; an exported model.safetensors is a
checkpoint the tab takes (picked from the list or uploaded alone)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, ROOT

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on 127.0.0.1 with one real 1-epoch ResNet-18 run (random init, 6+4
    shipped drawings per class) under its checkpoints folder."""
    import contextlib
    import io

    import train
    from demo_app.ui import build_app, launch_options
    base = tmp_path_factory.mktemp("export_app")
    ckpts, uploads, data = base / "checkpoints", base / "uploads", base / "data"
    for split, n in (("train", 6), ("val", 4)):
        for cls in ("cat", "fish"):
            (data / split / cls).mkdir(parents=True)
            for p in sorted((ROOT / "data" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(p, data / split / cls / p.name)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setenv("TORCH_HOME", str(base / "torch_home"))
        code = train.main(["--data-dir", str(data), "--weights", "none", "--epochs", "1", "--device", "cpu",
                           "--output-dir", str(ckpts), "--run-name", "exp"])
    assert code == 0
    ckpt = Path(re.search(r"^RUN_DIR: (.+)$", out.getvalue(), re.M).group(1)) / "best_acc.pt"
    demo = build_app(ckpts, data, uploads)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpts, data, uploads))
    client = Client(url, analytics_enabled=False, verbose=False, download_files=str(base / "downloads"))
    try:
        yield {"client": client, "ckpt": ckpt, "uploads": uploads, "data": data, "checkpoints": ckpts, "demo": demo}
    finally:
        client.close()
        demo.close()


def logits_and_input(ckpt, image):
    from core.data import normalize
    from core.predict import Predictor
    pred = Predictor.load(ckpt)
    x = normalize(pred.preprocess(image)[None])
    with torch.inference_mode():
        return pred.model.eval()(x), x


def test_export_downloads_load_and_match_the_checkpoint(app):
    from core.export import load_pt2, onnx_session, read_safetensors_export
    from demo_app.runs import checkpoint_choices

    client, ckpt = app["client"], app["ckpt"]
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/export"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["selected", "uploaded", "trust", "formats"]  # no folder
    files, status = client.predict(str(ckpt), None, False, ["onnx", "pt2", "safetensors"], api_name="/export")
    got = {Path(f).name: Path(f) for f in files}
    assert sorted(got) == ["model.json", "model.onnx", "model.pt2", "model.safetensors"], files
    server = ckpt.parent / "export"  # written in the run's folder, as export.py does
    for name, f in got.items():
        assert f.read_bytes() == (server / name).read_bytes()
        assert f"`{name}`" in status
    assert "exp_" in status and "max logit difference vs PyTorch" in status

    image = sorted((app["data"] / "val" / "fish").glob("*.jpg"))[0]
    want, x = logits_and_input(ckpt, image)
    from_onnx = torch.from_numpy(onnx_session(got["model.onnx"]).run(["logits"], {"image": x.numpy()})[0])
    with torch.inference_mode():
        from_pt2 = load_pt2(got["model.pt2"]).module()(x)
    for out in (from_onnx, from_pt2):
        assert float((out - want).abs().max()) <= TOLERANCE
    loaded = read_safetensors_export(got["model.safetensors"])
    assert loaded.class_names == ["cat", "fish"] and all(
        torch.equal(v, torch.load(ckpt, weights_only=True)["model_state"][k])
        for k, v in loaded.model.state_dict().items() if not k.endswith("num_batches_tracked"))

    # the exported weights are a checkpoint of the list, and of the /predict endpoint
    assert str(server / "model.safetensors") in [v for _, v in checkpoint_choices(app["checkpoints"])]
    by_ckpt, _ = client.predict(handle_file(image), 2, str(ckpt), None, False, api_name="/predict")
    by_export, _ = client.predict(handle_file(image), 2, str(server / "model.safetensors"), None, False,
                                  api_name="/predict")
    assert by_export == by_ckpt


def test_an_uploaded_safetensors_predicts_and_exports_into_the_servers_folder(app, tmp_path):
    client, ckpt = app["client"], app["ckpt"]
    files, _ = client.predict(str(ckpt), None, False, ["safetensors"], api_name="/export")
    alone = tmp_path / "model.safetensors"  # uploaded alone: its model.json rides in its metadata
    shutil.copy(next(f for f in files if f.endswith(".safetensors")), alone)
    image = sorted((app["data"] / "val" / "cat").glob("*.jpg"))[0]
    by_ckpt, _ = client.predict(handle_file(image), 2, str(ckpt), None, False, api_name="/predict")
    by_upload, _ = client.predict(handle_file(image), 2, None, handle_file(alone), False, api_name="/predict")
    assert by_upload == by_ckpt

    files, status = client.predict(None, handle_file(alone), False, ["onnx"], api_name="/export")
    assert sorted(Path(f).name for f in files) == ["model.json", "model.onnx"]
    written = list((app["uploads"] / "exports").glob("*/model.onnx"))  # the server's folder, by content
    assert len(written) == 1 and next(f for f in files if f.endswith(".onnx")) != str(written[0])
    assert Path(next(f for f in files if f.endswith(".onnx"))).read_bytes() == written[0].read_bytes()
    want, x = logits_and_input(ckpt, image)
    from core.export import onnx_session
    got = onnx_session(written[0]).run(["logits"], {"image": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= TOLERANCE


def test_export_problems_are_said(app, tmp_path):
    from safetensors.torch import save_file

    client, ckpt = app["client"], app["ckpt"]
    with pytest.raises(AppError, match="tick at least one format"):
        client.predict(str(ckpt), None, False, [], api_name="/export")
    with pytest.raises(AppError, match="No checkpoint selected"):
        client.predict(None, None, False, ["onnx"], api_name="/export")
    panel = app["demo"].handlers.predict.export  # the page's handler: the problem in place of the links
    shown = panel.export_shown(None, None, False, ["onnx"])
    assert shown[panel.files] is None and "No checkpoint selected" in shown[panel.status]
    gone = str(tmp_path / "removed_by_the_cache_cleanup.pt")  # an upload's copy, a day later
    for said in (panel.export_shown(None, gone, False, ["onnx"])[panel.status],
                 app["demo"].handlers.predict.checkpoint_info(None, gone, False)):
        said = said.replace("\\", "")  # Markdown escapes
        assert "removed_by_the_cache_cleanup.pt is no longer on the server" in said and "upload it again" in said
        assert str(tmp_path) not in said
    save_file({k: v.contiguous() for k, v in torch.load(ckpt, weights_only=True)["model_state"].items()},
              tmp_path / "weights.safetensors")  # a foreign file: no model.json in it or beside it
    image = handle_file(sorted((app["data"] / "val" / "cat").glob("*.jpg"))[0])
    for api, args in (("/predict", (image, 2, None, handle_file(tmp_path / "weights.safetensors"), False)),
                      ("/export", (None, handle_file(tmp_path / "weights.safetensors"), False, ["onnx"]))):
        with pytest.raises(AppError, match=r"^weights.safetensors holds weights only.*from weights.json beside it, which is missing"):
            client.predict(*args, api_name=api)


def test_int8_export_from_the_app_calibrates_on_the_runs_images(app, tmp_path):
    from core.export import onnx_session

    client, ckpt = app["client"], app["ckpt"]
    files, status = client.predict(str(ckpt), None, False, ["int8"], api_name="/export")
    got = {Path(f).name: Path(f) for f in files}
    assert list(got) == ["model.onnx", "model.int8.onnx", "model.json"], files  # int8 quantizes model.onnx
    server = ckpt.parent / "export"
    assert got["model.int8.onnx"].read_bytes() == (server / "model.int8.onnx").read_bytes()
    # 6+6 training drawings calibrate, the 4+4 val drawings score it
    assert re.search(r"`model.int8.onnx` \([\d.]+ MB; calibrated on 12 training image\(s\); val accuracy on 8 "
                     r"image\(s\): float32 [\d.]+, int8 [\d.]+, top-1 agreement [\d.]+\)", status), status
    assert str(server) not in status  # no server path shown
    _, x = logits_and_input(ckpt, sorted((app["data"] / "val" / "cat").glob("*.jpg"))[0])
    assert onnx_session(got["model.int8.onnx"]).run(["logits"], {"image": x.numpy()})[0].shape == (1, 2)
    int8_scores = json.loads((server / "model.json").read_text())["int8"]
    client.predict(str(ckpt), None, False, ["safetensors"], api_name="/export")  # another format, same checkpoint
    meta = json.loads((server / "model.json").read_text())
    assert meta["int8"] == int8_scores and "model.int8.onnx" in meta["files"]  # the int8 file keeps its scores

    # a checkpoint that names no dataset, or one whose dataset is gone: said, nothing quantized
    c = torch.load(ckpt, weights_only=True)
    for args, said in (({}, "names no dataset folder; export.py --quantize int8 --data-dir DIR"),
                       ({"data_dir": str(tmp_path / "gone")}, "is not there (moved?)")):
        odd = tmp_path / "odd.pt"
        torch.save({**c, "args": args}, odd)
        with pytest.raises(AppError, match=re.escape(said)):
            client.predict(None, handle_file(odd), False, ["int8"], api_name="/export")


def test_exports_of_uploads_keep_only_the_newest_folders(app, tmp_path, monkeypatch):
    """Each uploaded checkpoint's export gets its own folder; older ones are removed (the page got copies)."""
    import demo_app.tab_export as tab_export
    from core.zipimport import file_sha256

    monkeypatch.setattr(tab_export, "KEEP_UPLOAD_EXPORTS", 1)
    client, exports = app["client"], app["uploads"] / "exports"
    first = tmp_path / "first.pt"
    shutil.copy(app["ckpt"], first)
    files, _ = client.predict(None, handle_file(first), False, ["safetensors"], api_name="/export")
    assert [d.name for d in exports.iterdir()] == [file_sha256(first)[:16]]
    second = Path(next(f for f in files if f.endswith(".safetensors")))  # another upload: another folder
    again, _ = client.predict(None, handle_file(second), False, ["safetensors"], api_name="/export")
    assert [d.name for d in exports.iterdir()] == [file_sha256(second)[:16]]
    assert sorted(Path(f).name for f in again) == sorted(f.name for f in (exports / file_sha256(second)[:16]).iterdir())


def test_a_failed_export_of_an_upload_leaves_no_folder(app, tmp_path):
    """int8 fails after model.onnx is written (the recorded folder has no train/): nothing stays on disk."""
    from core.zipimport import file_sha256

    c = torch.load(app["ckpt"], weights_only=True)
    odd = tmp_path / "no_train.pt"
    torch.save({**c, "args": {**c.get("args", {}), "data_dir": str(app["uploads"])}}, odd)
    with pytest.raises(AppError, match="Export failed|train"):
        app["client"].predict(None, handle_file(odd), False, ["onnx", "int8"], api_name="/export")
    assert not (app["uploads"] / "exports" / file_sha256(odd)[:16]).exists()
