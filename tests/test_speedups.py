"""The speed-ups compute the same thing: BatchNorm folding, scaled JPEG decoding,
tensor resizing, and batched folder prediction with a decode-ahead thread."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from core.data import decode_resized, normalize, resize_short_side
from core.images import load_rgb
from core.models import apply_policy, build_model, fold_batchnorm, split_model
from core.predict import Predictor, list_images


def model_with_real_batchnorm(arch: str) -> torch.nn.Module:
    """Random model whose BatchNorms are far from identity, so folding is really tested."""
    torch.manual_seed(0)
    m = build_model(arch, 3, 0.0, "none")
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return m.eval().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("part", ["whole", "head", "last"])
def test_fold_batchnorm_is_the_same_function(arch, part):
    m = model_with_real_batchnorm(arch)
    module = m if part == "whole" else split_model(apply_policy(m, arch, part), arch, part)[0]
    n_bn = sum(isinstance(x, torch.nn.BatchNorm2d) for x in module.modules())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fused = fold_batchnorm(module)
    assert n_bn > 0 and not any(isinstance(x, torch.nn.BatchNorm2d) for x in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    x = torch.randn(3, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = module(x), fused(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # The original keeps its BatchNorms and values: training still uses it.
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in module.modules()) == n_bn
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_fold_batchnorm_leaves_unknown_structures_alone():
    # A BatchNorm that does not directly follow a conv (here: after a ReLU) must stay.
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)).eval()
    m[2].running_mean.fill_(0.5)
    fused = fold_batchnorm(m)
    assert isinstance(fused[2], torch.nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(fused(x), m(x))


def big_photo(path, size=(1600, 1200)) -> Image.Image:
    """A smooth photo-like JPEG large enough for scaled decoding."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h)) + 64], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    img.save(path, quality=92)
    return img


def test_large_jpeg_decodes_scaled_but_matches_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    big_photo(path)
    small = load_rgb(path, min_side=256)
    assert small.size == (400, 300)  # 1/4 scale: the largest reduction keeping the short side >= 256
    assert load_rgb(path).size == (1600, 1200)
    scaled = decode_resized(str(path), 256).float()
    full = resize_short_side(TF.pil_to_tensor(load_rgb(path)), 256).float()
    assert scaled.shape == full.shape == (3, 256, 341)
    assert (scaled - full).abs().mean() < 2.0  # grey levels, out of 255


def test_small_and_png_images_are_decoded_in_full(tmp_path):
    big_photo(tmp_path / "big.png")
    big_photo(tmp_path / "mid.jpg", size=(500, 400))  # short side < 2 x 256: no reduction
    assert load_rgb(tmp_path / "big.png", min_side=256).size == (1600, 1200)
    assert load_rgb(tmp_path / "mid.jpg", min_side=256).size == (500, 400)


def test_tensor_resize_matches_pil_resize(tmp_path):
    img = load_rgb(big_photo(tmp_path / "p.jpg", size=(700, 500)))
    via_pil = TF.pil_to_tensor(TF.resize(img, 256, antialias=True)).float()
    via_tensor = resize_short_side(TF.pil_to_tensor(img), 256).float()
    assert via_pil.shape == via_tensor.shape
    assert (via_pil - via_tensor).abs().max() <= 2


@pytest.mark.parametrize("batch_size", [None, 1, 5])
def test_folder_prediction_equals_one_at_a_time(catfish_mini, tmp_path, batch_size):
    """Batched, decode-ahead prediction gives each image the same answer as
    predicting it alone, in order, with a broken file reported in place."""
    paths = list_images(catfish_mini / "val")[:11]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths.insert(4, str(broken))
    pred = Predictor(model_with_real_batchnorm("mobilenet_v2"), ["a", "b", "c"])
    got = list(pred.predict_paths(paths, k=3, batch_size=batch_size))
    assert [g.path for g in got] == paths
    assert got[4].error and got[4].topk == []
    for g in got[:4] + got[5:]:
        alone = pred.predict_image(g.path, k=3)
        assert g.error is None and g.label == alone[0][0]
        assert np.allclose([p for _, p in g.topk], [p for _, p in alone], atol=1e-4)


def test_predictor_runs_the_model_it_was_given(catfish_mini):
    """The folded copy answers like the unfused model on a real photo."""
    m = model_with_real_batchnorm("resnet18")
    pred = Predictor(m, ["a", "b", "c"])
    img = load_rgb(list_images(catfish_mini / "val")[0])
    x = normalize(pred.preprocess(img)[None]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = torch.softmax(m(x), 1)[0]
    assert torch.allclose(pred.probabilities([img])[0], want, atol=1e-5)


def test_cgroup_quota_caps_threads(tmp_path, monkeypatch):
    """A container quota (cgroup v2 cpu.max or v1 cfs) limits torch's threads; no quota means the affinity mask."""
    from core import device
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert device.cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert device.cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert device.cgroup_cpu_quota(tmp_path / "v1") == 1.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert device.cgroup_cpu_quota(tmp_path / "v1") is None

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(device, "cgroup_cpu_quota", lambda: 1.0)
        assert device.usable_cpus() == 1 and device.configure_threads() == 1 == torch.get_num_threads()
        monkeypatch.setattr(device, "cgroup_cpu_quota", lambda: None)
        assert 1 <= device.usable_cpus() <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_torch_threads_runs_a_block_on_n_threads_and_restores_the_count():
    from core.device import torch_threads
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError), torch_threads(1):
        1 / 0
    assert torch.get_num_threads() == before  # restored when the block fails too
