"""What a run gets on each device without overrides: ``trainer.precision=auto``, the fused
optimizer on CUDA and the CPU, gradient clipping of a fused optimizer under bf16-mixed,
``compile``."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from detr_lightning.cli.train import compile_model, limit_cpu_kernel_cache, train
from detr_lightning.cli.trainer import resolve_precision
from detr_lightning.lightning.module import DETRModule
from detr_lightning.lightning.optim import fused_by_default
from detr_lightning.lightning.runtime import ONEDNN_CACHE_VARIABLE
from detr_lightning.utils.errors import SetupError
from helpers.models import tiny_spec
from helpers.pipeline import compose_config, tiny_overrides


def _gpu(monkeypatch, capability: tuple[int, int] | None) -> None:
    """Pretend this machine has a CUDA GPU of ``capability`` (None: no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


@pytest.mark.parametrize(
    ("capability", "accelerator", "stage", "expected"),
    [
        ((9, 0), "auto", "fit", "bf16-mixed"),  # H100
        ((8, 0), "gpu", "fit", "bf16-mixed"),  # A100
        ((7, 0), "auto", "fit", "32-true"),  # V100: bf16 only emulated
        ((9, 0), "auto", "test", "32-true"),  # evaluation: fp32 figures
        ((9, 0), "cpu", "fit", "32-true"),  # a GPU machine told to train on the CPU
        (None, "auto", "fit", "32-true"),
    ],
)
def test_precision_auto_is_bf16_mixed_for_training_on_gpus_with_bf16(
    monkeypatch, capability, accelerator, stage, expected
):
    _gpu(monkeypatch, capability)
    trainer = {"precision": "auto", "accelerator": accelerator}
    assert resolve_precision(trainer, stage) == expected


def test_an_explicit_precision_is_used_as_given(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    for value in ("32-true", "16-mixed", "bf16-mixed", 32):
        assert resolve_precision({"precision": value, "accelerator": "auto"}) == value


def _params(device: str, dtype=torch.float32) -> list:
    return [
        SimpleNamespace(
            device=torch.device(device), is_floating_point=lambda: dtype.is_floating_point
        )
    ]


def test_the_fused_update_is_chosen_for_cuda_and_cpu_parameters_when_the_config_is_silent():
    adamw = functools.partial(torch.optim.AdamW, lr=1e-4)
    for device in ("cuda", "cpu"):
        assert fused_by_default(adamw, _params(device)) == {"fused": True}
        assert fused_by_default(torch.optim.AdamW, _params(device)) == {"fused": True}
    # on other devices, on a mix, or when the config chose, torch's own default stays
    assert fused_by_default(adamw, _params("mps")) == {}
    assert fused_by_default(adamw, _params("cuda") + _params("cpu")) == {}
    for choice in ({"fused": False}, {"foreach": True}, {"fused": True}):
        for device in ("cuda", "cpu"):
            assert fused_by_default(functools.partial(adamw, **choice), _params(device)) == {}
    # an optimizer without a fused kernel
    assert fused_by_default(functools.partial(torch.optim.Rprop), _params("cuda")) == {}
    assert fused_by_default(adamw, []) == {}


class _Weights(pl.Callback):
    """The optimizer's ``fused`` setting and the weights at the start and end of training."""

    def on_train_start(self, trainer, module) -> None:
        self.fused = trainer.optimizers[0].defaults.get("fused")
        self.start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    def on_train_end(self, trainer, module) -> None:
        self.end = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_cpu_training_takes_the_fused_adamw_step_and_trains_as_the_python_loop(tmp_path):
    """On the CPU the default optimizer is torch's fused AdamW; its weights after a step equal,
    to float32 rounding, those of torch's per-parameter loop (``optimizer.fused=false``) from
    the same seed and batch. (One step: after it, the rounding differences can change which
    query the matcher gives an object, and the runs part ways as any two would.)"""
    runs = {}
    for name, extra in (("default", []), ("loop", ["+optimizer.fused=false"])):
        record = _Weights()
        overrides = tiny_overrides(tmp_path / name, "trainer.max_epochs=1",
                                   "trainer.max_steps=1", "trainer.limit_val_batches=0",
                                   *extra)  # fmt: skip
        train(compose_config("train", overrides), callbacks=[record])
        runs[name] = record
    assert runs["default"].fused is True and not runs["loop"].fused
    fused, loop = runs["default"], runs["loop"]
    moved = 0
    for key, value in fused.end.items():
        torch.testing.assert_close(fused.start[key], loop.start[key], rtol=0, atol=0)
        torch.testing.assert_close(value, loop.end[key], rtol=0, atol=1e-6)
        moved += int((value - fused.start[key]).abs().max() > 1e-5)
    assert moved > 10  # the step moved the weights by far more than the tolerance


def test_bf16_mixed_clips_the_gradients_of_a_fused_optimizer(tmp_path, monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (a RuntimeError
    at the first step); under bf16 nothing is scaled and the module clips itself."""
    clipped = []
    real = torch.nn.utils.clip_grads_with_norm_

    def spy(params, max_norm, total_norm, foreach=None):
        params = list(params)
        real(params, max_norm, total_norm, foreach)
        after = torch.nn.utils.get_total_norm([p.grad for p in params])
        clipped.append((max_norm, float(total_norm), float(after)))

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", spy)
    overrides = tiny_overrides(tmp_path, "trainer.max_epochs=1", "trainer.limit_val_batches=0",
                               "trainer.precision=bf16-mixed", "+optimizer.fused=true",
                               "trainer.gradient_clip_val=0.1")  # fmt: skip
    train(compose_config("train", overrides))
    assert len(clipped) == 2  # 8 images, batch 4
    for max_norm, before, after in clipped:
        assert max_norm == pytest.approx(0.1)
        # a random model's gradient norm is far above 0.1: every step was scaled down to it
        assert before > 0.1
        assert after == pytest.approx(0.1, rel=1e-3)


def test_clipping_by_value_and_switched_off(tmp_path, monkeypatch):
    """gradient_clip_algorithm=value clips each gradient element; a clip value of 0 (Lightning's
    "off") clips nothing."""
    calls = []
    real = torch.nn.utils.clip_grad_value_

    def spy(params, clip_value, foreach=None):
        params = list(params)
        real(params, clip_value, foreach)
        calls.append(max(float(p.grad.abs().max()) for p in params))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", spy)
    base = ["trainer.max_epochs=1", "trainer.limit_val_batches=0"]
    train(compose_config("train", tiny_overrides(tmp_path / "value", *base,
          "trainer.gradient_clip_algorithm=value", "trainer.gradient_clip_val=0.001")))  # fmt: skip
    # the largest gradient element of a random model is far above 0.001: cut to it exactly
    assert calls == [pytest.approx(0.001, rel=1e-6)] * 2
    calls.clear()
    train(compose_config("train", tiny_overrides(tmp_path / "off", *base,
          "trainer.gradient_clip_algorithm=value", "trainer.gradient_clip_val=0")))  # fmt: skip
    assert calls == []


def test_clipping_with_one_norm_equals_torch_clip_grad_norm():
    """The norm that finds NaN/Inf gradients also clips them: the same result as
    ``torch.nn.utils.clip_grad_norm_`` (which Lightning calls)."""
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * 10, torch.randn(7), torch.randn(2, 2, 2)]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    total = torch.nn.utils.get_total_norm([p.grad for p in ours])
    torch.nn.utils.clip_grads_with_norm_(ours, 0.1, total)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert float(total) == pytest.approx(float(expected))
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def _module() -> DETRModule:
    model = tiny_spec(num_classes=3, nheads=2, dec_layers=1, num_queries=4)
    return DETRModule(model=model)


def test_compile_setting():
    module = _module()
    compile_model(module, False)
    compile_model(module, None)
    assert module.model._compiled_call_impl is None
    compile_model(module, {"mode": "reduce-overhead", "dynamic": True})
    assert module.model._compiled_call_impl is not None
    # compiled in place: checkpoints keep their keys
    assert all(not k.startswith("_orig_mod") for k in module.state_dict())
    with pytest.raises(SetupError, match="compile='yes'"):
        compile_model(_module(), "yes")


def test_the_base_config_leaves_compile_off_and_precision_to_the_device(tmp_path):
    cfg = compose_config("train", [f"run_dir={tmp_path}"])
    assert cfg.compile is False
    assert cfg.trainer.precision == "auto"


KERNEL_CACHE_PROBE = """
import sys, torch
from detr_lightning.lightning.runtime import limit_cpu_kernel_cache
limit_cpu_kernel_cache(None if sys.argv[1] == "null" else int(sys.argv[1]))
conv = torch.nn.Conv2d(64, 64, 3).to(memory_format=torch.channels_last)
x = torch.randn(2, 64, 56, 56).contiguous(memory_format=torch.channels_last)
with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
    conv(x)
    conv(x)
"""


def kernel_creations(setting: str, environment: dict[str, str] | None = None) -> list[str]:
    """oneDNN's verbose account of each kernel it created for two identical convolutions in a
    fresh process after ``limit_cpu_kernel_cache(setting)``: cache_hit or cache_miss."""
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_VARIABLE}
    env.update(environment or {})
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_CACHE_PROBE, setting],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    return [
        field.split(":")[1]
        for line in result.stdout.splitlines()
        for field in line.split(",")
        if field.startswith("create:")
    ]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_cpu_kernel_cache_setting_reaches_onednn() -> None:
    """cpu_kernel_cache=0 (train.yaml's default) set before the first convolution leaves oneDNN
    without a cache: the second identical convolution compiles its kernels again. null leaves
    oneDNN's cache, which the second one hits; a value in the environment wins."""
    default = kernel_creations("null")
    assert "cache_miss" in default and "cache_hit" in default, default
    without = kernel_creations("0")
    assert without and set(without) == {"cache_miss"}, without
    environment_wins = kernel_creations("0", {ONEDNN_CACHE_VARIABLE: "1024"})
    assert "cache_hit" in environment_wins, environment_wins


def test_cpu_kernel_cache_values(monkeypatch) -> None:
    monkeypatch.delenv(ONEDNN_CACHE_VARIABLE, raising=False)
    limit_cpu_kernel_cache(None)
    assert ONEDNN_CACHE_VARIABLE not in os.environ
    limit_cpu_kernel_cache(16)
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "16"
    limit_cpu_kernel_cache(0)  # the environment's value stays
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "16"
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(SetupError, match="cpu_kernel_cache"):
            limit_cpu_kernel_cache(bad)
    assert compose_config("train", ["run_dir=unused"]).cpu_kernel_cache == 0


class NoCpuFusedAdamW(torch.optim.AdamW):
    """An optimizer that takes ``fused`` but has no fused kernel for CPU parameters. Like
    torch's own checks, it refuses after its parameter groups took its settings."""

    def __init__(self, params, fused=None, **settings) -> None:
        super().__init__(params, fused=fused, **settings)
        if fused:
            raise RuntimeError("fused=True needs CUDA parameters")


def test_an_optimizer_without_a_fused_kernel_for_the_device_gets_torch_default_update():
    assert _module().configure_optimizers().defaults["fused"] is True  # the CPU default
    spec = {"_target_": f"{__name__}.NoCpuFusedAdamW", "_partial_": True, "lr": 1e-4}
    module = DETRModule(model=_module().hparams.model, optimizer=spec)
    optimizer = module.configure_optimizers()
    assert type(optimizer) is NoCpuFusedAdamW and not optimizer.defaults["fused"]
    # the refused attempt's settings did not stay in the groups: no step would run fused
    assert [group["fused"] for group in optimizer.param_groups] == [None, None]
    # an error of the optimizer's own is not hidden by the retry
    bad = {**spec, "lr": -1.0}
    with pytest.raises(ValueError, match="learning rate"):
        DETRModule(model=_module().hparams.model, optimizer=bad).configure_optimizers()
