"""Detect objects: `python predict.py pretrained=... input=photos/` (see conf/predict.yaml)."""

import hydra
from omegaconf import DictConfig

import detr_lightning.hydra_dirs  # noqa: F401  (hydra.run.dir follows run_dir=)


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from detr_lightning.errors import exit_on_setup_error
    from detr_lightning.predict import predict_cli

    exit_on_setup_error(predict_cli, cfg)


if __name__ == "__main__":
    main()
