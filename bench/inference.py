"""Inference speed and peak memory of DETR over a grid of configurations.

Examples (from the repository root):

    PYTHONPATH=src python bench/inference.py                        # R50 + R101, full grid
    PYTHONPATH=src python bench/inference.py --models R50 --batch-sizes 1 --precisions fp32 \
        --channels-last off --fuse-bn --compare-official --json bench/results/r50.json
    PYTHONPATH=src python bench/inference.py --quick --compare-official   # seconds-long smoke run

Weights are random (nothing is downloaded); the frozen BatchNorm statistics are randomized too,
so ``--fuse-bn`` folds non-trivial values. Each configuration runs ``--warmup`` untimed and
``--iters`` timed forward passes under ``torch.inference_mode`` and reports the median.
``--compare-official`` also runs ``official_reference.OfficialDETR`` (the original
formulation) with the same weights, inputs, precision and memory format, and reports the
largest output differences and our speedup over it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from official_reference import official_reference_for
from torch import Tensor, nn

from detr_lightning.models import build_detr, fuse_frozen_batchnorm
from detr_lightning.models.backbone import FrozenBatchNorm2d

MODELS: dict[str, dict[str, Any]] = {
    "R50": {"backbone": "resnet50"},
    "R50-DC5": {"backbone": {"name": "resnet50", "dilation": True}},
    "R101": {"backbone": "resnet101"},
    "R101-DC5": {"backbone": {"name": "resnet101", "dilation": True}},
    # Smoke-test size: ResNet-18 trunk and a narrow 2+2-layer transformer.
    "tiny": {
        "backbone": "resnet18",
        "hidden_dim": 64,
        "nheads": 4,
        "enc_layers": 2,
        "dec_layers": 2,
        "dim_feedforward": 256,
        "num_queries": 20,
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 outputs of the two formulations must agree this closely (max abs difference).
LOGITS_TOLERANCE, BOXES_TOLERANCE = 1e-3, 1e-4


@dataclass(frozen=True)
class Config:
    model: str
    batch_size: int
    precision: str
    channels_last: bool
    fuse_bn: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark DETR inference (random weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: R50 R101")
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="default: 800 1066")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 4")
    parser.add_argument(
        "--precisions", nargs="+", choices=sorted(DTYPES), help="default: fp32 bf16"
    )
    parser.add_argument("--channels-last", nargs="+", choices=("off", "on"), help="default: off on")
    parser.add_argument("--fuse-bn", action="store_true", help="fold frozen BN into the convs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--warmup", type=int, help="untimed passes per configuration (default 2)")
    parser.add_argument("--iters", type=int, help="timed passes per configuration (default 10)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--compare-official",
        action="store_true",
        help="also time the original formulation and check that outputs agree",
    )
    parser.add_argument("--json", type=Path, help="write rows and environment to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny model, 128x160, batch 1 and 2, channels_last off, 1 warmup + 1 timed",
    )
    args = parser.parse_args(argv)
    defaults = {
        "models": ["R50", "R101"],
        "size": [800, 1066],
        "batch_sizes": [1, 4],
        "precisions": ["fp32", "bf16"],
        "channels_last": ["off", "on"],
        "warmup": 2,
        "iters": 10,
    }
    if args.quick:
        defaults.update(
            models=["tiny"],
            size=[128, 160],
            batch_sizes=[1, 2],
            channels_last=["off"],
            warmup=1,
            iters=1,
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


# ---------------------------------------------------------------------------- model and inputs


@torch.no_grad()
def randomize_frozen_batchnorm(model: nn.Module, seed: int) -> None:
    """Replace the identity statistics of a fresh model by plausible trained-looking ones."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.shape[0]
            module.weight.copy_(torch.rand(channels, generator=generator) * 0.5 + 0.5)
            module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """The named DETR (91 classes, COCO-sized head) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = build_detr(num_classes=91, **MODELS[name])
    randomize_frozen_batchnorm(model, seed)
    return model.eval()


def make_inputs(batch_size: int, height: int, width: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Normalized images [B, 3, H, W] and padding mask [B, H, W].

    Image i > 0 is narrower by i/8 of the width and zero-padded on the right, as in a batch of
    mixed aspect ratios, so the masked attention paths are exercised too.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, height, width, generator=generator)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    for i in range(1, batch_size):
        valid_width = max(1, width - (i * width) // 8)
        mask[i, :, valid_width:] = True
        images[i, :, :, valid_width:] = 0
    return images, mask


# ---------------------------------------------------------------------------- measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_heap() -> None:
    """Return freed heap pages to the OS so RSS growth reflects this run, not earlier ones."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "malloc_trim"):
        ctypes.CDLL(libc_name).malloc_trim(0)


class PeakMemory:
    """Peak memory in MB of what runs inside ``with``.

    CUDA: ``torch.cuda.max_memory_allocated`` (absolute: weights + activations). CPU: growth of
    the resident set over its value at entry, sampled every ``interval`` s from /proc/self/statm
    (falls back to ``ru_maxrss`` growth, which only sees new process-wide peaks).
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak_mb = float("nan")

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated (weights + activations)"
        if Path("/proc/self/statm").exists():
            return "RSS growth in one extra pass, /proc/self/statm sampled every 2 ms"
        return "ru_maxrss growth in one extra pass (process-wide peak only)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_freed_heap()
        self._use_proc = Path("/proc/self/statm").exists()
        if not self._use_proc:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        if not self._use_proc:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = max(0, peak - self._start) / 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def time_passes(
    forwards: dict[str, Callable[[], Any]], device: torch.device, warmup: int, iters: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per timed pass of each forward.

    With several forwards the timed passes alternate (A B A B ...), so a change in background
    load affects all of them alike and their ratio stays meaningful. CPU time (all threads of
    this process) is steadier than wall time on a shared machine, most of all with one thread.
    """
    for forward in forwards.values():
        for _ in range(warmup):
            forward()
    wall: dict[str, list[float]] = {name: [] for name in forwards}
    cpu: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(iters):
        for name, forward in forwards.items():
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            forward()
            _synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def peak_memory(forward: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Peak memory MB of one more pass (kept apart from timing: sampling costs time), and its
    outputs."""
    with PeakMemory(device) as memory:
        outputs = forward()
    return memory.peak_mb, outputs


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _full_fp32_outputs(forwards: dict[str, Callable[[], Any]]) -> tuple[Any, Any]:
    """Our and the reference's outputs with TF32 off for convolutions and matrix products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            return forwards["ours"](), forwards["official"]()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_config(config: Config, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    height, width = args.size
    model = make_model(config.model)
    reference = official_reference_for(model).eval() if args.compare_official else None
    if config.fuse_bn:
        fuse_frozen_batchnorm(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    images, mask = make_inputs(config.batch_size, height, width)
    images, mask = images.to(device), mask.to(device)
    # Our model converts its input to channels_last itself, so it gets the plain batch; the
    # original code does not, so the reference gets it converted (outside the timed region).
    forwards = {"ours": lambda: model(images, mask)}
    if reference is not None:
        reference.to(device=device, memory_format=memory_format)
        ref_images = images.contiguous(memory_format=memory_format)
        forwards["official"] = lambda: reference(ref_images, mask)

    with torch.inference_mode(), _precision(device, config.precision):
        times, cpu_times = time_passes(forwards, device, args.warmup, args.iters)
        memory = {name: peak_memory(forward, device) for name, forward in forwards.items()}

    seconds = statistics.median(times["ours"]) / config.batch_size
    row: dict[str, Any] = {
        **asdict(config),
        "height": height,
        "width": width,
        "seconds_per_image": seconds,
        "images_per_second": 1.0 / seconds,
        "cpu_seconds_per_image": statistics.median(cpu_times["ours"]) / config.batch_size,
        "peak_mb": memory["ours"][0],
        "times": times["ours"],
        "cpu_times": cpu_times["ours"],
    }
    if reference is not None:
        ref_seconds = statistics.median(times["official"]) / config.batch_size
        outputs, ref_outputs = memory["ours"][1], memory["official"][1]
        if device.type == "cuda" and config.precision == "fp32":
            # The timed passes use cuDNN's default TF32 convolutions (10-bit mantissa), whose
            # rounding differs between two formulations; the agreement is judged in full fp32.
            outputs, ref_outputs = _full_fp32_outputs(forwards)
        logits_diff = _max_abs_diff(outputs["pred_logits"], ref_outputs["pred_logits"])
        boxes_diff = _max_abs_diff(outputs["pred_boxes"], ref_outputs["pred_boxes"])
        row.update(
            official_seconds_per_image=ref_seconds,
            official_peak_mb=memory["official"][0],
            official_cpu_seconds_per_image=(
                statistics.median(cpu_times["official"]) / config.batch_size
            ),
            official_times=times["official"],
            official_cpu_times=cpu_times["official"],
            speedup=ref_seconds / seconds,
            cpu_time_speedup=(
                statistics.median(cpu_times["official"]) / statistics.median(cpu_times["ours"])
            ),
            max_abs_diff_logits=logits_diff,
            max_abs_diff_boxes=boxes_diff,
            # Tolerances hold for fp32 only; reduced precision is reported, not judged.
            outputs_agree=(
                logits_diff < LOGITS_TOLERANCE and boxes_diff < BOXES_TOLERANCE
                if config.precision == "fp32"
                else None
            ),
        )
    # Background load at the end of this configuration (1-minute average), to judge noise.
    row["load_average"] = os.getloadavg()[0]
    return row


# ---------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": commit,
        "memory_method": PeakMemory.method(device),
        "load_average_at_start": os.getloadavg()[0],
    }


def _columns(compare: bool) -> list[tuple[str, int, Callable[[dict[str, Any]], str]]]:
    def fmt(key: str, spec: str) -> Callable[[dict[str, Any]], str]:
        return lambda row: format(row[key], spec)

    columns = [
        ("model", 8, lambda row: row["model"]),
        ("batch", 5, fmt("batch_size", "d")),
        ("prec", 4, lambda row: row["precision"]),
        ("ch_last", 7, lambda row: "on" if row["channels_last"] else "off"),
        ("fuse_bn", 7, lambda row: "on" if row["fuse_bn"] else "off"),
        ("s/img", 8, fmt("seconds_per_image", ".4f")),
        ("img/s", 7, fmt("images_per_second", ".2f")),
        ("cpu s/img", 9, fmt("cpu_seconds_per_image", ".4f")),
        ("peak MB", 8, fmt("peak_mb", ".0f")),
    ]
    if compare:
        agree = {True: "yes", False: "NO", None: "-"}
        columns += [
            ("official s/img", 14, fmt("official_seconds_per_image", ".4f")),
            ("off. MB", 8, fmt("official_peak_mb", ".0f")),
            ("speedup", 7, lambda row: f"{row['speedup']:.2f}x"),
            ("cpu speedup", 11, lambda row: f"{row['cpu_time_speedup']:.2f}x"),
            ("max|dlogit|", 11, fmt("max_abs_diff_logits", ".2e")),
            ("max|dbox|", 9, fmt("max_abs_diff_boxes", ".2e")),
            ("agree", 5, lambda row: agree[row["outputs_agree"]]),
        ]
    return columns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    configs = [
        Config(model, batch_size, precision, channels_last == "on", args.fuse_bn)
        for model in args.models
        for batch_size in args.batch_sizes
        for precision in args.precisions
        for channels_last in args.channels_last
    ]
    height, width = args.size
    print(
        f"DETR inference, {height}x{width}, {args.warmup} warmup + {args.iters} timed passes "
        f"(median), device {env['device']} ({env['cpu_model']}, {env['threads']} threads), "
        f"torch {env['torch']}"
    )
    print(f"peak MB: {env['memory_method']}")
    if args.compare_official:
        print(
            "official: original formulation (nn.MultiheadAttention, sequence-first, unfused "
            "frozen BN), same weights/inputs/precision/memory format, passes alternating; "
            "speedup = official/ours (wall and CPU time)"
        )
    columns = _columns(args.compare_official)
    print("  ".join(name.rjust(span) for name, span, _ in columns), flush=True)
    rows = []
    for config in configs:
        row = run_config(config, args, device)
        rows.append(row)
        print("  ".join(cell(row).rjust(span) for _, span, cell in columns), flush=True)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = sys.argv[1:] if argv is None else argv
        payload = {"command": ["bench/inference.py", *command], "environment": env}
        payload["settings"] = {
            "size": args.size,
            "warmup": args.warmup,
            "iters": args.iters,
            "logits_tolerance": LOGITS_TOLERANCE,
            "boxes_tolerance": BOXES_TOLERANCE,
        }
        payload["rows"] = rows
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [row for row in rows if row.get("outputs_agree") is False]
    if failed:
        print(
            f"{len(failed)} fp32 configuration(s) differ from the official formulation by more "
            f"than {LOGITS_TOLERANCE:g} (logits) / {BOXES_TOLERANCE:g} (boxes)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
