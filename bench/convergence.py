"""Convergence: validation map per epoch with training-only query groups, denoising queries and
EMA weights against plain DETR, same seeds, same data.

    PYTHONPATH=src python bench/convergence.py [--sets demo small] [--epochs 15] \
        [--settings baseline groups dn groups+dn] [--ema] [--seeds 1 2 3] \
        [--json bench/results/<host>/convergence.json] [--png curves.png]

Every run is ``train.py`` in a process of its own, one after the other, with the set's
overrides, the setting's and ``seed=<seed>``; map and training seconds per epoch come from the
run's ``metrics.json``. Sets:

- ``demo``: the CPU demo (``experiment=synthetic_cpu``, what ``make train`` runs).
- ``small``: a generated COCO-format set of many small objects (10-14 per image on 160-192 px
  images, sides 6-20% of the short side: about 10-38 px, a share under 16 px), the demo's
  model with 30 queries.

Settings (``--settings``; ``--ema`` adds each one again with EMA weights, decay
``--ema-decay`` with a warm-up of 100 steps): ``baseline`` (plain DETR), ``groups``
(``model.query_groups=--groups``), ``dn`` (``model.denoising.groups=--dn-groups``),
``groups+dn``; a number after ``groups`` or ``dn`` sets their count for that setting
(``groups11+dn10``); a suffix ``@N`` trains that setting N epochs instead of ``--epochs`` (its
learning-rate schedule ends there), e.g. ``dn@15`` against the baseline's 30.

The table gives, per set and setting, the final map (median over seeds, with
min-max), seconds per epoch against the baseline's, and the epochs it needed to reach the
baseline's final map (median over seeds; "-": not reached).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, print_table, spread, write_json

SETS: dict[str, list[str]] = {
    "demo": ["experiment=synthetic_cpu"],
    "small": [
        "experiment=synthetic_cpu",
        "model.num_queries=30",
        "data.scales=[160,176,192]",
        "data.max_size=224",
        "data.val_size=176",
        "data.synthetic.num_train=256",
        "data.synthetic.num_val=48",
        "data.synthetic.min_size=160",
        "data.synthetic.max_size=192",
        "data.synthetic.min_objects=10",
        "data.synthetic.max_objects=14",
        "data.synthetic.min_object_fraction=0.06",
        "data.synthetic.max_object_fraction=0.2",
        "data.synthetic.empty_fraction=0.0",
        "data.synthetic.seed=7",
    ],
}


def setting_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """The overrides of a setting name such as ``groups+dn`` or ``dn+ema`` (an ``@N`` suffix,
    the run's epochs, is read by :func:`epochs_of`). Every option is stated, on or off, so
    that a set's own defaults (the demo's) never leak into a setting."""
    values = {"model.query_groups": 1, "model.denoising.groups": 0, "callbacks.ema.decay": "null"}
    for part in name.split("@")[0].split("+"):
        count = re.fullmatch(r"(groups|dn)(\d+)", part)  # groups11: 11 query groups
        if count:
            part, number = count.group(1), int(count.group(2))
        else:
            number = {"groups": args.groups, "dn": args.dn_groups}.get(part)
        if part == "groups":
            values["model.query_groups"] = number
        elif part == "dn":
            values["model.denoising.groups"] = number
        elif part == "ema":
            values["callbacks.ema.decay"] = args.ema_decay
            values["callbacks.ema.warmup_steps"] = 100
        elif part != "baseline":
            raise SystemExit(f"unknown setting part {part!r} in {name!r}")
    return [f"{key}={value}" for key, value in values.items()]


def epochs_of(setting: str, args: argparse.Namespace) -> int:
    """A setting's epochs: ``--epochs``, or N for ``<setting>@N`` (its own schedule, which
    ends after N epochs: "the same map in half the epochs" is ``<setting>@<epochs / 2>``)."""
    _, _, epochs = setting.partition("@")
    return int(epochs) if epochs else args.epochs


def run(set_name: str, setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run: map and seconds per epoch."""
    with tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        command = [
            sys.executable, str(ROOT / "train.py"), *SETS[set_name],
            *setting_overrides(setting, args), f"seed={seed}",
            f"trainer.max_epochs={epochs_of(setting, args)}", "trainer.enable_progress_bar=false",
            "callbacks.progress_bar=null", "callbacks.metrics_history.plot=false",
            f"run_dir={tmp}/run", *args.override,
        ]  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    history = metrics["history"]
    return {
        "set": set_name,
        "setting": setting,
        "seed": seed,
        "map": [entry["map"] for entry in history],
        "map_50": [entry["map_50"] for entry in history],
        "map_75": [entry.get("map_75") for entry in history],
        "train_loss": [entry["train_loss"] for entry in history],
        "seconds_per_epoch": statistics.median(entry["train_seconds"] for entry in history),
        "wall_seconds": wall,
    }


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose map is at least ``target``."""
    return next((i + 1 for i, value in enumerate(curve) if value >= target), None)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for set_name in dict.fromkeys(r["set"] for r in runs):
        mine = [r for r in runs if r["set"] == set_name]
        base = [r for r in mine if r["setting"] == "baseline"]
        base_final = statistics.median(r["map"][-1] for r in base) if base else None
        base_seconds = statistics.median(r["seconds_per_epoch"] for r in base) if base else None
        for setting in dict.fromkeys(r["setting"] for r in mine):
            group = [r for r in mine if r["setting"] == setting]
            reach = [epochs_to_reach(r["map"], base_final) for r in group] if base_final else []
            reached = [e for e in reach if e is not None]
            seconds = statistics.median(r["seconds_per_epoch"] for r in group)
            rows.append({
                "set": set_name,
                "setting": setting,
                "seeds": [r["seed"] for r in group],
                "final_map": spread([r["map"][-1] for r in group]),
                "best_map": spread([max(r["map"]) for r in group]),
                "seconds_per_epoch": seconds,
                "time_ratio": seconds / base_seconds if base_seconds else None,
                "epochs_to_baseline_final": (
                    statistics.median(reached) if len(reached) == len(reach) and reach else None
                ),
                "reached": f"{len(reached)}/{len(reach)}",
            })  # fmt: skip
    return rows


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in runs))
    figure, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for axis, set_name in zip(axes[0], sets):
        settings = list(dict.fromkeys(r["setting"] for r in runs if r["set"] == set_name))
        for index, setting in enumerate(settings):
            group = [r for r in runs if r["set"] == set_name and r["setting"] == setting]
            length = min(len(r["map"]) for r in group)
            median = [statistics.median(r["map"][e] for r in group) for e in range(length)]
            low = [min(r["map"][e] for r in group) for e in range(length)]
            high = [max(r["map"][e] for r in group) for e in range(length)]
            epochs = range(1, length + 1)
            colour = f"C{index}"
            axis.plot(epochs, median, color=colour, label=f"{setting} ({len(group)} seeds)")
            if len(group) > 1:
                axis.fill_between(epochs, low, high, color=colour, alpha=0.15)
        axis.set_title(f"{set_name}: validation map per epoch (median, min-max)")
        axis.set_xlabel("epoch")
        axis.set_ylabel("map")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["demo", "small"], choices=sorted(SETS))
    parser.add_argument("--settings", nargs="+",
                        default=["baseline", "groups", "dn", "groups+dn"])  # fmt: skip
    parser.add_argument("--ema", action="store_true", help="each setting again with EMA")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--groups", type=int, default=3, help="query groups of 'groups'")
    parser.add_argument("--dn-groups", type=int, default=5, help="denoising groups of 'dn'")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--override", action="append", default=[],
                        help="a further override for every run (repeatable)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument(
        "--resume-json", type=Path, help="an earlier --json: its runs are kept, the rest run"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = list(args.settings)
    if args.ema:
        settings += [f"{s}+ema" for s in args.settings]
    runs: list[dict[str, Any]] = []
    if args.resume_json and args.resume_json.is_file():
        runs = json.loads(args.resume_json.read_text())["runs"]
    done = {(r["set"], r["setting"], r["seed"]) for r in runs}
    for set_name in args.sets:
        for seed in args.seeds:
            for setting in settings:
                if (set_name, setting, seed) in done:
                    continue
                result = run(set_name, setting, seed, args)
                runs.append(result)
                print(f"{set_name} {setting} seed {seed}: map {result['map'][-1]:.4f} "
                      f"({result['seconds_per_epoch']:.1f} s/epoch)", flush=True)  # fmt: skip
                # written after every run: a long benchmark loses nothing when stopped
                write_json(args.json, {"environment": environment(), "args": _plain(args),
                                       "runs": runs, "summary": summarize(runs)})  # fmt: skip
    summary = summarize(runs)
    print_table(
        f"Convergence, {args.epochs} epochs: validation map (median over seeds, min-max)",
        ["set", "setting", "seeds", "final map", "best map", "s/epoch", "time x",
         "epochs to baseline's final map"],
        [[row["set"], row["setting"], len(row["seeds"]),
          f"{row['final_map']['median']:.4f} ({row['final_map']['min']:.4f}-"
          f"{row['final_map']['max']:.4f})",
          f"{row['best_map']['median']:.4f}", f"{row['seconds_per_epoch']:.1f}",
          f"{row['time_ratio']:.2f}" if row["time_ratio"] else "-",
          f"{row['epochs_to_baseline_final']:g} ({row['reached']})"
          if row["epochs_to_baseline_final"] is not None else f"- ({row['reached']})"]
         for row in summary],
    )  # fmt: skip
    write_json(args.json, {"environment": environment(), "args": _plain(args), "runs": runs,
                           "summary": summary})  # fmt: skip
    if args.png:
        plot(runs, args.png)
    return 0


def _plain(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


if __name__ == "__main__":
    raise SystemExit(main())
