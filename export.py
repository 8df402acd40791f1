"""Export DETR for deployment: `python export.py ckpt_path=... [format=torchscript]` (see
conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

import detr_lightning.hydra_dirs  # noqa: F401  (hydra.run.dir follows run_dir=)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from detr_lightning.deploy import export_cli
    from detr_lightning.errors import exit_on_setup_error

    exit_on_setup_error(export_cli, cfg)


if __name__ == "__main__":
    main()
