"""Inference against transformers' DetrForObjectDetection with the same weights, same process.

    PYTHONPATH=src python bench/inference_hf.py [--model R101] [--size 800 1066] \
        [--precisions fp32 bf16] [--warmup 2] [--iters 7] [--reuse-freed-memory] \
        [--json bench/results/hf_cpu.json]

The reference is built with random weights and random frozen-BN statistics (timm ResNet, no
download), written with ``save_pretrained`` and loaded into ours with ``load_pretrained``, the
path users take. Batch 1, one normalized random image of ``--size``. Timed passes alternate
transformers / ours / ours with the eager ResNet trunk (``enable_cpu_graphs(model, False)``) /
ours with the image's shape declared static (``set_static_shapes``, a trunk graph
compiled by oneDNN Graph for that shape; its compilation and warm-up come at the first,
untimed, call; fp32 only) / ours as ``bf16_inference_copy(model)``, the backbone's weights folded
and cast once (bf16 only; what ``predict`` runs from a call's second batch on) / our fastest
backbone alone (fp32: the static-shape one; bf16: the inference copy's), under
``torch.inference_mode`` (and ``torch.autocast`` for bf16), so background load hits all alike.
Reported: the median seconds per image, the speedup (median of the per-round ratios to
transformers' pass of the same round, so that slow spells of the machine cancel out), the
largest box difference and the share of queries whose top label (no-object excluded) agrees,
both against transformers' fp32 output.

The backbone-alone row is a bound, not a variant: no model whose ResNet trunk runs at that
speed can beat transformers by more than its speedup. Below the table the trunk's floating
point operations (counted by ``torch.utils.flop_counter``) are divided by its median time and
set beside what a 2048x2048x2048 matrix product of the same precision reaches on the
machine, showing how close the convolutions are to the arithmetic the CPU can do.

``--reuse-freed-memory`` first sets the process's malloc as ``predict.py`` and ``eval.py`` do
on a CPU (``detr_lightning.utils.host_memory``); it speeds up both code bases, transformers' more.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import INFERENCE_BOUND_ROW as BOUND
from common import environment, print_table, write_json

from helpers.hf_reference import build_hf_detr

BACKBONES = {"R50": "resnet50", "R101": "resnet101", "R101-DC5": "resnet101"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="R101", choices=sorted(BACKBONES))
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--reuse-freed-memory", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.reuse_freed_memory:
        from detr_lightning.utils.host_memory import reuse_freed_memory, why_not_reused

        if why_not_reused() or not reuse_freed_memory():
            parser.error(f"--reuse-freed-memory: malloc left as it is: {why_not_reused()}")
    if args.threads:
        torch.set_num_threads(args.threads)

    import detr_lightning as dl

    reference = build_hf_detr(BACKBONES[args.model], dilation=args.model.endswith("DC5"))
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = dl.load_pretrained(folder).model.eval()
    height, width = args.size
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    pixel_mask = torch.ones(1, height, width, dtype=torch.long)
    from detr_lightning.inference import bf16_inference_copy, enable_cpu_graphs, set_static_shapes

    eager = enable_cpu_graphs(copy.deepcopy(ours), False)
    static = copy.deepcopy(ours)
    set_static_shapes(static.backbone, [tuple(images.shape)])
    prepared = bf16_inference_copy(ours) if "bf16" in args.precisions else None
    no_padding = torch.zeros(1, height, width, dtype=torch.bool)
    runs = {
        "transformers": lambda: reference(pixel_values=images, pixel_mask=pixel_mask),
        "detr-lightning": lambda: ours(images),
        # the same model without the CPU inference graph of its ResNet trunk
        "detr-lightning, eager trunk": lambda: eager(images),
        # the same model with the image's shape declared static (fp32 only: autocast runs eager)
        "detr-lightning, static shape": lambda: static(images),
        # bf16 only: the backbone's weights folded and cast once (what predict runs from a
        # call's second batch on)
        "detr-lightning, bf16 inference copy": lambda: prepared(images),
    }
    # our fastest backbone alone, a bound on any model built on it: in fp32 the static-shape
    # graph, in bf16 the inference copy's
    bounds = {
        "fp32": lambda: static.backbone(images, no_padding),
        "bf16": lambda: prepared.backbone(images, no_padding),
    }
    with torch.inference_mode():
        truth = reference(pixel_values=images, pixel_mask=pixel_mask)
    rows, records = [], []
    for precision in args.precisions:
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        # under autocast a static shape runs the eager trunk, as the eager row does
        skip = "bf16 inference copy" if precision == "fp32" else "static"
        timed = {k: v for k, v in runs.items() if skip not in k}
        timed[BOUND] = bounds[precision]
        times: dict[str, list[float]] = {name: [] for name in timed}
        outputs = {}
        with torch.inference_mode(), autocast:
            for step in range(args.warmup + args.iters):
                for name, run in timed.items():
                    started = time.perf_counter()
                    outputs[name] = run()
                    if step >= args.warmup:
                        times[name].append(time.perf_counter() - started)
        base = times["transformers"]
        for name, values in times.items():
            median = statistics.median(values)
            speedup = statistics.median(b / v for b, v in zip(base, values))
            row = {
                "precision": precision,
                "code": name,
                "s_per_img": median,
                "min": min(values),
                "max": max(values),
                "speedup": speedup,
                "speedup_of_medians": statistics.median(base) / median,
            }
            boxes, agree = "", ""
            if name not in ("transformers", BOUND):
                out = outputs[name]
                diff = (out["pred_boxes"].float() - truth.pred_boxes).abs().max().item()
                top = out["pred_logits"].float()[..., :-1].argmax(-1)
                share = (top == truth.logits[..., :-1].argmax(-1)).float().mean().item()
                row.update(max_box_diff=diff, top_label_agreement=share)
                boxes, agree = f"{diff:.1e}", f"{share:.0%}"
            records.append({**row, "times": values})
            rows.append([
                precision, name, f"{median:.3f} ({min(values):.3f}-{max(values):.3f})",
                f"{speedup:.2f}x", boxes, agree,
            ])  # fmt: skip
    roofline = _roofline(
        eager.backbone,
        images,
        {r["precision"]: r["s_per_img"] for r in records if r["code"] == BOUND},
    )
    malloc = ", malloc reusing freed memory" if args.reuse_freed_memory else ""
    table = print_table(
        f"Inference {args.model} {height}x{width}, batch 1, CPU, {torch.get_num_threads()} "
        f"threads{malloc}",
        ["precision", "code", "s/img median (min-max)", "speedup", "max |box diff| vs HF fp32",
         "top labels = HF fp32"],
        rows,
    )  # fmt: skip
    for precision, rate in roofline["precisions"].items():
        line = (
            f"ResNet trunk, {precision}: {roofline['trunk_gflop']:.0f} GFLOP in "
            f"{rate['backbone_s']:.3f} s = {rate['trunk_gflop_per_s']:.0f} GFLOP/s; a "
            f"{precision} 2048^3 matrix product on this machine: "
            f"{rate['matmul_gflop_per_s']:.0f} GFLOP/s (median of {MATMUL_RUNS})"
        )
        print(line)
        table += "\n" + line + "\n"
    settings = {"reuse_freed_memory": args.reuse_freed_memory}
    write_json(
        args.json,
        {"environment": environment(), "settings": settings, "rows": records,
         "roofline": roofline, "table": table},
    )  # fmt: skip


MATMUL_RUNS = 10  # timed matrix products per precision, after 2 untimed


def _roofline(backbone: torch.nn.Module, images: torch.Tensor, seconds: dict[str, float]) -> dict:
    """The trunk's arithmetic rate in each precision (``seconds``: the backbone's median time)
    against a matrix product's in that precision on this machine."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backbone.trunk(images)
    flop = counter.get_total_flops()
    rates = {}
    for precision, backbone_s in seconds.items():
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        times = []
        with torch.inference_mode():
            for step in range(2 + MATMUL_RUNS):
                started = time.perf_counter()
                a @ b
                if step >= 2:
                    times.append(time.perf_counter() - started)
        rates[precision] = {
            "backbone_s": backbone_s,
            "trunk_gflop_per_s": flop / backbone_s / 1e9,
            "matmul_gflop_per_s": 2 * 2048**3 / statistics.median(times) / 1e9,
        }
    return {"trunk_gflop": flop / 1e9, "precisions": rates}


if __name__ == "__main__":
    main()
