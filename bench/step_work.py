"""The host's work per training step: operators dispatched and host syncs, counted on any
machine (``detr_lightning.lightning.callbacks.StepWork``), for the training run a user starts.

    PYTHONPATH=src python bench/step_work.py [--model detr_r50] [--steps 6] [--warmup 2] \
        [--device cpu] [--baseline bench/results/<host>/step_work-<before>.json] \
        [--json bench/results/<host>/step_work.json]

It runs ``train(cfg)`` with the paper's model (``model=detr_r50``: ResNet-50, 6+6 layers,
100 queries, aux losses; random backbone, nothing downloaded) and the default callbacks,
logger and progress bar, on the synthetic dataset with batch 4 loaded by one worker process
(whose work is not the training step's, as on a GPU node), gradient clipping 0.1, no
validation. Image sizes do not change the counts, so the synthetic images' 80-112 px keep a
CPU run short. Each step is counted from one training batch's start to the next's, after
``--warmup`` steps; reported: the median operators and host syncs per step, the syncs by
kind, and the operators a step runs most. ``--baseline`` adds a row from an earlier JSON of
this script (e.g. before a change) and the ratios against it.

Counts are exact and repeatable (they do not depend on the machine's load), but the numbers
of targets per image change the matching's host work a little from step to step: medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json

from detr_lightning.cli.config import compose_config
from detr_lightning.cli.train import train
from detr_lightning.lightning.callbacks import StepWork


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="detr_r50", help="a config of the model group")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=6, help="counted steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before counting")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--baseline", type=Path, help="an earlier --json of this script")
    parser.add_argument("--label", default="now", help="this run's name in the table")
    parser.add_argument("--override", action="append", default=[], help="more config overrides")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [
        f"model={args.model}",
        "backbone.pretrained=false",
        "data=synthetic",
        f"data.batch_size={args.batch}",
        "data.num_workers=1",
        "data.synthetic.num_train=64",
        "data.synthetic.num_val=4",
        f"trainer.accelerator={args.device}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.enable_model_summary=false",
        "trainer.gradient_clip_val=0.1",
        "cpu_threads=2",
        f"run_dir={run_dir}",
        *args.override,
    ]


def count(args: argparse.Namespace) -> dict[str, Any]:
    work = StepWork(warmup=args.warmup)
    with tempfile.TemporaryDirectory() as folder:
        cfg = compose_config("train", overrides(args, Path(folder) / "run"))
        train(cfg, callbacks=[work])
    return {"label": args.label, **work.summary(top=25), "per_step": work.steps}


def row(result: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    def ratio(key: str) -> str:
        return f" ({result[key] / base[key]:.2f}x)" if base and base.get(key) else ""

    kinds = ", ".join(f"{kind} {value:g}" for kind, value in result["sync_kinds"].items())
    return [result["label"], f"{result['operators']:.0f}{ratio('operators')}",
            f"{result['syncs']:.0f}{ratio('syncs')}", kinds or "-"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = count(args)
    base = json.loads(args.baseline.read_text())["result"] if args.baseline else None
    rows = ([row(base, None)] if base else []) + [row(result, base)]
    print_table(
        f"Host work per training step, {args.model}, batch {args.batch}, {args.device} "
        f"(median of {result['steps_in_medians']} steps inside the epoch, after {args.warmup})",
        ["run", "operators", "host syncs", "syncs by kind"],
        rows,
    )
    print_table(
        "Operators a step runs most",
        ["operator", "per step"],
        [[name, f"{n:g}"] for name, n in result["top_operators"].items()],
    )
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()}  # fmt: skip
    write_json(args.json, {"environment": environment(), "args": settings, "result": result,
                           "baseline": base})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
