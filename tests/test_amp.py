"""--amp 1: bfloat16 mixed precision on CPUs with native bf16, float32 (with a
note) on CPUs without. Tests force either answer of the hardware probe, so both
paths run on any machine (bf16 is emulated, slowly but correctly, where the CPU
lacks it)."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import cpu_only, train_config as cfg_for, train_run as run
from core import checkpoint as ck
from core import device as dev

pytestmark = cpu_only  # the CPU's bfloat16 path; tests/test_cuda.py has the GPU's float16 one
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def cache_mb(start) -> float:
    note = next(n for n in start.notes if n.startswith("feature cache"))
    return float(re.search(r"([\d.]+) MB", note).group(1))


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)


def test_amp_on_cpu_without_bf16_is_float32_and_says_so(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    events, amp_epochs, _ = run(cfg_for(tiny_dataset, tmp_path / "a", policy="last", amp=True))
    _, plain_epochs, _ = run(cfg_for(tiny_dataset, tmp_path / "p", policy="last"))
    from cli.common import say
    assert any("--amp 1 has no effect on this CPU" in say(n) for n in events[0].notes)
    assert [[getattr(e, k) for k in METRICS] for e in amp_epochs] == [[getattr(e, k) for k in METRICS] for e in plain_epochs]


@pytest.mark.parametrize("policy", ["head", "last"])
def test_bf16_cache_matches_uncached_path_in_half_the_memory(tiny_dataset, tmp_path, bf16_cpu, policy):
    cached = run(cfg_for(tiny_dataset, tmp_path / "c", policy=policy, augment="light", amp=True, epochs=3))
    plain = run(cfg_for(tiny_dataset, tmp_path / "p", policy=policy, augment="light", amp=True, cache="off", epochs=3))
    fp32 = run(cfg_for(tiny_dataset, tmp_path / "f", policy=policy, augment="light", epochs=3))
    assert any("bfloat16 mixed precision" in n for n in cached[0][0].notes)
    assert cache_mb(cached[0][0]) == pytest.approx(cache_mb(fp32[0][0]) / 2, rel=0.01)  # activations kept as bf16
    for a, b in zip(cached[1], plain[1]):
        for k in METRICS:  # the same bf16 ops either way, up to batch-size-dependent kernels
            assert getattr(a, k) == pytest.approx(getattr(b, k), abs=0.02), k
    # Autocast really ran: bf16 rounding moves the first epoch's loss a little off
    # float32's (later epochs of a random-init net on 8 images amplify any difference).
    assert cached[1][0].train_loss != fp32[1][0].train_loss
    assert cached[1][0].train_loss == pytest.approx(fp32[1][0].train_loss, rel=0.03)
    # weights and optimizer state stay float32 in a weights_only checkpoint
    state = ck.read_checkpoint(f"{cached[2].run_dir}/latest.pt")
    assert {v.dtype for v in state["model_state"].values() if v.is_floating_point()} == {torch.float32}


def test_bf16_keeps_accuracy_on_real_photos(catfish_mini, mobilenet_weights, tmp_path, bf16_cpu):
    """Real ImageNet features, layer4-style policy: mixed precision must not cost accuracy."""
    kw = dict(arch="mobilenet_v2", weights=str(mobilenet_weights), policy="last", epochs=3, batch_size=16)
    _, amp_epochs, amp_end = run(cfg_for(catfish_mini, tmp_path / "a", amp=True, **kw))
    events, fp32_epochs, _ = run(cfg_for(catfish_mini, tmp_path / "f", **kw))
    n_val = len(events[0].dataset.val.samples)
    assert amp_end.status == "completed"
    assert max(e.val_acc for e in amp_epochs) >= max(e.val_acc for e in fp32_epochs) - 1 / n_val
    assert amp_epochs[-1].val_loss == pytest.approx(fp32_epochs[-1].val_loss, abs=0.05)


def test_loss_scale_is_saved_and_restored_on_resume(tiny_dataset, tmp_path, bf16_cpu, monkeypatch):
    """float16 autocast (CUDA --amp 1) learns a loss scale; a resume used to start
    over at the default and skip steps relearning it. No CUDA here, so the
    scaler is made for the CPU (GradScaler works there too): latest.pt keeps
    its state, and --resume hands that state to the new run's scaler."""
    from core import engine
    made, real = [], engine.make_grad_scaler

    def cpu_scaler(cfg, device, saved):
        made.append(real(cfg, device, saved, kind="cpu"))
        if saved is None:  # a new run: a scale a resume could not guess (default 65536, growth 2)
            made[-1].load_state_dict({**made[-1].state_dict(), "scale": 1234.0})
        return made[-1]
    monkeypatch.setattr(engine, "make_grad_scaler", cpu_scaler)
    _, _, end = run(cfg_for(tiny_dataset, tmp_path, policy="last", amp=True, epochs=1))
    saved = torch.load(f"{end.run_dir}/latest.pt", weights_only=True)["scaler_state"]
    assert saved["scale"] == made[0].get_scale() != 65536.0
    _, epochs, end2 = run(cfg_for(tiny_dataset, tmp_path, policy="last", amp=True, epochs=2,
                                  resume=f"{end.run_dir}/latest.pt"))
    assert [e.epoch for e in epochs] == [2] and end2.status == "completed"
    assert made[1].state_dict()["_growth_tracker"] >= saved["_growth_tracker"]
    assert made[1].get_scale() in (saved["scale"], saved["scale"] * 2)  # continued from the saved scale
    # no --amp, or not CUDA: no scaler, nothing saved
    assert real(cfg_for(tiny_dataset, tmp_path), torch.device("cpu"), saved, kind="cpu") is None
    assert real(cfg_for(tiny_dataset, tmp_path, amp=True), torch.device("cpu"), saved) is None
