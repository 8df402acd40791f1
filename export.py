"""Export DETR for deployment: `python export.py ckpt_path=... [format=torchscript]` (see
conf/export.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from detr_lightning.deploy import export_cli
    from detr_lightning.errors import SetupError

    try:
        export_cli(cfg)
    except SetupError as err:
        # SystemExit passes through Hydra's error handler: the message alone, no traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
