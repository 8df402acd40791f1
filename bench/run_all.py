"""Every benchmark, one after the other, and one summary table against the targets.

    make bench OFFICIAL=/path/to/detr-checkout        # or REF_DETR_DIR=...
    PYTHONPATH=src python bench/run_all.py --official PATH [--out bench/results/NAME] [--quick]

Runs bench/train_speed.py (with and without size grouping, and the official code), bench/data.py,
bench/eval_backends.py and bench/inference_hf.py (fp32 also with ``--reuse-freed-memory``, the
malloc setting of predict.py and eval.py), step_work.py, buckets.py and convergence.py, each
writing its JSON under ``--out``, then
prints the summary (ratios with their targets) and writes ``summary.json`` there. Run it with
nothing else busy on the machine: on a small CPU a parallel job makes every figure meaningless.
``--quick`` shrinks every run (1 epoch, fewer images and passes) to check the suite works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import INFERENCE_BOUND_ROW as BOUND
from common import ROOT, environment, print_table, write_json

# bench/step_work.py's count before the host-work changes (commit 2001fb9)
STEP_WORK_BASELINE = ROOT / "bench/results/cpu-2core-epyc-avx512/step_work-before.json"


def _run(script: str, args: list[str], out: Path, summarize_only: bool = False, name: str = ""):
    """Run ``bench/<script>`` writing ``<out>/<name>.json`` and return that JSON; with
    ``summarize_only`` read the file of an earlier run."""
    path = out / f"{name or Path(script).stem}.json"
    if summarize_only:
        return json.loads(path.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    command = [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(path)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return json.loads(path.read_text())


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX or AVX512-BF16), or a GPU is present."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", default=os.environ.get("REF_DETR_DIR"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / platform.node())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--summarize", action="store_true", help="summarize the JSON in --out")
    args = parser.parse_args()
    if not (args.official and Path(args.official, "main.py").is_file()):
        parser.error(
            "give the official DETR checkout: --official PATH, OFFICIAL=PATH or REF_DETR_DIR"
        )
    quick = args.quick
    official = ["--official", args.official]
    summarize_only = args.summarize
    # two rounds in ABBA order for the recorded figures: the machine may drift over the run
    train_args = ["--epochs", "1"] if quick else ["--epochs", "3", "--rounds", "2"]
    train = _run("train_speed.py", [*official, *train_args], args.out, summarize_only)
    data_args = ["--images", "40", "--rounds", "2"] if quick else []
    data = _run("data.py", [*official, *data_args], args.out, summarize_only)
    evaluation_args = ["--images", "300", "--rounds", "1"] if quick else ["--rounds", "2"]
    evaluation = _run("eval_backends.py", evaluation_args, args.out, summarize_only)
    # bf16 autocast is only worth timing where the CPU computes in bf16 (AMX / AVX512-BF16);
    # elsewhere it is emulated and many times slower than fp32
    inference_args = ["--precisions", "fp32", *(["bf16"] if native_bf16() else [])]
    if quick:
        inference_args += [
            "--model",
            "R50",
            "--size",
            "320",
            "416",
            "--warmup",
            "1",
            "--iters",
            "2",
        ]
    inference = _run("inference_hf.py", inference_args, args.out, summarize_only)
    # the host's work per training step at the paper config, against the recorded baseline
    step_args = ["--baseline", str(STEP_WORK_BASELINE), *(["--steps", "2"] if quick else [])]
    step_work = _run("step_work.py", step_args, args.out, summarize_only)
    buckets = _run("buckets.py", ["--epochs", "1"] if quick else [], args.out, summarize_only)
    # map per epoch with the training-only queries against plain DETR, same seeds (~1 h; quick:
    # the demo only, 2 epochs)
    convergence_args = (
        ["--sets", "demo", "--epochs", "2", "--settings", "baseline", "groups+dn"]
        if quick
        else ["--settings", "baseline", "groups", "dn", "groups+dn", "baseline+ema"]
    )
    convergence = _run("convergence.py", convergence_args, args.out, summarize_only)
    # both code bases again with malloc as predict.py / eval.py set it on a CPU
    from detr_lightning.utils.host_memory import why_not_reused

    reused, not_reused = None, why_not_reused()
    reused_file = args.out / "inference_hf-reuse.json"  # older result folders have none
    if (summarize_only and reused_file.is_file()) or (not summarize_only and not_reused is None):
        reused_args = [*inference_args, "--precisions", "fp32", "--reuse-freed-memory"]
        reused = _run(
            "inference_hf.py", reused_args, args.out, summarize_only, name="inference_hf-reuse"
        )
    elif not summarize_only:
        print(f"fp32 inference with malloc reusing freed memory not run: {not_reused}")

    runs = {name: run["summary"] for name, run in train["runs"].items()}
    ours, plain, ref = runs["default"], runs.get("no-group"), runs["official"]

    def vs_official(run: dict) -> float:
        """The median of the rounds' ratios (train_speed.py --rounds); older files hold one run."""
        return run.get("ratio_median", run["img_per_s_median"] / ref["img_per_s_median"])

    speed = vs_official(ours)
    rows = [
        ["training img/s vs official", f"{speed:.2f}x", ">= 1.33x",
         f"{ours['img_per_s_median']:.2f} vs {ref['img_per_s_median']:.2f}"],
        ["training peak RSS, main process", f"{ours['peak_rss_main_mb']:.0f} MB", "< official",
         f"official {ref['peak_rss_main_mb']:.0f} MB"],
        ["training peak RSS, a worker",
         f"{ours['peak_rss_worker_mb']:.0f} MB" if ours["peak_rss_worker_mb"] else "no worker",
         "< official", f"official {ref['peak_rss_worker_mb']:.0f} MB"],
        ["final-epoch training loss", f"{ours['final_loss']:.3f}", "<= official",
         f"official {ref['final_loss']:.3f}"],
    ]  # fmt: skip
    if plain:
        rows.append([
            "size grouping (padding, img/s)",
            f"{ours['padding_fraction']:.0%} vs {plain['padding_fraction']:.0%}",
            "less padding",
            f"{ours['img_per_s_median'] / plain['img_per_s_median']:.2f}x img/s; peak main "
            f"{ours['peak_rss_main_mb']:.0f} vs {plain['peak_rss_main_mb']:.0f} MB",
        ])  # fmt: skip
    worker = runs.get("one-worker")
    if worker:
        rows.append([
            "one data worker (the former default on 2 cores)",
            f"{vs_official(worker):.2f}x img/s", "",
            f"{worker['img_per_s_median']:.2f} img/s; worker {worker['peak_rss_worker_mb']:.0f} MB",
        ])  # fmt: skip
    ours_data = median(data["images_per_s"]["detr-lightning"])
    official_data = median(data["images_per_s"]["official"])
    rows.append(["data pipeline per worker", f"{ours_data / official_data:.2f}x", ">= 1.5x",
                 f"{ours_data:.0f} vs {official_data:.0f} img/s"])  # fmt: skip
    slow = median(evaluation["seconds"]["pycocotools"])
    fast = median(evaluation["seconds"]["faster_coco_eval"])
    rows.append(["COCO evaluation (faster_coco_eval)", f"{slow / fast:.2f}x", ">= 5x",
                 f"{fast:.1f} vs {slow:.1f} s; statistics differ by "
                 f"{evaluation['max_stat_difference']:.0e}"])  # fmt: skip
    labels = {
        "detr-lightning": "",
        # a fixed input size declared with set_static_shapes (timed in fp32 only)
        "detr-lightning, static shape": ", static shape",
        # the backbone's weights folded and cast once, what predict(bf16=True) runs (bf16 only)
        "detr-lightning, bf16 inference copy": ", bf16 inference copy",
        # the backbone alone: no model with this trunk can be faster
        BOUND: ", bound: our backbone alone",
    }
    rows_of = [(inference, ""), (reused, ", both with malloc reusing freed memory")]
    for run, setting in [(run, setting) for run, setting in rows_of if run is not None]:
        for row in run["rows"]:
            if row["code"] not in labels:
                continue
            fp32 = row["precision"] == "fp32"
            target = ">= 1.5x, boxes 1e-4" if fp32 else ">= 3x, boxes 5e-3"
            if row["code"] == BOUND:
                target = "(the most any model with this trunk can gain)"
                rate = (run.get("roofline") or {}).get("precisions", {}).get(row["precision"])
                detail = f"{row['s_per_img']:.3f} s/img" + (
                    f"; trunk {rate['trunk_gflop_per_s']:.0f} GFLOP/s, matrix product "
                    f"{rate['matmul_gflop_per_s']:.0f} GFLOP/s"
                    if rate
                    else ""
                )
            else:
                detail = (f"{row['s_per_img']:.3f} s/img; box diff {row['max_box_diff']:.0e}; "
                          f"top labels {row['top_label_agreement']:.0%}")  # fmt: skip
            label = f"inference {row['precision']} vs transformers{labels[row['code']]}{setting}"
            rows.append([label, f"{row['speedup']:.2f}x", target, detail])
    now, before = step_work["result"], step_work["baseline"]
    rows.append(["host syncs per training step (R50, CPU count)", f"{now['syncs']:g}", "<= 3",
                 f"baseline {before['syncs']:g}; "
                 + ", ".join(f"{k} {v:g}" for k, v in now["sync_kinds"].items() if v)])  # fmt: skip
    rows.append(["operators per training step (R50, CPU count)",
                 f"{now['operators'] / before['operators']:.2f}x", "<= 0.50x",
                 f"{now['operators']:.0f} vs {before['operators']:.0f}"])  # fmt: skip
    for result in buckets["results"]:
        if result["pad_to"] in (None, 128) and result["grouped"]:
            epoch = result["epochs"][0]
            label = f"batch shapes per epoch, pad_to {result['pad_to']}"
            rows.append([label, f"{epoch['shapes']}", "few", f"padding {epoch['padding']:.1%}"])
    for row in convergence["summary"]:
        if row["setting"] == "baseline":
            continue
        reached = row["epochs_to_baseline_final"]
        epochs = len(next(r for r in convergence["runs"] if r["set"] == row["set"])["map"])
        rows.append([f"convergence, {row['set']}: {row['setting']}",
                     f"{reached:g} epochs" if reached is not None else "not reached",
                     f"<= {epochs / 2:g} epochs",
                     f"to the baseline's final map after {epochs}; final map "
                     f"{row['final_map']['median']:.4f}, {row['time_ratio']:.2f}x time per "
                     "epoch"])  # fmt: skip
    if not native_bf16():
        rows.append(["inference bf16 vs transformers", "not measured", ">= 3x",
                     "this CPU has no bf16 arithmetic (no AMX / AVX512-BF16): autocast emulates "
                     "it, many times slower than fp32"])  # fmt: skip
    env = environment()
    table = print_table(
        f"Summary ({env['cpu']}, {env['cores']} cores, torch {env['torch']})",
        ["benchmark", "measured", "target", "detail"],
        rows,
    )
    write_json(args.out / "summary.json", {"environment": env, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
