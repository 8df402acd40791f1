"""Scaling out through Hydra: the submitit launchers (local processes, SLURM jobs wired for
Lightning), and the value that a search optimizes (detr-tune: test_tune.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detr_lightning.cli.sweeps import check_optimized_metric, objective
from detr_lightning.cli.train import train
from detr_lightning.utils.errors import SetupError
from helpers import ROOT
from helpers.pipeline import CONF_DIR, compose_config, tiny_overrides


def _with_hydra(overrides: list[str]):
    """The composed config with its ``hydra`` node, as a launcher or sweeper sees it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


def _multirun_overrides(*extra: str, searched: tuple[str, ...] = ()) -> list[str]:
    """Tiny CPU training overrides for train.py -m: each job keeps Hydra's own run dir. The
    ``searched`` keys are left out, for the test to set them."""
    dropped = ("run_dir=", "trainer.max_epochs=", *(f"{key}=" for key in searched))
    overrides = [o for o in tiny_overrides(Path("unused")) if not o.startswith(dropped)]
    return [*overrides, "trainer.max_epochs=1", "cpu_threads=1", *extra]


def _run_train_py(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(ROOT / "train.py"), *arguments]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---- the value a sweeper optimizes -------------------------------------------------------


def test_objective_is_the_named_statistic_of_the_final_evaluation():
    metrics = {"map": 0.25, "map_50": 0.5, "mar_100": 0.75}
    cfg = compose_config("train", ["run_dir=x", "optimized_metric=val/map_50"])
    assert objective(cfg, metrics) == 0.5
    assert objective(compose_config("train", ["run_dir=x"]), metrics) is None  # not asked for
    cfg = compose_config("train", ["run_dir=x", "optimized_metric=test/map",
                                   "test_after_fit=true"])  # fmt: skip
    assert objective(cfg, metrics) == 0.25
    # more queries than 100: COCOeval's last maxDets and the recall's name follow them
    cfg = compose_config("train", ["run_dir=x", "model.num_queries=150",
                                   "optimized_metric=val/mar_150"])  # fmt: skip
    assert objective(cfg, {"mar_150": 0.125}) == 0.125


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimized_metric=val/AP"], r"optimized_metric=val/AP is not .* val/map, val/map_50"),
        (["optimized_metric=map"], r"optimized_metric=map is not .*choose one of: val/map"),
        (["optimized_metric=test/map"], r"test/\* metrics exist with test_after_fit=true"),
        (["optimized_metric=val/map", "test_after_fit=true"], r"logs test/\*.*test/map"),
    ],
)
def test_unknown_optimized_metric_is_refused_before_training(overrides, message, tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path, *overrides))
    with pytest.raises(SetupError, match=message):
        check_optimized_metric(cfg)
    with pytest.raises(SetupError, match=message):
        train(cfg)  # before any data or model work
    assert not (tmp_path / "config.yaml").exists()


def test_objective_without_an_evaluation_fails_the_trial():
    cfg = compose_config("train", ["run_dir=x", "optimized_metric=val/map"])
    with pytest.raises(ValueError, match=r"optimized_metric=val/map: .*without a val evaluation"):
        objective(cfg, {})


# ---- launchers ------------------------------------------------------------------------------


def test_slurm_launcher_asks_one_task_per_gpu(tmp_path, monkeypatch):
    """The sbatch script that hydra/launcher=slurm submits: trainer.devices tasks and GPUs per
    node, trainer.num_nodes nodes, submitit's requeue signal before the time limit."""
    fake_bin = tmp_path / "bin"  # submitit looks for srun before it writes anything
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    submitted = {}

    def capture(executor, function, *arguments):
        submitted.update(executor=executor, arguments=arguments)
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    cfg = _with_hydra(["hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=4",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", "run_dir=x"])  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["optimizer.lr=2e-4"]], initial_job_idx=0)

    executor = submitted["executor"]._executor
    script = executor._make_submission_file_text("python -m job", "uid")
    for line in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--time=4320", "--signal=USR2@300"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert executor.max_num_timeout == 30
    assert submitted["arguments"][0] == (["optimizer.lr=2e-4"],)
    assert str(tmp_path / "sweep" / ".submitit") in script


def test_local_launcher_shows_the_job_its_gpus():
    cfg = _with_hydra(["hydra/launcher=local", "trainer.devices=2", "run_dir=x"])
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["gpus_per_node"] == 2  # submitit hides every GPU not asked for
    assert launcher.params["tasks_per_node"] == 1  # one process per job


@pytest.mark.slow
def test_two_job_multirun_through_the_submitit_local_launcher(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _run_train_py(
        [
            "-m",
            "hydra/launcher=local",
            *_multirun_overrides("optimizer.lr=1e-4,3e-4"),
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0", "1", "multirun.yaml"
    ]  # fmt: skip
    assert (sweep_dir / ".submitit").is_dir()  # the jobs ran as submitit jobs
    learning_rates = []
    for job in ("0", "1"):
        run_dir = sweep_dir / job
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert len(metrics["history"]) == 1 and "map" in metrics
        learning_rates.append(OmegaConf.load(run_dir / "config.yaml").optimizer.lr)
    assert learning_rates == [1e-4, 3e-4]


@pytest.mark.slow
def test_submitit_requeue_stops_at_a_step_and_resumes_there(tmp_path):
    """Submitit's time-out / preemption signal (USR2) to a job of hydra/launcher=local: the run
    stops after the step it was in, saves hpc_ckpt_1.ckpt, and then submitit requeues the job,
    which resumes there and ends as the uninterrupted run does. (Submitit's own handler ends
    the job in the middle of the step; the requeued job then repeats every step since the last
    checkpoint, here all of them.)"""
    sweep_dir, marker = tmp_path / "sweep", tmp_path / "signalled"
    extra = ("data.synthetic.num_train=16", "resume=auto",  # 4 steps
             "+callbacks.signal._target_=helpers.pipeline.SignalOnce",
             "+callbacks.signal.step=2", f"+callbacks.signal.marker={marker}",
             "+callbacks.signal.name=USR2")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}  # fmt: skip
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local",
               *_multirun_overrides(*extra, searched=("data.synthetic.num_train",)),
               f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = sweep_dir / "0"
    assert marker.is_file()  # the signal was sent
    log = (run_dir / "train.log").read_text()
    assert "USR2: stopped at global step 2 and saved" in log, log[-3000:]
    assert "USR2: handing the job to submitit to requeue it" in log
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    assert torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 2
    assert f"resuming {run_dir / 'hpc_ckpt_1.ckpt'} (epoch 0, global step 2)" in log
    # the requeued job trained the 2 steps left, and the epoch is the uninterrupted one's
    straight = tmp_path / "straight"
    overrides = [
        o for o in _multirun_overrides(extra[0]) if not o.startswith("data.synthetic.num_train=")
    ]
    train(compose_config("train", [*overrides, extra[0], f"run_dir={straight}"]))
    history = [json.loads((d / "metrics.json").read_text())["history"] for d in (run_dir, straight)]
    assert [(h["epoch"], h["train_loss"], h["map"]) for h in history[0]] == [
        (h["epoch"], h["train_loss"], h["map"]) for h in history[1]
    ]
