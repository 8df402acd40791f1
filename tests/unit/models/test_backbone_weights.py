"""ImageNet backbone weights offline: local files, torchvision's cache, clear setup errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from detr_lightning.models import Backbone
from detr_lightning.models.backbone import FrozenBatchNorm2d
from detr_lightning.models.backbone_weights import ensure_imagenet_weights, imagenet_weights_file
from detr_lightning.utils.errors import SetupError
from helpers import ROOT

RESNET18_V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]


def random_resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict with random values everywhere, BN statistics included
    (a fresh model's BN is all ones and zeros, which would hide a buffer that failed to load)."""
    state = torchvision.models.resnet18().state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif value.is_floating_point():
            state[key] = torch.randn_like(value)
    return state


def assert_trunk_equals(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.body.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key.startswith("layer4.") and backbone.num_stages == 3:
            assert key not in loaded
            continue
        assert torch.equal(loaded[key], value), key
        compared += 1
    assert compared == len([k for k in loaded if not k.endswith("num_batches_tracked")])


@pytest.fixture
def offline(monkeypatch, tmp_path) -> list[str]:
    """An empty torch hub cache and no network; returns the URLs a download was tried for."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    tried: list[str] = []

    def no_network(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tried


# --- local files ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_local_state_dict_loads_every_tensor(tmp_path, norm) -> None:
    state = random_resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    backbone = Backbone("resnet18", weights=path, norm=norm)
    assert_trunk_equals(backbone, state)
    if norm == "frozen":
        bn = backbone.body.layer2[0].bn1
        assert isinstance(bn, FrozenBatchNorm2d)
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(bn, name), state[f"layer2.0.bn1.{name}"])
    else:
        assert torch.equal(backbone.body.bn1.num_batches_tracked, state["bn1.num_batches_tracked"])


def test_wrapped_prefixed_and_three_stage_files(tmp_path) -> None:
    state = random_resnet18_state()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    assert_trunk_equals(Backbone("resnet18", weights=str(path)), state)
    torch.save({"model": state}, path)
    three = Backbone("resnet18", weights=path, num_stages=3)
    assert not hasattr(three.body, "layer4")
    assert_trunk_equals(three, state)


def test_weights_path_wins_over_pretrained(tmp_path, offline) -> None:
    state = random_resnet18_state()
    torch.save(state, tmp_path / "r18.pth")
    assert_trunk_equals(Backbone("resnet18", weights=tmp_path / "r18.pth", pretrained=True), state)
    assert offline == []


def test_file_without_num_batches_tracked_loads_into_batchnorm(tmp_path) -> None:
    # torchvision's older ImageNet files predate BatchNorm's counter
    state = {k: v for k, v in random_resnet18_state().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    assert_trunk_equals(Backbone("resnet18", weights=tmp_path / "old.pth", norm="batch"), state)


# --- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError) as info:
        Backbone("resnet18", weights=path)
    assert str(path) in str(info.value)
    assert "backbone.weights" in str(info.value)


def test_train_refuses_a_missing_weights_file_before_any_work(tmp_path) -> None:
    from detr_lightning.cli.train import ensure_backbone_weights
    from helpers.pipeline import compose_config, tiny_overrides

    path = tmp_path / "nowhere.pth"
    cfg = compose_config("train", tiny_overrides(tmp_path, f"backbone.weights={path}"))
    with pytest.raises(SetupError, match=rf"backbone.weights={path}: no such file"):
        ensure_backbone_weights(cfg)
    # a pretrained= checkpoint replaces the backbone's weights: the file is not needed
    cfg = compose_config("train", tiny_overrides(tmp_path, f"backbone.weights={path}",
                                                 "pretrained=some.pth"))  # fmt: skip
    ensure_backbone_weights(cfg)


def test_weights_of_another_resnet(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(random_resnet18_state(), path)
    with pytest.raises(ValueError) as info:
        Backbone("resnet50", weights=path)
    message = str(info.value)
    assert str(path) in message and "resnet50" in message
    assert "backbone.name=resnet18" in message
    assert "layer1.0.conv3.weight" in message  # a few of the keys are named


def test_whole_detr_checkpoint_is_pointed_to_pretrained(tmp_path) -> None:
    state = {f"backbone.0.body.{k}": v for k, v in random_resnet18_state().items()}
    torch.save({"model": state}, tmp_path / "detr.pth")
    with pytest.raises(ValueError, match="pretrained=PATH"):
        Backbone("resnet18", weights=tmp_path / "detr.pth")


def test_not_a_state_dict(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds no state dict") as info:
        Backbone("resnet18", weights=path)
    assert str(path) in str(info.value)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        Backbone("resnet18", weights=tmp_path / "text.pth")


def test_group_norm_refuses_imagenet_statistics(tmp_path, offline) -> None:
    torch.save(random_resnet18_state(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="GroupNorm") as info:
        Backbone("resnet18", weights=tmp_path / "r18.pth", norm="group")
    assert "backbone.norm=frozen or batch" in str(info.value)
    with pytest.raises(ValueError, match="GroupNorm"):
        Backbone("resnet18", pretrained=True, norm="group")
    assert offline == []  # refused before any download


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights-only"):
        Backbone("resnet18", weights=path)
    assert not marker.exists()


# --- torchvision's cache --------------------------------------------------------------------


def test_imagenet_v1_not_default() -> None:
    # for resnet50 torchvision's DEFAULT is V2; DETR was trained from V1
    assert imagenet_weights_file("resnet50").name == "resnet50-0676ba61.pth"
    assert imagenet_weights_file("resnet18").name == RESNET18_V1
    assert imagenet_weights_file("resnet18").parent == Path(torch.hub.get_dir()) / "checkpoints"
    with pytest.raises(ValueError, match="unknown backbone"):
        imagenet_weights_file("vgg16")


def test_failed_download_is_a_setup_error(tmp_path, offline) -> None:
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert imagenet_weights_file("resnet50") == expected
    with pytest.raises(SetupError) as info:
        ensure_imagenet_weights("resnet50")
    message = str(info.value)
    assert offline == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]
    assert offline[0] in message
    assert str(expected) in message and str(expected.parent) in message
    assert "backbone.weights=/path/to/resnet50-0676ba61.pth" in message
    assert "backbone.pretrained=false" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(SetupError, match=r"resnet50-0676ba61\.pth"):
        Backbone("resnet50", pretrained=True)  # the same message wherever the backbone is built


def test_cached_file_is_used_without_download(offline) -> None:
    cached = imagenet_weights_file("resnet18")
    assert cached.name == RESNET18_V1
    cached.parent.mkdir(parents=True)
    state = random_resnet18_state()
    torch.save(state, cached)
    assert ensure_imagenet_weights("resnet18") == cached
    assert_trunk_equals(Backbone("resnet18", pretrained=True), state)
    assert offline == []


# --- entry point ----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_entry_point_reports_missing_weights_without_traceback(tmp_path) -> None:
    """Offline, the paper recipe stops with one message before any data work: the synthetic
    dataset it names is never generated."""
    train_py = ROOT / "train.py"
    argv = [
        str(train_py),
        "model.num_queries=5",
        "backbone=resnet18",
        "backbone.pretrained=true",
        f"run_dir={tmp_path / 'run'}",
        "data=synthetic",
    ]
    script = textwrap.dedent(
        f"""
        import runpy, sys, urllib.error
        import torch.hub

        def no_network(*args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        torch.hub.download_url_to_file = no_network
        torch.hub.load_state_dict_from_url = no_network
        sys.argv = {argv!r}
        runpy.run_path({str(train_py)!r}, run_name="__main__")
        """
    )
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "DETR_LIGHTNING_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT / "src"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("error: ") :]
    assert RESNET18_V1 == "resnet18-f37072fd.pth"
    assert RESNET18_V1 in message and "backbone.pretrained=false" in message
    assert "backbone.weights=" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    # the backbone is checked before any data work: the dataset was never generated
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())
