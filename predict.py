"""`python predict.py ...` runs `detr-predict ...`, with the same overrides (conf/predict.yaml)."""

from detr_lightning.cli.predict import main

if __name__ == "__main__":
    main()
