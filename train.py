"""`python train.py ...` runs `detr-train ...`, with the same overrides (conf/train.yaml)."""

from detr_lightning.cli.train import main

if __name__ == "__main__":
    main()
