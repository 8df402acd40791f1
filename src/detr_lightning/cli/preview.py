"""``detr-preview data.root=/data/mydataset`` (or ``python -m detr_lightning.cli.preview``):
a PNG grid of the first training samples, augmented as training augments them.

The arguments are train.py's Hydra overrides: ``conf/preview.yaml`` composes
``conf/train.yaml``, so ``data.*`` (paths, ``data.scales``, ``data.crop`` ...), ``data=synthetic``,
``experiment=...``, ``seed`` and ``trainer.devices`` mean what they mean for training, and the
grid shows the samples that run trains first, in its order and with its augmentations
(:mod:`detr_lightning.tools.preview` says exactly what is the same). Options of its own:
``output``, ``num_samples``, ``columns``, ``tile_size``, ``show_original``, ``epoch``,
``world_size``, ``rank`` (``conf/preview.yaml``).

Exit status: 0 written, 2 when it cannot run (no dataset, missing files, a bad override).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..data.paths import check_data_source
from ..tools.preview import PreviewSample, per_device_batch_size, write_preview
from ..utils.errors import SetupError
from .build import instantiate_data
from .config import compose_config

__all__ = ["main", "preview", "world_size"]


def world_size(cfg: DictConfig) -> int:
    """The data-parallel processes of the run ``cfg`` describes: ``world_size``, else
    ``trainer.devices`` x ``trainer.num_nodes`` (SetupError when the devices are not a count)."""
    if cfg.get("world_size") is not None:
        return int(cfg.world_size)
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    if isinstance(devices, (list, ListConfig)):
        return len(devices) * nodes
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices) * nodes
    raise SetupError(
        f"trainer.devices={devices}: the training order depends on the number of processes; "
        "set world_size=N (devices x nodes of the run)"
    )


def preview(cfg: DictConfig) -> tuple[Path, list[PreviewSample]]:
    """Write the preview that ``cfg`` (a preview.yaml composition) describes; returns the PNG
    and its samples. Setup problems (no dataset, missing files, a batch size that does not
    divide) raise SetupError."""
    data = cfg.data
    check_data_source(data.get("root"), data.get("synthetic"))
    for key in ("num_samples", "columns", "tile_size"):
        if int(cfg[key]) < 1:
            raise SetupError(f"{key}={cfg[key]}: give a number of at least 1")
    accumulate = int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1)
    processes = world_size(cfg)
    if not 0 <= int(cfg.rank) < processes:
        raise SetupError(
            f"rank={cfg.rank}: choose a rank in 0..{processes - 1} (world_size {processes})"
        )
    try:
        batch_size = per_device_batch_size(int(data.batch_size), processes, accumulate)
        datamodule = instantiate_data(data)
        datamodule.setup("fit")  # the training split, built and checked as training does
    except (FileNotFoundError, ValueError) as err:
        raise SetupError(str(err)) from None
    return write_preview(
        datamodule.train_dataset,
        datamodule.label_map.names,
        cfg.output,
        num_samples=int(cfg.num_samples),
        columns=int(cfg.columns),
        tile_size=int(cfg.tile_size),
        show_original=bool(cfg.show_original),
        seed=datamodule.seed,
        epoch=int(cfg.epoch),
        world_size=processes,
        rank=int(cfg.rank),
        batch_size=batch_size,
        group_by_aspect_ratio=datamodule.group_by_aspect_ratio,
    )


# ----------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the grid; return the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="detr-preview",
        description="Draw the first training samples as training augments them, with their "
        "boxes, in one PNG grid.",
        epilog="Exit status: 0 written, 2 could not run. Example: detr-preview "
        "data.root=/data/parts experiment=finetune_custom num_samples=8 show_original=true",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="detr-train's overrides (data.root=..., data.scales=..., seed=...) and "
        "output=preview.png num_samples=16 columns=4 tile_size=384 show_original=false ...",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = compose_config("preview", args.overrides)
        path, samples = preview(cfg)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {len(samples)} training samples of epoch {cfg.epoch}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
