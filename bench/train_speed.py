"""Training throughput, peak memory and loss against the official DETR code, side by side.

    PYTHONPATH=src python bench/train_speed.py --official /path/to/detr-checkout [--epochs 3] \
        [--data ROOT] [--json bench/results/train_cpu.json] [--variants default no-group] \
        [--rounds 2]

Both code bases train the same small DETR (ResNet-18 from random weights with frozen BN, width
128, 8 heads, 2+2 layers, FFN 512, 20 queries, aux loss, AdamW lr 1e-4 for all, weight decay
1e-4, grad clip 0.1, batch 8) with the same augmentation scaled down (flip; short side
128..192, max 256; half of the time resize 96/128/160 + random crop 80..160 first; val 160) on
the same COCO-format data: by default ``bench/make_dataset.py``'s 1000 + 200 photo-sized JPEGs.
Each evaluates on val after every epoch, as it does by default. Each uses its own defaults for
everything else (data-loader workers, threads, batching): this is what a user gets.

The official side is ``../shared/bench/official_train.py`` (its ``main.py`` unchanged, with
monkeypatches for the small config; pass the checkout with ``--official`` or
``$REF_DETR_DIR``). Our side is ``train.py`` with the overrides in ``SMALL`` plus an epoch timer.
Runs go one after the other, never in parallel. Per epoch: training wall seconds and images/s
(data loading and training steps, from the epoch's start to its last step; the validation
after it is excluded on both sides), training loss (the weighted total, epoch mean), and,
polled from /proc by this script for both alike, the peak RSS of the main process and of the
largest data-loader worker.

A shared or throttled machine drifts: the same official run took 8.1 and 9.6 img/s an hour
apart on one VM. With ``--rounds N`` every code base runs N times, in reversed order every
other round (official, ours, ours, official, ...), so that a steady drift biases neither side.
Each round gives a ratio against that round's official run; the table shows their median and
every round's, img/s pools the epochs of all rounds, memory is the peak over rounds and the
losses are the first round's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, TreeMemory, ensure_dataset, environment, print_table, write_json

OFFICIAL_HARNESS = ROOT.parent / "shared" / "bench" / "official_train.py"

SMALL = [
    "backbone=resnet18",
    "backbone.pretrained=false",
    "backbone.lr=1e-4",
    "model.hidden_dim=128",
    "model.nheads=8",
    "model.enc_layers=2",
    "model.dec_layers=2",
    "model.dim_feedforward=512",
    "model.num_queries=20",
    "optimizer.lr=1e-4",
    "data.batch_size=8",
    "data.scales=[128,144,160,176,192]",
    "data.max_size=256",
    "data.crop_resize=[96,128,160]",
    "data.crop_min=80",
    "data.crop_max=160",
    "data.val_size=160",
    "schedule.lr_drop=200",  # the official default; no drop within a benchmark
    "trainer.accelerator=cpu",
]
VARIANTS = {
    "default": [],
    "no-group": ["data.group_by_aspect_ratio=false"],
    # what the default was on 2 cores before data.num_workers=null meant no worker there
    "one-worker": ["data.num_workers=1"],
}


# ------------------------------------------------------------------------ our side (child)


def run_ours(log_path: str, overrides: list[str]) -> None:
    """Train with our train(cfg) plus an epoch timer writing JSON lines to ``log_path``."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    from detr_lightning.cli.train import train

    class EpochTimer(pl.Callback):
        # The clock runs from the epoch's start to the end of its last training step: data
        # loading and steps, not the validation that Lightning runs before on_train_epoch_end.
        # That is what the official side times (its train_one_epoch, without evaluate).
        def __init__(self) -> None:
            self.started = self.last_step_end = None

        def on_train_epoch_start(self, trainer, module) -> None:
            self.started = self.last_step_end = time.perf_counter()
            self.padded = self.pixels = 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.padded += int(batch[1].sum())  # the padding mask: True on padding
            self.pixels += batch[1].numel()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.last_step_end = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            train_s = self.last_step_end - self.started
            images = trainer.num_training_batches * trainer.datamodule.per_device_batch_size
            images = min(images, len(trainer.datamodule.train_dataset))
            record = {
                "phase": "train",
                "epoch": trainer.current_epoch + 1,
                "train_s": round(train_s, 2),
                # with the validation and checkpointing that follow the last step
                "epoch_s": round(time.perf_counter() - self.started, 2),
                "img_per_s": round(images / train_s, 3),
                "loss": float(trainer.callback_metrics["train/loss"]),
                "padding_fraction": round(self.padded / max(self.pixels, 1), 4),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            with open(log_path, "a") as log:
                log.write(json.dumps(record) + "\n")

    with initialize_config_dir(
        config_dir=str(ROOT / "src" / "detr_lightning" / "conf"), version_base="1.3"
    ):
        cfg = compose("train", overrides=overrides)
    train(cfg, callbacks=[EpochTimer()])


# ------------------------------------------------------------------------------ harness


def _run(command: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one training process; its epochs from ``log`` plus the polled memory peaks."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with TreeMemory(process.pid) as memory:
        output, _ = process.communicate()
    if process.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"{' '.join(command[:3])} ... failed with status {process.returncode}")
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [e for e in epochs if e.get("phase") == "train"]
    return {
        "epochs": epochs,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_main_mb": round(memory.main_mb, 1),
        "peak_rss_worker_mb": round(memory.child_mb, 1),
    }


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One code base's runs: all epochs (each tagged with its round), the peak memory over the
    rounds, the wall time of all, and each round's median img/s."""
    return {
        "epochs": [{**e, "round": r} for r, run in enumerate(rounds) for e in run["epochs"]],
        "wall_s": round(sum(run["wall_s"] for run in rounds), 1),
        "peak_rss_main_mb": max(run["peak_rss_main_mb"] for run in rounds),
        "peak_rss_worker_mb": max(run["peak_rss_worker_mb"] for run in rounds),
        "round_img_per_s": [
            statistics.median(e["img_per_s"] for e in run["epochs"]) for run in rounds
        ],
    }


def summarize(name: str, run: dict[str, Any]) -> dict[str, Any]:
    speeds = [e["img_per_s"] for e in run["epochs"]]
    first = [e for e in run["epochs"] if e.get("round", 0) == 0]
    return {
        "name": name,
        "img_per_s_median": statistics.median(speeds),
        "img_per_s_min": min(speeds),
        "img_per_s_max": max(speeds),
        "losses": [round(e["loss"], 4) for e in first],
        "final_loss": first[-1]["loss"],
        "padding_fraction": first[-1].get("padding_fraction"),
        **{k: run[k] for k in ("wall_s", "peak_rss_main_mb", "peak_rss_worker_mb")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", default=os.environ.get("REF_DETR_DIR"),
                        help="facebookresearch/detr checkout (default $REF_DETR_DIR)")  # fmt: skip
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--data", help="COCO-format root (default: the generated benchmark set)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["default", "no-group", "one-worker"],
                        choices=sorted(VARIANTS))  # fmt: skip
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for our runs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each code base, in alternating order")  # fmt: skip
    parser.add_argument("--json")
    parser.add_argument("--run-ours", metavar="LOG", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.run_ours:
        run_ours(args.run_ours, overrides)
        return
    if not args.skip_official and not (args.official and Path(args.official, "main.py").is_file()):
        parser.error("give the official DETR checkout with --official (or --skip-official)")
    if args.rounds < 1:
        parser.error("--rounds: give 1 or more")
    data = ensure_dataset(args.data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    results: dict[str, Any] = {"environment": environment(), "data": str(data), "runs": {}}
    order = ([] if args.skip_official else ["official"]) + list(args.variants)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for name in order if index % 2 == 0 else order[::-1]:
                log = Path(tmp, f"{name}-{index}.jsonl")
                if name == "official":
                    command = [sys.executable, str(OFFICIAL_HARNESS), "--ref", args.official,
                               "--data", str(data), "--epochs", str(args.epochs),
                               "--log", str(log), "--infer-repeats", "0"]  # fmt: skip
                    print(f"official DETR (round {index + 1}/{args.rounds}) ...", flush=True)
                else:
                    command = [sys.executable, __file__, "--run-ours", str(log), *SMALL,
                               f"data.root={data}", f"trainer.max_epochs={args.epochs}",
                               f"run_dir={tmp}/run-{name}-{index}", *VARIANTS[name],
                               *args.extra]  # fmt: skip
                    print(f"detr-lightning ({name}, round {index + 1}/{args.rounds}) ...",
                          flush=True)  # fmt: skip
                rounds[name].append(_run(command, log, env))
    results["runs"] = {name: _merge_rounds(runs) for name, runs in rounds.items()}
    rows, baseline = [], None
    for name, run in results["runs"].items():
        summary = summarize(name, run)
        if baseline is None:
            baseline = run
        # each round against the baseline's run of the same round
        summary["ratio_rounds"] = [
            round(ours / base, 4)
            for ours, base in zip(run["round_img_per_s"], baseline["round_img_per_s"])
        ]
        summary["ratio_median"] = statistics.median(summary["ratio_rounds"])
        results["runs"][name]["summary"] = summary
        ratio = f"{summary['ratio_median']:.2f}x"
        if args.rounds > 1:
            ratio += " (" + ", ".join(f"{r:.2f}" for r in summary["ratio_rounds"]) + ")"
        rows.append([
            name if name == "official" else f"detr-lightning ({name})",
            f"{summary['img_per_s_median']:.2f} ({summary['img_per_s_min']:.2f}-"
            f"{summary['img_per_s_max']:.2f})",
            ratio,
            summary["peak_rss_main_mb"],
            summary["peak_rss_worker_mb"],
            "" if summary["padding_fraction"] is None else f"{summary['padding_fraction']:.0%}",
            " / ".join(f"{x:.2f}" for x in summary["losses"]),
        ])  # fmt: skip
    results["table"] = print_table(
        f"Training, small config, {args.epochs} epochs, {data.name}",
        ["code", "img/s median (min-max)", "ratio (rounds)", "peak RSS main MB",
         "peak RSS worker MB", "padding", "train loss per epoch"],
        rows,
    )  # fmt: skip
    write_json(args.json, results)


if __name__ == "__main__":
    main()
