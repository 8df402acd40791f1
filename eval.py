"""Evaluate DETR: `python eval.py ckpt_path=... [data=coco data.root=...]` (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

import detr_lightning.hydra_dirs  # noqa: F401  (hydra.run.dir follows run_dir=)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from detr_lightning.errors import exit_on_setup_error
    from detr_lightning.eval import evaluate

    exit_on_setup_error(evaluate, cfg)


if __name__ == "__main__":
    main()
