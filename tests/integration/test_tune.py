"""detr-tune: an Optuna study over tiny training runs, with a search space of an
hparams_search config, pruning after a validation and a study shared by two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from detr_lightning.cli.search_space import override_line, parse_param, search_space, suggest
from detr_lightning.cli.tune import tune
from detr_lightning.utils.errors import SetupError
from helpers import ROOT
from helpers.pipeline import tiny_overrides

BIN = Path(sys.executable).parent
SEARCHED = ("backbone.lr", "model.num_queries", "run_dir", "trainer.max_epochs")


def _train_overrides(*extra: str) -> list[str]:
    """Tiny CPU training, 2 epochs, with the keys of the search left to it (a plain value
    would fix them); the tiny model searches 4 or 8 queries."""
    kept = [o for o in tiny_overrides(Path("unused")) if not o.startswith(SEARCHED)]
    return [*kept, "trainer.max_epochs=2", "cpu_threads=1", "model.num_queries=choice(4,8)",
            *extra]  # fmt: skip


def _study(sweep_dir: Path, name: str = "detr") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


# ---- the search space -------------------------------------------------------------------


def test_hydra_sweeps_become_optuna_distributions():
    space, fixed = search_space(
        {"optimizer.lr": "tag(log, interval(3e-5, 3e-4))", "loss.eos_coef": "interval(0.05, 0.3)",
         "model.num_queries": "choice(50, 100, 150)", "model.enc_layers": "range(2, 7, 2)",
         "backbone.lr": "tag(log, interval(1e-6, 1e-5))"},
        ["backbone.lr=2e-5", "schedule=step,cosine", "data.batch_size=4"],
    )  # fmt: skip
    assert fixed == ["backbone.lr=2e-5", "data.batch_size=4"]  # a plain value: not searched
    trial = optuna.create_study().ask()
    values = {name: suggest(trial, param) for name, param in space.items()}
    dists = trial.distributions
    assert dists["optimizer.lr"] == optuna.distributions.FloatDistribution(3e-5, 3e-4, log=True)
    assert dists["loss.eos_coef"] == optuna.distributions.FloatDistribution(0.05, 0.3)
    assert dists["model.num_queries"] == optuna.distributions.CategoricalDistribution(
        [50, 100, 150]
    )
    # Python's range: 2, 4, 6 (the stop 7 excluded)
    assert dists["model.enc_layers"] == optuna.distributions.IntDistribution(2, 6, step=2)
    assert dists["schedule"] == optuna.distributions.CategoricalDistribution(["step", "cosine"])
    assert set(values) == {"optimizer.lr", "loss.eos_coef", "model.num_queries",
                           "model.enc_layers", "schedule"}  # fmt: skip
    assert parse_param("a", "tag(log, range(1, 9))").log and parse_param("a", "0.5") is None


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("tag(log, interval(0, 1))", "lower bound above 0"),
        ("tag(log, range(1, 9, 2))", "needs step 1"),
        ("tag(lin, interval(0, 1))", "unknown tag"),
        ("choice([1,2],[3])", "among scalars"),
        ("glob(*)", "search with interval"),
    ],
)
def test_sweeps_optuna_cannot_search_are_refused_naming_the_key(expression, message):
    with pytest.raises(SetupError, match=rf"optimizer\.lr.*{message}"):
        parse_param("optimizer.lr", expression)


@pytest.mark.parametrize("value", [1e-05, 3, True, None, "cosine", "a b,c", "1e-4", "it's"])
def test_override_lines_parse_back_to_the_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([override_line("+k", value)])
    assert override.value() == value and override.is_add()


def test_a_study_that_would_fail_every_trial_is_refused_before_it_starts(tmp_path):
    tune_dir = [f"tune.sweep_dir={tmp_path}"]
    with pytest.raises(SetupError, match=r"the searched key model\.num_querys is not"):
        tune("detr_optuna", _train_overrides("model.num_querys=choice(1,2)"), tune_dir)
    with pytest.raises(SetupError, match=r"trainer\.devices=2.*one detr-tune per GPU"):
        tune("detr_optuna", _train_overrides("trainer.devices=2"), tune_dir)
    with pytest.raises(SetupError, match=r"tune\.pruner=medain: median, hyperband, none"):
        tune("detr_optuna", _train_overrides(), [*tune_dir, "tune.pruner=medain"])
    assert not (tmp_path / "0").exists()


def test_detr_train_points_to_detr_tune(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for mode in (["-m"], []):
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *mode, "hparams_search=detr_optuna",
             "data=synthetic", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert "hparams_search=detr_optuna is a search space for detr-tune" in result.stderr
        assert not any((tmp_path / "sweep").glob("0/*.ckpt"))  # nothing trained


# ---- studies ------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_trial_study_prunes_a_trial_and_keeps_its_run(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    pruner = "tune.pruner={_target_:helpers.tuning.PruneTrials,numbers:[1]}"
    best = tune("detr_optuna", _train_overrides(),
                [f"tune.sweep_dir={sweep_dir}", "tune.n_trials=3", pruner])  # fmt: skip
    trials = _study(sweep_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    for trial in trials:
        run_dir = sweep_dir / str(trial.number)
        record = json.loads((run_dir / "trial.json").read_text())
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        assert record["state"] == trial.state.name and record["params"] == trial.params
        # one report per validation, the value the run logged
        assert list(trial.intermediate_values) == list(range(len(history)))
        assert [trial.intermediate_values[i] for i in range(len(history))] == pytest.approx(
            [epoch["map"] for epoch in history]
        )
        assert "Seed set to" in (run_dir / "train.log").read_text()  # its log, in its run dir
        assert trial.params["model.num_queries"] in (4, 8)
        assert 3e-5 <= trial.params["optimizer.lr"] <= 3e-4
        assert 3e-6 <= trial.params["backbone.lr"] <= 3e-5
    assert len(json.loads((sweep_dir / "1" / "metrics.json").read_text())["history"]) == 1
    assert json.loads((sweep_dir / "1" / "trial.json").read_text())["pruned_at_validation"] == 0
    assert len(json.loads((sweep_dir / "2" / "metrics.json").read_text())["history"]) == 2
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    winner = max(complete, key=lambda t: t.value)
    assert best == json.loads((sweep_dir / "best_trial.json").read_text())
    assert best["number"] == winner.number and best["value"] == winner.value
    assert best["params"] == winner.params and best["run_dir"] == str(
        sweep_dir / str(winner.number)
    )
    assert best["trials"] == {"COMPLETE": 2, "PRUNED": 1}
    assert f"optimizer.lr={winner.params['optimizer.lr']!r}" in best["overrides"]
    # the value is the last validation's val/map
    final = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())["map"]
    assert best["value"] == pytest.approx(final)


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    command = [str(BIN / "detr-tune"), "hparams_search=detr_optuna",
               *_train_overrides("trainer.max_epochs=1"), f"tune.sweep_dir={sweep_dir}",
               "tune.n_trials=2", "tune.study_name=shared",
               "tune.pruner={_target_:helpers.tuning.PruneTrials,numbers:[0]}"]  # fmt: skip
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for _ in range(2)]  # fmt: skip
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    trials = _study(sweep_dir, "shared").get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # one study, no number twice
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[0].state.name == "PRUNED"
    for trial in trials:
        assert (sweep_dir / str(trial.number) / "trial.json").is_file()
    # each process ends with the study's best trial, whichever process ran it
    best = json.loads((sweep_dir / "best_trial.json").read_text())
    assert best["trials"]["COMPLETE"] == 3 and any('"number"' in o for o in outputs)
