"""Training steps of DETR's paper configuration on one device, as Lightning runs them: fp32
eager against bf16 autocast, fused attention, fused AdamW and ``torch.compile``.

    PYTHONPATH=src python bench/train_step.py --device cuda [--model R50] [--size 800 1333] \
        [--batch 4] [--warmup 5] [--steps 20] [--variants fp32 bf16 ...] \
        [--trajectory-steps 150] [--budget 300] [--json bench/results/gpu/train_step.json]
    PYTHONPATH=src python bench/train_step.py --quick      # CPU smoke run, seconds

Every variant trains a fresh ``DETRModule`` (seeded random weights, frozen BatchNorm, aux
losses, 91 classes; AdamW lr 1e-4, backbone 1e-5, weight decay 1e-4) with a Lightning
``Trainer`` (gradient clipping 0.1, no logger, no validation) on the same 8 pre-built batches
of ``--batch`` images padded to ``--size``; image i of a batch is narrower by i/8 of the width,
as in a batch of mixed aspect ratios, and holds 2..12 filled boxes in its class's colour, so
the model has something to learn. Batches come from a pinned-memory DataLoader and are moved
to the device by Lightning, as in training. A step's time is the wall time between two
consecutive ends of training batches (device synchronized): everything a step costs, data
transfer, matching, checks and logging included. ``--warmup`` steps (compilation, cuDNN
autotuning) are left out; images/s = batch / median step time; peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients, optimizer state
and activations).

Variants (``--variants``; the ratio column is against ``fp32``):

- ``fp32-math``: fp32 with attention computed as matrices (the path of ``nn.MultiheadAttention``
  in the original code) and torch's default AdamW;
- ``fp32``: fp32 eager, fused scaled-dot-product attention, torch's default AdamW;
- ``fp32-fused``: ``fp32`` with fused AdamW;
- ``tf32``: ``fp32`` with TF32 matrix products (``torch.set_float32_matmul_precision("high")``);
- ``bf16``: ``bf16-mixed`` autocast; ``bf16-math``: the same with attention as matrices;
- ``bf16-fused``: ``bf16`` with fused AdamW;
- ``default``: what a user gets without overrides on this device (``trainer.precision=auto``,
  the optimizer as ``DETRModule.configure_optimizers`` picks it);
- ``compile``: ``default`` plus ``compile=true`` (``torch.compile`` of the model);
- ``capture``: ``default`` plus ``capture=true`` (CUDA graphs of the training forward and
  backward, one per batch shape; CUDA only, eager elsewhere); ``capture-multiscale`` with
  the four sizes below, a graph each;
- ``multiscale`` / ``compile-multiscale``: ``default`` / ``compile`` on batches of four
  different padded sizes (the short side of ``--size`` times 1, 0.9, 0.8, 0.7), as multi-scale
  training feeds them; the warm-up covers each size twice.

``--trajectory-steps N`` then trains ``fp32`` and ``default`` N steps each from the same
initialization on the same batches and compares their loss curves (mean of each tenth of the
run): a faster variant must not train worse. ``--budget`` seconds bounds the whole run: a
variant that would start after it is recorded as skipped, not run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, spread, write_json
from inference import MODELS  # the benchmarks' model configurations, "tiny" included

from detr_lightning.cli.console import quiet_third_party
from detr_lightning.lightning.module import DETRModule
from detr_lightning.lightning.runtime import compile_model, resolve_precision


@dataclass(frozen=True)
class Variant:
    precision: str  # a Lightning precision, or "auto"
    attention: str = "fused"  # "fused" (scaled_dot_product_attention's kernels) or "math"
    optimizer: str = "torch"  # "torch" (torch's default), "fused", or "auto" (ours)
    compile: bool = False
    tf32: bool = False
    multiscale: bool = False
    capture: bool = False


VARIANTS: dict[str, Variant] = {
    "fp32-math": Variant("32-true", attention="math"),
    "fp32": Variant("32-true"),
    "fp32-fused": Variant("32-true", optimizer="fused"),
    "tf32": Variant("32-true", tf32=True),
    "bf16": Variant("bf16-mixed"),
    "bf16-math": Variant("bf16-mixed", attention="math"),
    "bf16-fused": Variant("bf16-mixed", optimizer="fused"),
    "default": Variant("auto", optimizer="auto"),
    "compile": Variant("auto", optimizer="auto", compile=True),
    "multiscale": Variant("auto", optimizer="auto", multiscale=True),
    "compile-multiscale": Variant("auto", optimizer="auto", compile=True, multiscale=True),
    "capture": Variant("auto", optimizer="auto", capture=True),
    "capture-multiscale": Variant("auto", optimizer="auto", capture=True, multiscale=True),
}
BASELINE = "fp32"
DEFAULT_VARIANTS = ["fp32-math", "fp32", "tf32", "bf16", "bf16-math", "bf16-fused", "default",
                    "compile"]  # fmt: skip
SCALES = (1.0, 0.9, 0.8, 0.7)
NUM_BATCHES = 8
NUM_CLASSES = 91


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DETR training-step throughput and memory per variant (random weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="R50", choices=sorted(MODELS))
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=list(DEFAULT_VARIANTS),
    )
    parser.add_argument("--trajectory-steps", type=int, default=0, help="0: no loss comparison")
    parser.add_argument(
        "--profile",
        metavar="VARIANT",
        help="profile this variant's last min(5, steps/2) steps, left out of its timing "
        "(torch.profiler; tables next to --json)",
    )
    parser.add_argument("--budget", type=float, help="seconds; later variants are skipped")
    parser.add_argument("--json", type=Path, help="write rows and environment to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: tiny model, 96x128, batch 2, 1 warmup + 3 timed steps, "
        "variants fp32 bf16 default, 6 trajectory steps",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.model, args.size, args.batch = "cpu", "tiny", [96, 128], 2
        args.warmup, args.steps, args.trajectory_steps = 1, 3, 6
        if args.variants == DEFAULT_VARIANTS:
            args.variants = ["fp32", "bf16", "default"]
    if args.steps < 2 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps must be >= 2, --warmup >= 0 and --batch >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if BASELINE not in args.variants:
        args.variants.insert(0, BASELINE)
    return args


# ---------------------------------------------------------------------------- data


def make_batches(
    batch_size: int, height: int, width: int, multiscale: bool, seed: int = 0
) -> list[tuple]:
    """``NUM_BATCHES`` training batches (images, padding mask, targets) on the CPU.

    Each image is a dim noise background with 2..12 boxes filled in the colour of their class;
    image i is narrower by i/8 of the batch's width and zero-padded on the right. With
    ``multiscale`` the batches cycle through ``SCALES`` of the size."""
    generator = torch.Generator().manual_seed(seed)
    palette = torch.rand(NUM_CLASSES, 3, generator=generator) * 4 - 2
    batches = []
    for b in range(NUM_BATCHES):
        scale = SCALES[b % len(SCALES)] if multiscale else 1.0
        h, w = int(height * scale) // 32 * 32, int(width * scale) // 32 * 32
        images = torch.randn(batch_size, 3, h, w, generator=generator) * 0.3
        mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
        targets = []
        for i in range(batch_size):
            valid_w = max(32, w - (i * w) // 8)
            mask[i, :, valid_w:] = True
            images[i, :, :, valid_w:] = 0
            count = int(torch.randint(2, 13, (), generator=generator))
            labels = torch.randint(1, NUM_CLASSES, (count,), generator=generator)
            centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
            sides = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
            boxes = torch.cat([centers, sides], dim=1)  # cxcywh, normalized to the valid image
            for label, (cx, cy, bw, bh) in zip(labels.tolist(), boxes.tolist()):
                x0, x1 = int((cx - bw / 2) * valid_w), int((cx + bw / 2) * valid_w)
                y0, y1 = int((cy - bh / 2) * h), int((cy + bh / 2) * h)
                images[i, :, y0:y1, x0:x1] = palette[label].view(3, 1, 1)
            targets.append(
                {
                    "labels": labels,
                    "boxes": boxes,
                    "image_id": b * batch_size + i,  # host ints, as the datasets give them
                    "stand_in_for": -1,
                }
            )
        batches.append((images, mask, targets))
    return batches


def pinned(batches: list[tuple]) -> list[tuple]:
    """The batches in page-locked memory, as a pinning data loader hands them over (pinned
    once here, so that the steps time the training step, not the copy into pinned memory)."""

    def pin(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.pin_memory()
        if isinstance(value, dict):
            return {k: pin(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(pin(v) for v in value)
        return value

    return [pin(batch) for batch in batches]


def loader(batches: list[tuple], steps: int) -> DataLoader:
    """The batches in order, repeated to ``steps``, through a DataLoader."""
    sequence = [batches[i % len(batches)] for i in range(steps)]
    return DataLoader(sequence, batch_size=None, shuffle=False)


# ---------------------------------------------------------------------------- measurement


class StepClock(pl.Callback):
    """Wall time between consecutive training-batch ends (device synchronized), the loss of
    every step, and the peak device memory from step ``warmup`` on."""

    def __init__(
        self,
        warmup: int,
        device: torch.device,
        steps: int,
        profile_steps: int = 0,
        profile_to: Path | None = None,
    ) -> None:
        self.warmup = warmup
        # the last profile_steps steps are profiled, and left out of the timed ones
        self.profile_from = warmup + steps - profile_steps
        self.device = device
        self.profile_steps = profile_steps
        self.profile_to = profile_to
        self.profile: dict[str, Any] | None = None
        self._profiler: torch.profiler.profile | None = None
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.peak_mb: float | None = None
        self.warmup_s: float | None = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        now = time.perf_counter()
        self.ends.append(now)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if len(self.ends) == self.warmup:
            self.warmup_s = now - self._start
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        if self.profile_steps and len(self.ends) == self.profile_from:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._profile_start = now
        elif (
            self._profiler is not None and len(self.ends) == self.profile_from + self.profile_steps
        ):
            self._profiler.stop()
            self.profile = summarize_profile(
                self._profiler, self.profile_steps, now - self._profile_start, self.profile_to
            )
            self._profiler = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def step_times(self) -> list[float]:
        end = self.profile_from if self.profile_steps else len(self.ends)
        timed = self.ends[max(self.warmup - 1, 0) : end]
        return [b - a for a, b in itertools.pairwise(timed)]


def summarize_profile(
    profiler: torch.profiler.profile, steps: int, wall_s: float, path: Path | None
) -> dict[str, Any]:
    """Where the profiled steps' time went: wall time, summed device-kernel time and host time
    per step, and the top operators by self host time and by device time (written to
    ``path``)."""
    events = profiler.key_averages()

    def device_us(event: Any) -> float:
        # device-side events only; user annotations (Optimizer.step#...) span their kernels
        if event.device_type != torch.autograd.DeviceType.CUDA or "#" in event.key:
            return 0.0
        return float(getattr(event, "self_device_time_total", 0) or 0)

    kernels_us = sum(device_us(e) for e in events)
    host_us = sum(float(e.self_cpu_time_total) for e in events)
    launch_keys = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    launches = sum(e.count for e in events if e.key in launch_keys)
    # waits of the host for the device (on a CPU: reads of a tensor's value)
    waits = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    if launches == 0:
        waits = ("aten::_local_scalar_dense",)
    syncs = sum(e.count for e in events if e.key in waits)
    operators = sum(e.count for e in events if e.key.startswith("aten::"))
    summary = {
        "steps": steps,
        "aten_ops_per_step": operators / steps,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "device_kernel_ms_per_step": kernels_us / 1e3 / steps,
        "host_op_ms_per_step": host_us / 1e3 / steps,
        "kernel_launches_per_step": launches / steps,
        "host_syncs_per_step": syncs / steps,
    }
    print(
        "profile: {wall_ms_per_step:.1f} ms wall per step (profiled), device kernels "
        "{device_kernel_ms_per_step:.1f} ms, {kernel_launches_per_step:.0f} kernel launches, "
        "{host_syncs_per_step:.0f} host syncs, {aten_ops_per_step:.0f} operators per step".format(
            **summary
        ),
        flush=True,
    )
    if path is not None:
        sort_device = "self_device_time_total" if kernels_us else "self_cpu_time_total"
        text = (
            f"{summary}\n\n== by self host time\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\n== by device time\n"
            + events.table(sort_by=sort_device, row_limit=30)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return summary


@contextlib.contextmanager
def numerics(variant: Variant):
    """TF32 and the attention kernels of ``variant``, restored afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = torch.get_float32_matmul_precision()
    if variant.tf32:
        torch.set_float32_matmul_precision("high")
    kernels = (
        sdpa_kernel([SDPBackend.MATH]) if variant.attention == "math" else contextlib.nullcontext()
    )
    try:
        with kernels:
            yield
    finally:
        torch.set_float32_matmul_precision(saved)


def build_module(model: str, variant: Variant, seed: int) -> DETRModule:
    torch.manual_seed(seed)
    optimizer: dict[str, Any] = {"_target_": "torch.optim.AdamW", "_partial_": True,
                                 "lr": 1e-4, "weight_decay": 1e-4}  # fmt: skip
    if variant.optimizer == "fused":
        optimizer["fused"] = True
    elif variant.optimizer == "torch":
        optimizer["fused"] = False  # explicit: torch's default (foreach on CUDA)
    settings = dict(MODELS[model])
    backbone = settings.pop("backbone")
    backbone = {"name": backbone} if isinstance(backbone, str) else dict(backbone)
    spec = {
        "_target_": "detr_lightning.models.build_detr",
        "backbone": {"_target_": "detr_lightning.models.Backbone", **backbone, "lr": 1e-5},
        **settings,
        "num_classes": NUM_CLASSES,
    }
    return DETRModule(model=spec, optimizer=optimizer)


def run_variant(
    name: str,
    variant: Variant,
    args: argparse.Namespace,
    batches: list[tuple],
    warmup: int,
    steps: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``variant``; times, losses, peak memory."""
    device = torch.device(args.device)
    module = build_module(args.model, variant, seed)
    precision = resolve_precision({"precision": variant.precision, "accelerator": args.device})
    if variant.compile:
        torch._dynamo.reset()
        compile_model(module, True)
    if variant.capture:
        module.capture_setting = True  # installed at the fit's start (CUDA only)
    profile = args.profile == name and steps >= 2
    clock = StepClock(
        warmup,
        device,
        steps,
        profile_steps=min(5, steps // 2) if profile else 0,
        profile_to=args.json.with_name(f"profile_{name}.txt") if profile and args.json else None,
    )
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        gradient_clip_val=0.1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    pl.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    data = loader(batches, warmup + steps)
    with numerics(variant):
        trainer.fit(module, train_dataloaders=data)
    optimizer = trainer.optimizers[0]
    fused = bool(optimizer.defaults.get("fused"))
    times = clock.step_times()
    row: dict[str, Any] = {
        "variant": name,
        **asdict(variant),
        "resolved_precision": str(precision),
        "fused_adamw": fused,
        "step_s": spread(times),
        "images_per_s": args.batch / statistics.median(times),
        "peak_mb": clock.peak_mb,
        "warmup_s": clock.warmup_s,
        "total_s": time.perf_counter() - started,
        "profile": clock.profile,
        "losses": clock.losses,
        "times": times,
    }
    del trainer, module, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def tenths(losses: list[float]) -> list[float]:
    """Mean loss of each tenth of a run (fewer parts for short runs)."""
    parts = min(10, len(losses))
    size = len(losses) / parts
    return [statistics.fmean(losses[int(k * size) : int((k + 1) * size)]) for k in range(parts)]


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_third_party()
    env = environment()  # recorded once, written with every variant's row
    started = time.perf_counter()
    height, width = args.size
    fixed = make_batches(args.batch, height, width, multiscale=False)
    if args.device == "cuda":
        fixed = pinned(fixed)
    multi = None
    rows, skipped = [], []
    for name in args.variants:
        elapsed = time.perf_counter() - started
        if args.budget is not None and elapsed > args.budget:
            skipped.append(name)
            print(f"skipped {name}: {elapsed:.0f} s spent of --budget {args.budget:.0f}")
            continue
        variant = VARIANTS[name]
        if variant.multiscale and multi is None:
            multi = make_batches(args.batch, height, width, multiscale=True)
            if args.device == "cuda":
                multi = pinned(multi)
        warmup = max(args.warmup, 2 * len(SCALES)) if variant.multiscale else args.warmup
        try:
            row = run_variant(name, variant, args, multi if variant.multiscale else fixed,
                              warmup, args.steps)  # fmt: skip
        except Exception as err:  # one failing variant must not lose the others' figures
            print(f"variant {name} failed: {type(err).__name__}: {err}", flush=True)
            rows.append({"variant": name, "error": f"{type(err).__name__}: {err}"})
            continue
        rows.append(row)
        # after every variant, so that a run stopped later keeps what it measured
        write_json(args.json, {"environment": env, "rows": rows, "partial": True})
        print(
            f"{name}: {row['images_per_s']:.2f} img/s, step {row['step_s']['median'] * 1e3:.1f} ms "
            f"(min {row['step_s']['min'] * 1e3:.1f}, max {row['step_s']['max'] * 1e3:.1f}), "
            f"peak {row['peak_mb'] or 0:.0f} MB, warm-up {row['warmup_s'] or 0:.1f} s",
            flush=True,
        )
    base = next((r for r in rows if r["variant"] == BASELINE and "error" not in r), None)
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["variant"], "failed", "", "", "", "", row["error"][:60]])
            continue
        ratio = row["images_per_s"] / base["images_per_s"] if base else float("nan")
        memory = (
            f"{row['peak_mb']:.0f} ({row['peak_mb'] / base['peak_mb']:.2f}x)"
            if row["peak_mb"] and base and base["peak_mb"]
            else "n/a"
        )
        steps = row["step_s"]
        table.append([row["variant"], f"{row['images_per_s']:.2f}", f"{ratio:.2f}x",
                      f"{steps['median']*1e3:.1f} ({steps['min']*1e3:.1f}-{steps['max']*1e3:.1f})",
                      memory, row["resolved_precision"],
                      "fused" if row["fused_adamw"] else "torch default"])  # fmt: skip
    title = (
        f"Training step, {args.model} {height}x{width}, batch {args.batch}, {args.device} "
        f"({env['cuda'] or env['cpu']}); {args.steps} timed steps after {args.warmup}"
    )
    header = ["variant", "images/s", f"vs {BASELINE}", "step ms median (min-max)",
              "peak MB (vs fp32)", "precision", "AdamW"]  # fmt: skip
    print_table(title, header, table)

    trajectory = None
    if args.trajectory_steps:
        elapsed = time.perf_counter() - started
        if args.budget is not None and elapsed > args.budget:
            print(f"skipped the trajectory: {elapsed:.0f} s spent of --budget {args.budget:.0f}")
        else:
            trajectory = compare_trajectories(args, fixed)
    write_json(
        args.json,
        {
            "environment": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
            "skipped": skipped,
            "trajectory": trajectory,
        },
    )
    return 1 if any("error" in r for r in rows) else 0


def compare_trajectories(args: argparse.Namespace, batches: list[tuple]) -> dict[str, Any]:
    """``fp32`` and ``default`` trained ``--trajectory-steps`` steps from one initialization on
    the same batches: the loss per tenth of the run, and the ratio of the last tenths."""
    curves = {}
    for name in (BASELINE, "default"):
        row = run_variant(name, VARIANTS[name], args, batches, 0, args.trajectory_steps, seed=1)
        curves[name] = {
            "losses": row["losses"],
            "tenths": tenths(row["losses"]),
            "precision": row["resolved_precision"],
            "fused_adamw": row["fused_adamw"],
        }
    base, ours = curves[BASELINE]["tenths"], curves["default"]["tenths"]
    pairs = enumerate(zip(base, ours, strict=True))
    rows = [[k + 1, f"{a:.3f}", f"{b:.3f}", f"{b / a:.3f}"] for k, (a, b) in pairs]
    print_table(
        f"Loss trajectory, {args.trajectory_steps} steps from one initialization (mean per tenth)",
        ["tenth", BASELINE, f"default ({curves['default']['precision']})", "ratio"],
        rows,
    )
    return {
        "steps": args.trajectory_steps,
        "curves": curves,
        "final_ratio": ours[-1] / base[-1],
        "first_ratio": ours[0] / base[0],
    }


if __name__ == "__main__":
    raise SystemExit(main())
