"""Where runs that are not real training runs leave their folders: a run stopped by a setup
error leaves none, a debug run goes under outputs/debug/."""

from __future__ import annotations

import subprocess

import pytest

from helpers.runs import ENV, train_command


@pytest.mark.slow
def test_a_setup_error_leaves_no_run_folder(tmp_path):
    missing = tmp_path / "missing.pth"
    result = subprocess.run(train_command(f"pretrained={missing}"), cwd=tmp_path, env=ENV,
                            text=True, capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"\nerror: pretrained={missing}: checkpoint not found" in result.stderr
    assert not (tmp_path / "outputs").exists()  # nor outputs/train/<time>/

    # a folder that holds more than Hydra's files (here: something of the user's) is kept
    (tmp_path / "outputs" / "train" / "kept").mkdir(parents=True)
    named = tmp_path / "named"
    result = subprocess.run(train_command(f"pretrained={missing}", f"run_dir={named}"),
                            cwd=tmp_path, env=ENV, text=True, capture_output=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 1
    assert named.is_dir() and (tmp_path / "outputs" / "train" / "kept").is_dir()


@pytest.mark.parametrize("debug", ["fast", "overfit"])
def test_debug_runs_go_to_outputs_debug(debug):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from helpers.pipeline import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"debug={debug}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        assert str(cfg.hydra.run.dir).startswith("outputs/debug/")
        plain = compose("train", [], return_hydra_config=True)
        HydraConfig.instance().set_config(plain)
        assert str(plain.hydra.run.dir).startswith("outputs/train/")
