"""Dataset layout checks, the seeded val split, weights files and freeze policies."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_image_dataset
from core.config import TrainConfig, policy_from_flags
from core.data import scan_dataset
from core.errors import ConfigError, DatasetError, WeightsError
from core.models import apply_policy, build_model, imagenet_state_dict, load_backbone_weights, param_counts, split_model


def test_missing_train_folder_named(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"{tmp_path}/train is missing") as e:
        scan_dataset(tmp_path)
    assert "looks like a split" not in str(e.value)


def test_a_split_given_as_the_dataset_points_at_its_parent(tmp_path):
    data = make_image_dataset(tmp_path / "ds", n_train=1, n_val=1)
    from cli.common import FLAG_NAMES
    with pytest.raises(DatasetError) as e:
        scan_dataset(data / "train")
    assert e.value.render(FLAG_NAMES).endswith(f"looks like a split itself: pass its parent, --data-dir {data}")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_one_class_is_not_enough(tmp_path):
    make_image_dataset(tmp_path, classes=("cat",))
    with pytest.raises(DatasetError, match="at least 2 are needed"):
        scan_dataset(tmp_path)


def test_empty_class_named(tmp_path):
    make_image_dataset(tmp_path)
    for f in (tmp_path / "val" / "fish").iterdir():
        f.unlink()
    (tmp_path / "val" / "fish" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"\['fish'\] in .*val contain no usable images"):
        scan_dataset(tmp_path)


def test_class_mismatch_lists_both_sides(tmp_path):
    make_image_dataset(tmp_path)
    shutil.move(tmp_path / "val" / "fish", tmp_path / "val" / "dog")
    with pytest.raises(DatasetError, match=r"only in train: \['fish'\]; only in val: \['dog'\]"):
        scan_dataset(tmp_path)


def test_missing_val_needs_split_then_split_is_stratified_and_seeded(tmp_path):
    make_image_dataset(tmp_path, n_train=10, val=False)
    from cli.common import FLAG_NAMES
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path)
    assert "--val-split 0.2" in e.value.render(FLAG_NAMES) and e.value.field == "val_split"
    a = scan_dataset(tmp_path, val_split=0.2, seed=1)
    b = scan_dataset(tmp_path, val_split=0.2, seed=1)
    c = scan_dataset(tmp_path, val_split=0.2, seed=2)
    assert a.val.counts() == {"cat": 2, "fish": 2} and a.train.counts() == {"cat": 8, "fish": 8}
    assert a.val.samples == b.val.samples and a.val.samples != c.val.samples
    assert not set(a.val.samples) & set(a.train.samples)


def test_non_images_and_hidden_files(tmp_path):
    make_image_dataset(tmp_path)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
    info = scan_dataset(tmp_path)
    assert info.train.counts() == {"cat": 4, "fish": 4}
    assert [r for _, r in info.skipped] == ["not an image file type"]
    assert any("readme.txt" in w for w in info.warnings)


def test_imbalance_and_tiny_class_warnings(tmp_path):
    make_image_dataset(tmp_path, n_train=4)
    for i in range(10):
        shutil.copy(tmp_path / "train" / "cat" / "cat_0.jpg", tmp_path / "train" / "cat" / f"extra_{i}.jpg")
    warnings = " ".join(scan_dataset(tmp_path).warnings)
    assert "class imbalance" in warnings and "very few training images for ['fish']" in warnings


def test_reference_flags_map_to_policies():
    assert policy_from_flags(1, 0, 0) == "head"
    assert policy_from_flags(1, 1, 0) == "last"
    assert policy_from_flags(1, 0, 1) == "full"
    assert policy_from_flags(0, 0, 0) == "full"


@pytest.mark.parametrize("field,value,msg", [("lr", 0, "--lr"), ("dropout", 1.0, "--dropout"),
                                             ("batch_size", 0, "--batch-size"), ("run_name", "a/b", "--run-name"),
                                             ("val_split", 1.5, "--val-split"), ("lr", float("nan"), "--lr"),
                                             # a mistyped keyword is not "checkpoint nonee does not exist"
                                             ("weights", "nonee", "--weights 'nonee' is not valid; choose imagenet, none")])
def test_config_validation_messages(field, value, msg):
    """Each error carries its field and, in the CLI's words, names the flag."""
    from cli.common import FLAG_NAMES
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value}).validate()
    assert e.value.field == field and msg in e.value.render(FLAG_NAMES)


def test_saved_data_dir_is_absolute_and_plain(tmp_path, monkeypatch):
    """args.json keeps the folder as the user would type it from /: no ../ left in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert TrainConfig(data_dir="a/../photos").to_dict()["data_dir"] == str(tmp_path / "photos")


def test_resnet_structure_kept_and_only_fc_replaced():
    m = build_model("resnet18", 3, 0.0, "none")
    assert [n for n, _ in m.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                  "layer3", "layer4", "avgpool", "fc"]
    assert isinstance(m.fc, torch.nn.Linear) and (m.fc.in_features, m.fc.out_features) == (512, 3)
    d = build_model("resnet18", 3, 0.5, "none")
    assert isinstance(d.fc[0], torch.nn.Dropout) and d.fc[0].p == 0.5 and d.fc[1].out_features == 3


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("policy", ["head", "last", "full"])
def test_split_model_equals_full_forward(arch, policy):
    torch.manual_seed(0)
    m = apply_policy(build_model(arch, 2, 0.0, "none"), arch, policy).eval()
    prefix, suffix = split_model(m, arch, policy)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), m(x), atol=1e-5)
    frozen = {id(p) for p in prefix.parameters()}
    for p in m.parameters():
        assert p.requires_grad == (id(p) not in frozen)


def test_policy_counts_grow():
    m = build_model("resnet18", 2, 0.0, "none")
    counts = [param_counts(apply_policy(m, "resnet18", p))[0] for p in ("head", "last", "full")]
    assert counts[0] < counts[1] < counts[2]


def test_local_weights_file_backbone_only_and_mismatch(tmp_path, mobilenet_weights):
    m = build_model("mobilenet_v2", 2, 0.0, str(mobilenet_weights))
    ref = torch.load(mobilenet_weights, weights_only=True)
    assert torch.equal(m.state_dict()["features.0.0.weight"], ref["features.0.0.weight"])
    with pytest.raises(WeightsError, match=r"do not fit resnet18: missing keys \[.*unexpected keys") as e:
        build_model("resnet18", 2, 0.0, str(mobilenet_weights))
    assert e.value.field == "arch"  # the app's hint to choose another Architecture branches on it


def test_partial_weights_file_is_refused_naming_keys(tmp_path):
    state = build_model("resnet18", 2, 0.0, "none").state_dict()
    del state["layer2.0.bn1.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="layer2.0.bn1.running_var"):
        load_backbone_weights(build_model("resnet18", 2, 0.0, "none"), "resnet18", str(tmp_path / "partial.pth"))


def test_imagenet_missing_offline_message(offline_torch_home):
    with pytest.raises(WeightsError) as e:
        imagenet_state_dict("resnet18")
    from cli.common import CLI_CHOICES, FLAG_NAMES
    msg = e.value.render(FLAG_NAMES, CLI_CHOICES)
    assert str(offline_torch_home) in msg and "--weights none" in msg and "--weights PATH.pth" in msg


def test_unreachable_download_host_is_detected_without_waiting():
    """The probe used before a download: a closed local port is refused at once."""
    from core.models import host_reachable
    assert not host_reachable("127.0.0.1", 1)
    assert not host_reachable(None, 443)


def test_val_split_needs_two_images_per_class(tmp_path):
    make_image_dataset(tmp_path, n_train=3, val=False)
    (tmp_path / "train" / "fish" / "fish_1.jpg").unlink()
    (tmp_path / "train" / "fish" / "fish_2.jpg").unlink()
    with pytest.raises(DatasetError, match="class 'fish' has 1 image"):
        scan_dataset(tmp_path, val_split=0.2)


def test_exif_orientation_applied_once(tmp_path):
    """Loading an already-loaded image again (as prediction does) must not rotate it twice."""
    from PIL import Image
    from core.images import load_rgb
    img = Image.new("RGB", (60, 30), "white")
    img.paste((0, 0, 0), (0, 0, 10, 10))  # black corner top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 deg clockwise when displayed
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    once = load_rgb(tmp_path / "rot.jpg")
    twice = load_rgb(once)
    assert once.size == twice.size == (30, 60)
    assert once.tobytes() == twice.tobytes()
    assert sum(once.getpixel((25, 2))) < 100  # the black corner moved to the top-right
