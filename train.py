"""Train DETR: `python train.py [experiment=...] [key=value ...]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from detr_lightning.errors import exit_on_setup_error
    from detr_lightning.train import train

    exit_on_setup_error(train, cfg)


if __name__ == "__main__":
    main()
