"""The command line: Hydra entry points (``detr-train``, ``detr-eval``, ``detr-predict``,
``detr-export``, ``detr-validate``), the resume policy and the launch checks. Nothing in the
library imports this package."""
