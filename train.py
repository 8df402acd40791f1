"""Train DETR: `python train.py [experiment=...] [key=value ...]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

import detr_lightning.hydra_dirs  # noqa: F401  (hydra.run.dir follows run_dir=)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns ``optimized_metric``'s value (or None) for sweepers such as Optuna."""
    from detr_lightning.errors import exit_on_setup_error
    from detr_lightning.sweeps import objective
    from detr_lightning.train import train

    return objective(cfg, exit_on_setup_error(train, cfg))


if __name__ == "__main__":
    main()
