"""`python eval.py ...` runs `detr-eval ...`, with the same overrides (conf/eval.yaml)."""

from detr_lightning.cli.eval import main

if __name__ == "__main__":
    main()
