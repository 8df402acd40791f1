"""Detect objects: `python predict.py pretrained=... input=photos/` (see conf/predict.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from detr_lightning.errors import SetupError
    from detr_lightning.predict import predict_cli

    try:
        predict_cli(cfg)
    except SetupError as err:
        # SystemExit passes through Hydra's error handler: the message alone, no traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
