"""The CUDA paths: float16 autocast with loss scaling, the feature cache and fused
AdamW on the GPU, and checkpoints that move between a GPU and a CPU-only machine.
They run only where torch sees a GPU (CI has none): `python -m pytest
tests/test_cuda.py` there. `TL_TEST_DEVICE=cuda python -m pytest tests/test_engine.py`
runs the engine tests on the GPU too (a few of them check CPU-only choices)."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import ROOT, train_config, train_run as run
from core import checkpoint as ck, fileio
from core.predict import Predictor, list_images
from test_cli import cli, run_dir_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here: these tests check the CUDA paths")

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.fixture
def no_tf32(monkeypatch):
    """Plain float32 kernels, for tests that compare results at float32 tolerance:
    cuDNN's default TF32 convolutions round to ~1e-3, which a few training steps
    of a random network amplify."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def on_gpu(data, out, **kw):
    return train_config(data, out, **{"device": "cuda", **kw})


def tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def cache_mb(started) -> float:
    note = next(n for n in started.notes if n.startswith("feature cache"))
    return float(re.search(r"([\d.]+) MB", note).group(1))


@pytest.mark.parametrize("policy", ["head", "last"])
def test_feature_cache_on_gpu_matches_uncached_path(tiny_dataset, tmp_path, no_tf32, policy):
    cached = run(on_gpu(tiny_dataset, tmp_path / "c", policy=policy, augment="light", epochs=3))
    plain = run(on_gpu(tiny_dataset, tmp_path / "p", policy=policy, augment="light", cache="off", epochs=3))
    assert cached[0][0].device.startswith("cuda")
    assert "frozen layers run once" in " ".join(cached[0][0].notes)
    for a, b in zip(cached[1], plain[1]):
        for k in METRICS:
            # nondeterministic GPU kernels: ~5e-5 apart between any two runs
            assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-4, abs=1e-4), k


@pytest.mark.parametrize("policy", ["last", "full"])
def test_amp_on_gpu_is_float16_with_a_loss_scale_that_resume_keeps(tiny_dataset, tmp_path, monkeypatch, policy):
    from core import engine
    made, real = [], engine.make_grad_scaler

    def recording(cfg, device, saved):
        scaler = real(cfg, device, saved)
        made.append((scaler, scaler.state_dict() if scaler else None))
        return scaler
    monkeypatch.setattr(engine, "make_grad_scaler", recording)

    events, amp_epochs, end = run(on_gpu(tiny_dataset, tmp_path / "a", policy=policy, amp=True, epochs=1))
    fp32_events, fp32_epochs, _ = run(on_gpu(tiny_dataset, tmp_path / "f", policy=policy, epochs=1))
    assert end.status == "completed"
    assert any("float16 mixed precision with loss scaling" in n for n in events[0].notes), events[0].notes
    assert made[0][0] is not None and made[1][0] is None  # a scaler for --amp 1 only
    assert amp_epochs[0].train_loss != fp32_epochs[0].train_loss  # autocast ran
    if policy == "last":
        # Close to float32 (under 'full', AdamW's first steps move every weight by about lr
        # whatever the gradient's size, so float16 noise in tiny gradients changes a random
        # network's second batch a lot: no comparison there).
        assert amp_epochs[0].train_loss == pytest.approx(fp32_epochs[0].train_loss, rel=0.03)
        # cached activations are kept in float16: half the memory
        assert cache_mb(events[0]) == pytest.approx(cache_mb(fp32_events[0]) / 2, rel=0.01)

    latest = f"{end.run_dir}/latest.pt"
    saved = ck.read_checkpoint(latest)
    assert saved["scaler_state"]["scale"] == made[0][0].get_scale()
    assert {v.dtype for v in saved["model_state"].values() if v.is_floating_point()} == {torch.float32}
    # a scale a fresh scaler could not guess (default 65536): the resumed run must start from it
    saved["scaler_state"]["scale"] = 1234.0
    fileio.atomic_torch_save(saved, tmp_path / "scaled.pt")
    _, epochs, end2 = run(on_gpu(tiny_dataset, tmp_path / "r", policy=policy, amp=True, epochs=2,
                                 resume=str(tmp_path / "scaled.pt")))
    assert end2.status == "completed" and [e.epoch for e in epochs] == [2]
    assert made[-1][1]["scale"] == 1234.0


def test_gpu_checkpoints_load_and_resume_on_cpu_and_back(tiny_dataset, tmp_path, no_tf32):
    """Train on a GPU, continue on a laptop: every tensor of latest.pt is on the CPU
    (a plain torch.load works without CUDA), and a resume on either device
    continues with the results an uninterrupted run gets."""
    first = run(on_gpu(tiny_dataset, tmp_path / "g", policy="last", epochs=1))[2]
    latest = f"{first.run_dir}/latest.pt"
    raw = torch.load(latest, weights_only=True)  # no map_location
    assert all(t.device.type == "cpu" for t in tensors(raw))
    assert all(g["fused"] is True for g in raw["optimizer_state"]["param_groups"])
    fileio.atomic_torch_save(raw, tmp_path / "copy.pt")  # a second copy to resume on the other device

    whole = run(on_gpu(tiny_dataset, tmp_path / "w", policy="last", epochs=2))[2]
    on_cpu = run(train_config(tiny_dataset, tmp_path / "x", policy="last", epochs=2, device="cpu", resume=latest))
    back = run(on_gpu(tiny_dataset, tmp_path / "y", policy="last", epochs=2, resume=str(tmp_path / "copy.pt")))
    for resumed in (on_cpu, back):
        assert resumed[2].status == "completed" and [e.epoch for e in resumed[1]] == [2]
        for k in ("train_loss", "val_loss"):  # CPU vs GPU float32 kernels: rounding apart
            assert resumed[2].history[1][k] == pytest.approx(whole.history[1][k], rel=1e-3), k
    assert on_cpu[0][0].device == "cpu" and back[0][0].device.startswith("cuda")


def test_prediction_on_gpu_matches_cpu(tiny_dataset, tmp_path):
    end = run(on_gpu(tiny_dataset, tmp_path, policy="full", epochs=2))[2]
    gpu = Predictor.load(f"{end.run_dir}/best_acc.pt", "cuda")
    cpu = Predictor.load(f"{end.run_dir}/best_acc.pt", "cpu")
    paths = list_images(tiny_dataset / "val")
    batched = {p.path: p.topk for p in gpu.predict_paths(paths, k=2)}
    for path in paths:
        one, ref = gpu.predict_image(path, k=2), cpu.predict_image(path, k=2)
        assert [c for c, _ in one] == [c for c, _ in ref] == [c for c, _ in batched[path]]
        assert [p for _, p in one] == pytest.approx([p for _, p in ref], abs=2e-3)
        assert [p for _, p in one] == pytest.approx([p for _, p in batched[path]], abs=2e-3)


def test_cli_trains_and_predicts_on_gpu(tiny_dataset, tmp_path):
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cuda", "--amp", "1", "--epochs", "2",
            "--weights", "none", "--policy", "last", "--batch-size", "4", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "device=cuda" in r.stdout and "float16 mixed precision" in r.stdout + r.stderr
    run_dir = run_dir_of(r.stdout)
    p = cli("predict.py", "--image", str(tiny_dataset / "val"), "--checkpoint", str(run_dir / "best_acc.pt"),
            "--device", "cuda", "--topk", "2", "--all", "1")
    assert p.returncode == 0, p.stderr
    assert len(re.findall(r"^  1\) (cat|fish)  p=", p.stdout, re.M)) == 4, p.stdout


def test_amp_on_gpu_keeps_accuracy_on_real_photos(catfish_mini, mobilenet_weights, tmp_path):
    kw = dict(arch="mobilenet_v2", weights=str(mobilenet_weights), policy="last", epochs=3, batch_size=16)
    _, amp_epochs, amp_end = run(on_gpu(catfish_mini, tmp_path / "a", amp=True, **kw))
    events, fp32_epochs, _ = run(on_gpu(catfish_mini, tmp_path / "f", **kw))
    n_val = len(events[0].dataset.val.samples)
    assert amp_end.status == "completed"
    assert max(e.val_acc for e in fp32_epochs) >= 0.9
    assert max(e.val_acc for e in amp_epochs) >= max(e.val_acc for e in fp32_epochs) - 1 / n_val
    assert amp_epochs[-1].val_loss == pytest.approx(fp32_epochs[-1].val_loss, abs=0.05)
