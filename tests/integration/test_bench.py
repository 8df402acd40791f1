"""bench/inference.py: the smoke configuration runs, times, and agrees with the original DETR."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT


@pytest.mark.parametrize("fuse_bn", [False, True], ids=["unfused", "fused-bn"])
def test_quick_benchmark_against_official_formulation(tmp_path: Path, fuse_bn: bool) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "inference.py"),
        "--quick",
        "--compare-official",
        # One thread: OpenMP workers stall when other tests share the cores; speed is not
        # what this test checks.
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    if fuse_bn:
        command.append("--fuse-bn")
    python_path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "speedup" in result.stdout

    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    assert report["environment"]["threads"] == 1
    rows = report["rows"]
    assert {(row["batch_size"], row["precision"]) for row in rows} == {
        (1, "fp32"),
        (1, "bf16"),
        (2, "fp32"),
        (2, "bf16"),
    }
    for row in rows:
        assert row["model"] == "tiny" and row["fuse_bn"] is fuse_bn
        assert row["seconds_per_image"] > 0 and row["images_per_second"] > 0
        assert row["official_seconds_per_image"] > 0 and row["speedup"] > 0
        assert row["peak_mb"] >= 0
        if row["precision"] == "fp32":
            assert row["outputs_agree"] is True
            assert row["max_abs_diff_logits"] < 1e-3
            assert row["max_abs_diff_boxes"] < 1e-4
        else:  # bf16 autocast: reported, loosely bounded
            assert row["outputs_agree"] is None
            assert row["max_abs_diff_logits"] < 0.5


def _bench(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    python_path = [str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_evaluation_benchmark_backends_agree(tmp_path: Path) -> None:
    out = tmp_path / "evaluation.json"
    _bench("eval_backends.py", "--images", "40", "--rounds", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["seconds"]) == {"pycocotools", "faster_coco_eval"}
    assert all(len(times) == 1 and times[0] > 0 for times in report["seconds"].values())
    assert report["max_stat_difference"] < 1e-12
    assert 0.05 < report["stats"]["pycocotools"]["map"] < 0.95  # a non-trivial AP


def test_inference_benchmark_against_transformers(tmp_path: Path) -> None:
    out = tmp_path / "hf.json"
    _bench("inference_hf.py", "--model", "R50", "--size", "96", "128", "--precisions", "fp32",
           "--warmup", "0", "--iters", "1", "--threads", "1", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    rows = {row["code"]: row for row in report["rows"]}
    ours_rows = ("detr-lightning", "detr-lightning, eager trunk", "detr-lightning, static shape")
    bound = "bound: detr-lightning backbone alone"
    assert set(rows) == {"transformers", *ours_rows, bound}
    for ours in ours_rows:
        assert rows[ours]["max_box_diff"] < 1e-4
        assert rows[ours]["top_label_agreement"] == 1.0
    # the trunk's arithmetic, counted here from the convolutions' shapes
    roofline = report["roofline"]
    assert roofline["trunk_gflop"] * 1e9 == pytest.approx(_resnet_conv_flop("resnet50", 96, 128))
    rate = roofline["precisions"]["fp32"]
    assert rate["backbone_s"] == rows[bound]["s_per_img"] > 0
    assert rate["trunk_gflop_per_s"] == pytest.approx(roofline["trunk_gflop"] / rate["backbone_s"])
    assert rate["matmul_gflop_per_s"] > 0 and set(roofline["precisions"]) == {"fp32"}


def test_winograd_convolution_of_the_conv_benchmark_matches_float64(tmp_path: Path) -> None:
    out = tmp_path / "conv.json"
    _bench("conv_algorithms.py", "--size", "64", "96", "--warmup", "0", "--iters", "1",
           "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {row["stage"] for row in rows} == {"layer1", "layer2", "layer3", "layer4"}
    # feature sizes of a 64x96 image: strides 4, 8, 16, 32, rounded up
    assert [(r["height"], r["width"]) for r in rows if r["algorithm"] == "direct"] == [
        (16, 24),
        (8, 12),
        (4, 6),
        (2, 3),
    ]
    for row in rows:
        assert row["ms"] > 0 and row["max_abs_error"] < 1e-4, row
    assert {row["algorithm"] for row in rows} >= {"direct", "winograd"}


def _resnet_conv_flop(name: str, height: int, width: int) -> float:
    """2 x multiply-adds of a torchvision ResNet's convolutions (no head) on one image."""
    import torch
    import torchvision

    body = getattr(torchvision.models, name)(weights=None)
    flop = []

    def count(conv: torch.nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        kh, kw = conv.kernel_size
        flop.append(2 * output.numel() * conv.in_channels // conv.groups * kh * kw)

    for module in body.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    trunk = torch.nn.Sequential(*list(body.children())[:-2])
    with torch.no_grad():
        trunk(torch.zeros(1, 3, height, width))
    return float(sum(flop))


@pytest.mark.slow
def test_training_benchmark_runs_ours_on_a_generated_dataset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _bench("make_dataset.py", str(data), "--train", "8", "--val", "4")
    annotations = json.loads((data / "annotations/instances_train2017.json").read_text())
    assert len(annotations["images"]) == 8 and annotations["annotations"]
    out = tmp_path / "train.json"
    result = _bench("train_speed.py", "--skip-official", "--data", str(data), "--epochs", "1",
                    "--variants", "default", "--rounds", "2", "--json", str(out))  # fmt: skip
    assert "detr-lightning (default, round 2/2)" in result.stdout
    run = json.loads(out.read_text())["runs"]["default"]
    assert [epoch["round"] for epoch in run["epochs"]] == [0, 1]
    for epoch in run["epochs"]:
        assert epoch["img_per_s"] > 0 and epoch["loss"] > 0 and 0 <= epoch["padding_fraction"] < 1
        # the training time stops at the last step, before the validation (as the official's)
        assert 0 < epoch["train_s"] < epoch["epoch_s"]
    # the seeded runs train alike; each round's speed is its own
    assert run["epochs"][0]["loss"] == pytest.approx(run["epochs"][1]["loss"], rel=1e-5)
    assert run["round_img_per_s"] == [epoch["img_per_s"] for epoch in run["epochs"]]
    summary = run["summary"]
    assert summary["losses"] == [round(run["epochs"][0]["loss"], 4)]
    assert summary["peak_rss_main_mb"] > 100 and summary["ratio_rounds"] == [1.0, 1.0]


def test_training_step_benchmark_measures_each_variant(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    result = _bench("train_step.py", "--quick", "--profile", "default", "--json", str(out))
    assert "Loss trajectory" in result.stdout
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"fp32", "bf16", "default"}
    assert rows["bf16"]["resolved_precision"] == "bf16-mixed"
    # what a user gets on a CPU: fp32 and the fused AdamW update
    assert rows["default"]["resolved_precision"] == "32-true"
    assert rows["default"]["fused_adamw"] is True and rows["fp32"]["fused_adamw"] is False
    for name, row in rows.items():
        # the profiled variant's last step is profiled, not timed
        assert len(row["times"]) == (2 if name == "default" else 3) and row["images_per_s"] > 0
        assert len(row["losses"]) == 4 and all(math.isfinite(loss) for loss in row["losses"])
    assert rows["default"]["profile"]["aten_ops_per_step"] > 0
    # one initialization, the same batches and, on a CPU, the same arithmetic but for the
    # optimizer's rounding: the same first loss, then the same curve to float32 rounding
    curves = report["trajectory"]["curves"]
    assert curves["fp32"]["losses"][0] == curves["default"]["losses"][0]
    assert curves["fp32"]["losses"] == pytest.approx(curves["default"]["losses"], rel=1e-4)
    assert report["trajectory"]["final_ratio"] == pytest.approx(1.0, rel=1e-4)


def test_host_work_and_bucket_benchmarks(tmp_path: Path) -> None:
    """bench/step_work.py counts a small model's steps against a baseline file;
    bench/buckets.py counts an epoch's padded shapes on a generated dataset."""
    out = tmp_path / "work.json"
    small = ["--override=backbone=resnet18", "--override=backbone.num_stages=3",
             "--override=model=detr_small"]  # fmt: skip
    # a baseline row with twice the syncs and 4000 operators: the ratios are ours over it
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"result": {"label": "earlier", "operators": 4000.0,
                                               "syncs": 4.0, "sync_kinds": {}}}))  # fmt: skip
    result = _bench("step_work.py", "--steps", "2", "--warmup", "1", *small, "--baseline",
                    str(baseline), "--json", str(out))  # fmt: skip
    first = json.loads(out.read_text())["result"]
    assert first["steps"] == 2 and first["operators"] > 100
    assert first["syncs"] == 2 and first["sync_kinds"] == {
        ".cpu()": 1,
        "item()/bool()/int()/float()": 1,
    }
    assert f"{first['operators']:.0f} ({first['operators'] / 4000:.2f}x)" in result.stdout
    assert "2 (0.50x)" in result.stdout
    data = tmp_path / "data"
    _bench("make_dataset.py", str(data), "--train", "24", "--val", "4")
    buckets = tmp_path / "buckets.json"
    _bench("buckets.py", "--data", str(data), "--epochs", "1", "--json", str(buckets))
    results = {r["variant"]: r["epochs"][0] for r in json.loads(buckets.read_text())["results"]}
    assert results["step 256"]["shapes"] <= results["step 32"]["shapes"]
    assert results["step 256"]["padding"] >= results["own size (today)"]["padding"]
    assert results["11 canvases"]["shapes"] <= 11
