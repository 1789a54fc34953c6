"""Grad-CAM: where in the image the model found the evidence for a class.

The maps come from Captum's LayerGradCam (PyTorch's own interpretability
library; see README "Grad-CAM") at the last convolutional stage, 7x7 at a 224
crop: ResNet-18's layer4, MobileNetV2's last `features` block. Nothing here runs
unless a CAM is asked for, so plain prediction stays a no-grad forward pass.

    cam_maps(model, batch, class_indices, arch)  -> float32 [N, crop, crop] in [0, 1]
    cam_for_image(cam_crop, image, resize, crop) -> float32 [H, W] on the original image
    blend_cam(image, cam, alpha)                 -> PIL image, heatmap over the image
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError

CAM_LAYER = {"resnet18": "layer4", "mobilenet_v2": "features[-1]"}  # what the README and errors call them
COLORMAP = "jet"  # the usual Grad-CAM palette: blue = no evidence, red = most


def target_layer(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """The layer Grad-CAM reads: the last one with a spatial map."""
    try:
        return model.layer4 if arch == "resnet18" else model.features[-1]
    except (AttributeError, IndexError, TypeError):
        raise UserError(f"the model has no {CAM_LAYER.get(arch, arch)} layer, so no Grad-CAM can be computed "
                        f"(Grad-CAM works on ResNet-18 and MobileNetV2 models)", field="cam") from None


def model_arch(model: torch.nn.Module) -> str:
    """resnet18 or mobilenet_v2, told from the module's own layers (a full
    pickled model carries no arch field); UserError for anything else."""
    from .models import HEAD_NAME
    for arch in HEAD_NAME:
        layer = {"resnet18": "layer4", "mobilenet_v2": "features"}[arch]
        if isinstance(getattr(model, layer, None), torch.nn.Module) and hasattr(model, HEAD_NAME[arch]):
            return arch
    raise UserError(f"Grad-CAM needs a ResNet-18 or MobileNetV2 model; this {type(model).__name__} has neither "
                    f"a layer4 nor a features block", field="cam")


def cam_maps(model: torch.nn.Module, batch: torch.Tensor, class_indices, arch: str) -> np.ndarray:
    """float32 [N, h, w] in [0, 1]: Grad-CAM of batch[i] (normalised [N, 3, h, w],
    as Predictor builds it) for class class_indices[i], upsampled to the crop.
    Each map is scaled by its own maximum; a class with no positive evidence
    anywhere gives an all-zero map rather than noise blown up to 1."""
    from captum.attr import LayerAttribution, LayerGradCam
    n = len(batch)
    target = [int(c) for c in class_indices]
    if len(target) != n:
        raise ValueError(f"{n} images but {len(target)} class indices")
    if n == 0:
        return np.zeros((0, *batch.shape[-2:]), np.float32)
    was_training = model.training
    model.eval()
    # Frozen weights (requires_grad False) are fine: Grad-CAM needs gradients
    # with respect to the layer's output, which an input that requires grad gives.
    x = batch.detach().clone().requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            attr = LayerGradCam(model, target_layer(model, arch)).attribute(x, target=target, relu_attributions=True)
            up = LayerAttribution.interpolate(attr.detach().float(), tuple(batch.shape[-2:]), interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    maps = up[:, 0].clamp_(min=0).cpu()
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    top = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    maps = torch.where(top > 0, maps / top.clamp(min=1e-12), torch.zeros_like(maps))
    return maps.clamp_(0, 1).numpy().astype(np.float32, copy=False)


def crop_box(width: int, height: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(rw, rh, top, left): the size after Resize(resize) on the short side
    (torchvision's rounding) and where CenterCrop(crop) starts in it (negative:
    the crop is larger and torchvision pads)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    rw, rh = (resize, new_long) if width <= height else (new_long, resize)

    def start(side: int) -> int:
        return int(round((side - crop) / 2.0)) if side >= crop else -((crop - side) // 2)
    return rw, rh, start(rh), start(rw)


def cam_for_image(cam_crop: np.ndarray, image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """float32 [H, W] in [0, 1] on `image` (already EXIF-transposed): the crop's
    map put back where Resize(resize) + CenterCrop(crop) took the crop from, 0
    outside it, then scaled with the image to its own size."""
    W, H = image.size
    rw, rh, top, left = crop_box(W, H, resize, crop)
    canvas = torch.zeros(rh, rw)
    cam = torch.as_tensor(np.asarray(cam_crop, np.float32))
    if cam.shape != (crop, crop):
        cam = F.interpolate(cam[None, None], size=(crop, crop), mode="bilinear", align_corners=False)[0, 0]
    # the overlap of the crop with the resized image (all of the crop unless it was padded)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + crop, rh), min(left + crop, rw)
    canvas[y0:y1, x0:x1] = cam[y0 - top:y1 - top, x0 - left:x1 - left]
    if (rh, rw) != (H, W):
        canvas = F.interpolate(canvas[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return canvas.clamp_(0, 1).numpy().astype(np.float32, copy=False)


_LUT: np.ndarray | None = None


def _colormap_lut() -> np.ndarray:
    """256 x 3 uint8 colours of COLORMAP (matplotlib comes with Captum)."""
    global _LUT
    if _LUT is None:
        import matplotlib
        _LUT = (matplotlib.colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return _LUT


def heatmap(cam: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] colours for a [0, 1] map."""
    idx = (np.clip(np.nan_to_num(cam), 0, 1) * 255).round().astype(np.uint8)
    return _colormap_lut()[idx]


def blend_cam(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heatmap blended over `image` at the image's own size: alpha 0 is the
    photo, 1 the heatmap alone. A map of another size is scaled to the image
    (so the app can keep one map and re-blend at any opacity)."""
    alpha = float(min(max(alpha, 0.0), 1.0))
    rgb = image.convert("RGB")
    cam = np.asarray(cam, np.float32)
    if cam.shape != (rgb.height, rgb.width):
        cam = np.asarray(Image.fromarray(cam, mode="F").resize(rgb.size, Image.Resampling.BILINEAR), np.float32)
    out = np.asarray(rgb, np.float32) * (1 - alpha) + heatmap(cam).astype(np.float32) * alpha
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- choosing the class, naming the files

def class_index(class_names: list[str], name: str | None) -> int | None:
    """The index of `name` among the model's classes (None: each image's top-1);
    UserError naming the allowed classes otherwise."""
    if name is None:
        return None
    names = list(class_names)
    if name in names:
        return names.index(name)
    folded = [i for i, c in enumerate(names) if c.casefold() == str(name).strip().casefold()]
    if len(folded) == 1:
        return folded[0]
    raise UserError(f"{{setting}} {name!r} is not one of the model's classes; choose one of {', '.join(names)}",
                    field="cam_class", value=name, allowed=names)


@dataclass
class CamSettings:
    """What `predict --cam DIR [--cam-class NAME]` asks for; validate() before predicting."""
    out_dir: str | None = None
    class_name: str | None = None

    def validate(self) -> "CamSettings":
        if self.class_name is not None and not self.out_dir:
            raise UserError("{setting} needs {setting:cam} (the folder the CAM images go to)", field="cam_class",
                            value=self.class_name)
        if self.out_dir is not None:
            prepare_out_dir(self.out_dir)
        return self

    def check_model(self, predictor) -> None:
        """Before any image is read: the class is one of the model's, and the
        model is one Grad-CAM knows the layer of (a pickled model may be neither)."""
        if self.out_dir is None:
            return
        class_index(predictor.class_names, self.class_name)
        predictor.info.get("arch") or model_arch(predictor.model)


def prepare_out_dir(folder) -> Path:
    """The CAM folder, created if missing; refused before any work if it cannot be."""
    import os
    if not str(folder).strip():
        raise UserError("{setting} is empty; give a folder for the CAM images", field="cam", value=str(folder))
    p = Path(folder).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{{setting}} {p} is a file, not a folder", field="cam", value=str(p))
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{{setting}} {p}: cannot create the folder ({e.strerror or e})", field="cam",
                        value=str(p)) from None
    if not os.access(p, os.W_OK):
        raise UserError(f"{{setting}} {p}: the folder is not writable", field="cam", value=str(p))
    return p


def unique_stems(paths: list[str]) -> list[str]:
    """One output name per input image, never the same twice: the file's stem,
    or for stems that occur more than once (cat/001.jpg and fish/001.jpg, a.jpg
    and a.png) the parent folder's name in front, then a counter if needed."""
    from collections import Counter
    stems = [Path(p).stem for p in paths]
    counts = Counter(s.casefold() for s in stems)  # case-insensitive file systems too
    taken: set[str] = set()
    out = []
    for p, s in zip(paths, stems):
        name = s if counts[s.casefold()] == 1 else f"{Path(p).parent.name}_{s}"
        base, k = name, 2
        while name.casefold() in taken or (name != s and name.casefold() in counts):
            name, k = f"{base}_{k}", k + 1
        taken.add(name.casefold())
        out.append(name)
    return out


def write_cam_files(out_dir, stem: str, image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> tuple[Path, Path]:
    """<stem>_cam.png (the blend at the image's size) and <stem>_cam.npy (the
    float32 map), each written atomically."""
    import io

    from .fileio import atomic_write_bytes
    out = Path(out_dir)
    png, npy = out / f"{stem}_cam.png", out / f"{stem}_cam.npy"
    buf = io.BytesIO()
    blend_cam(image, cam, alpha).save(buf, format="PNG")
    atomic_write_bytes(png, buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.asarray(cam, np.float32), allow_pickle=False)
    atomic_write_bytes(npy, buf.getvalue())
    return png, npy


@dataclass
class ImageCam:
    path: str
    class_name: str | None
    image: Image.Image | None = None  # EXIF-transposed, full size
    cam: np.ndarray | None = None  # float32 [H, W] in [0, 1] on `image`
    error: str | None = None


def image_cams(predictor, predictions, class_name: str | None = None, batch_size: int | None = None):
    """Yield an ImageCam per readable Prediction: the CAM of `class_name` (None:
    the prediction's top-1) on the full-size image. The crops are made exactly
    as for the prediction, in batches; an image that became unreadable since
    gives an ImageCam with `error`."""
    from .errors import ImageLoadError
    from .images import load_rgb
    fixed = class_index(predictor.class_names, class_name)
    done = [p for p in predictions if not p.error and p.topk]
    bs = batch_size or predictor.default_batch_size()
    for i in range(0, len(done), bs):
        chunk, crops, good = done[i:i + bs], [], []
        for p in chunk:
            try:
                crops.append(predictor.preprocess(p.path))
                good.append(p)
            except ImageLoadError as e:
                yield ImageCam(p.path, None, error=e.reason)
        if not good:
            continue
        idx = [fixed if fixed is not None else predictor.class_names.index(p.label) for p in good]
        maps = predictor.cam(torch.stack(crops), idx)
        for p, c, m in zip(good, idx, maps):
            try:
                image = load_rgb(p.path)
            except ImageLoadError as e:
                yield ImageCam(p.path, None, error=e.reason)
                continue
            yield ImageCam(p.path, predictor.class_names[c], image,
                           cam_for_image(m, image, predictor.resize, predictor.crop))
