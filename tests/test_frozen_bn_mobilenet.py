"""Frozen layers stay bit-identical for MobileNetV2 with its real ImageNet weights,
the architecture behind every real-weights number in the README: weights and
BatchNorm buffers (running_mean, running_var, num_batches_tracked) of every frozen
layer equal the weights file exactly after training, through each path the engine
takes (feature cache on or off, each augmentation). tests/test_engine.py checks
the same for ResNet-18 with random weights. Needs ../shared (skipped where absent,
a failure under CI)."""
from __future__ import annotations

import pytest
import torch

from conftest import train_config, train_run
from core.models import build_model

# MobileNetV2's last resolution stage (7x7) is features[14:]: with policy 'last' it
# trains with the head; everything before it stays frozen.
LAST_STAGE = tuple(f"features.{i}." for i in range(14, 19))


@pytest.mark.parametrize("policy,cache,augment", [("head", "off", "standard"), ("last", "off", "light"),
                                                   ("head", "auto", "light"), ("last", "auto", "none")])
def test_frozen_mobilenet_v2_layers_are_bit_identical_to_the_weights_file(mobilenet_weights, tiny_dataset, tmp_path,
                                                                           policy, cache, augment):
    cfg = train_config(tiny_dataset, tmp_path / "ck", arch="mobilenet_v2", weights=str(mobilenet_weights),
                       policy=policy, cache=cache, augment=augment, epochs=2, lr=0.01)
    _, epochs, end = train_run(cfg)
    assert end.status == "completed" and len(epochs) == 2
    imagenet = torch.load(mobilenet_weights, weights_only=True)
    trained = torch.load(f"{end.run_dir}/latest.pt", weights_only=True)["model_state"]
    assert set(imagenet) <= set(trained) and all(k.startswith("features.") for k in imagenet)
    trains = LAST_STAGE if policy == "last" else ()
    frozen = [k for k in imagenet if not k.startswith(trains or "-")]
    assert sum(k.endswith("running_mean") for k in frozen) >= 30, "the frozen part holds the BatchNorm layers"
    changed = [k for k in frozen if not torch.equal(imagenet[k], trained[k])]
    assert not changed, f"{len(changed)} frozen tensors changed, e.g. {changed[:5]}"
    # ...while the trainable part did learn (and its BatchNorm statistics moved)
    torch.manual_seed(cfg.seed)  # the engine seeds before building: this is the run's initial head
    initial = build_model("mobilenet_v2", 2, 0.0, "none").state_dict()
    assert not torch.equal(initial["classifier.1.weight"], trained["classifier.1.weight"])
    if policy == "last":
        for k in ("features.18.1.running_mean", "features.18.0.weight", "features.14.conv.0.1.running_var"):
            assert not torch.equal(imagenet[k], trained[k]), f"{k} did not train"
