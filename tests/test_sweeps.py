"""Scaling out through Hydra: the submitit launchers (local processes, SLURM jobs wired for
Lightning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline_fixtures import CONF_DIR, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _with_hydra(overrides: list[str]):
    """The composed config with its ``hydra`` node, as a launcher or sweeper sees it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


def _multirun_overrides(*extra: str) -> list[str]:
    """Tiny CPU training overrides for train.py -m: each job keeps Hydra's own run dir."""
    dropped = ("run_dir=", "trainer.max_epochs=")
    overrides = [o for o in tiny_overrides(Path("unused")) if not o.startswith(dropped)]
    return [*overrides, "trainer.max_epochs=1", "cpu_threads=1", *extra]


def _run_train_py(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(ROOT / "train.py"), *arguments]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


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
                 "--time=4320", "--signal=USR2@120"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert executor.max_num_timeout == 30
    assert submitted["arguments"][0] == (["optimizer.lr=2e-4"],)
    assert str(tmp_path / "sweep" / ".submitit") in script


def test_local_launcher_shows_the_job_its_gpus():
    cfg = _with_hydra(["hydra/launcher=local", "trainer.devices=2", "run_dir=x"])
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["gpus_per_node"] == 2  # submitit hides every GPU not asked for
    assert launcher.params["tasks_per_node"] == 1  # Lightning starts the DDP processes


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
