"""core/cam.py: Grad-CAM maps (Captum), their placement on the original image,
the blend, class choice and output names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from core.cam import (blend_cam, cam_for_image, cam_maps, class_index, crop_box, model_arch, unique_stems,
                      write_cam_files)
from core.data import center_crop, resize_short_side
from core.errors import UserError
from core.models import apply_policy, build_model


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_cam_maps_shape_range_frozen_backbone_and_class_dependence(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3)
    apply_policy(model, arch, "head")  # frozen backbone, as after head-only training
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 224, 224)
    maps = cam_maps(model, x, [0, 2], arch)
    assert maps.shape == (2, 224, 224) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(m.max() in (0.0, 1.0) for m in maps)  # each map scaled by its own maximum (or all zero)
    assert model_arch(model) == arch
    assert not model.training
    # the same image for two classes gives two different maps (a class's weights pick the channels)
    both = cam_maps(model, x[:1].repeat(2, 1, 1, 1), [0, 1], arch)
    assert not np.allclose(both[0], both[1])


def test_model_arch_refuses_other_models():
    with pytest.raises(UserError, match="ResNet-18 or MobileNetV2"):
        model_arch(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)))


@pytest.mark.parametrize("size", [(500, 333), (333, 500), (256, 256), (300, 1000), (180, 120)])
def test_cam_for_image_puts_the_crop_back_where_the_crop_came_from(size):
    """A white square drawn on the original goes through the real Resize+CenterCrop;
    the crop's white pixels, used as a map, must land on the square again."""
    W, H = size
    resize, crop = 256, 224
    rw, rh, top, left = crop_box(W, H, resize, crop)
    # a square inside the part of the image the crop keeps
    s = max(8, min(W, H) // 5)
    x0, y0 = W // 2 + min(W, H) // 10 - s // 2, H // 2 - min(W, H) // 10
    img = Image.new("RGB", (W, H))
    img.paste((255, 255, 255), (x0, y0, x0 + s, y0 + s))
    resized = resize_short_side(TF.pil_to_tensor(img), resize)
    assert tuple(resized.shape[1:]) == (rh, rw)  # crop_box agrees with the transform's rounding
    cropped = center_crop(resized, crop)
    cam_crop = cropped[0].float().numpy() / 255
    cam = cam_for_image(cam_crop, img, resize, crop)
    assert cam.shape == (H, W) and cam.dtype == np.float32 and cam.min() >= 0 and cam.max() <= 1
    truth = np.zeros((H, W), bool)
    truth[y0:y0 + s, x0:x0 + s] = True
    found = cam > 0.5
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.8, iou


def test_cam_for_image_is_zero_outside_the_crop():
    img = Image.new("RGB", (600, 200))
    cam = cam_for_image(np.ones((224, 224), np.float32), img, 256, 224)
    assert cam.shape == (200, 600)
    # the crop keeps 224/256 of the height and the middle 224/768 of the width
    assert cam[:, :200].max() == 0 and cam[:, -200:].max() == 0
    assert cam[100, 300] == pytest.approx(1)


def test_blend_cam_size_and_opacity():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    cam = np.zeros((30, 40), np.float32)
    cam[:, 20:] = 1
    assert blend_cam(img, cam, 0.0).tobytes() == img.tobytes()
    full = np.asarray(blend_cam(img, cam, 1.0))
    assert full.shape == (30, 40, 3)
    assert full[0, 0, 2] > full[0, 0, 0] and full[0, 39, 0] > full[0, 39, 2]  # jet: blue cold, red hot
    half = np.asarray(blend_cam(img, cam, 0.5)).astype(int)
    assert np.abs(half - (np.asarray(img).astype(int) + full) / 2).max() <= 1
    small = np.ones((3, 4), np.float32)  # a map of another size is scaled to the image
    assert blend_cam(img, small, 0.5).size == (40, 30)


def test_class_index_names_the_allowed_classes():
    assert class_index(["cat", "fish"], None) is None
    assert class_index(["cat", "fish"], "fish") == 1
    assert class_index(["cat", "fish"], "Fish") == 1
    with pytest.raises(UserError) as e:
        class_index(["cat", "fish"], "dog")
    assert "'dog'" in str(e.value) and "cat, fish" in str(e.value) and e.value.field == "cam_class"


def test_unique_stems_never_clash():
    paths = ["d/cat/001.jpg", "d/fish/001.jpg", "d/cat_001.png", "d/a.jpg", "d/a.PNG", "d/x/b.jpg"]
    names = unique_stems(paths)
    assert len({n.casefold() for n in names}) == len(paths)
    assert names[2] == "cat_001" and names[5] == "b"
    assert names[0].startswith("cat_001") and names[1] == "fish_001"


def test_write_cam_files(tmp_path):
    img = Image.new("RGB", (50, 20), "white")
    cam = np.linspace(0, 1, 1000, dtype=np.float32).reshape(20, 50)
    png, npy = write_cam_files(tmp_path, "x", img, cam)
    assert png.name == "x_cam.png" and npy.name == "x_cam.npy"
    assert Image.open(png).size == (50, 20)
    back = np.load(npy, allow_pickle=False)
    assert back.dtype == np.float32 and np.array_equal(back, cam)
