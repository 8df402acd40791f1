"""`python export.py ...` runs `detr-export ...`, with the same overrides (conf/export.yaml)."""

from detr_lightning.cli.export import main

if __name__ == "__main__":
    main()
