"""``train(cfg)``: build data, model and trainer from a Hydra config and fit.

The thin ``train.py`` at the repository root wraps this with ``@hydra.main``; tests call it
with configs from Hydra's compose API.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .callbacks import MetricsHistory, NonFiniteStop, SignalStop, launcher_requeue_handler
from .checkpointing import (
    HPC_CHECKPOINT_GLOB,
    AtomicCheckpointIO,
    LoadedCheckpoint,
    last_checkpoint_path,
    load_resume_checkpoint,
)
from .console import quiet_third_party
from .data.datamodule import check_data_source
from .errors import SetupError, reported_as_setup_error
from .evaluation import report, resolve_backend, result_from_metrics
from .hydra_dirs import run_dir_given, without_resolver
from .loggers import ResumableLogs
from .models.backbone_weights import ensure_imagenet_weights
from .module import DETRModule, padded_label_map
from .pretrained import (
    CheckpointError,
    load_state_into,
    needs_config_file,
    read_checkpoint,
    read_loaded_checkpoint,
)
from .sweeps import check_optimized_metric

log = logging.getLogger(__name__)

# backbone.* config keys -> the build_detr argument each one sets (backbone.lr is the
# DETRModule's backbone_lr).
BACKBONE_ARGUMENTS = {
    "name": "backbone",
    "dilation": "dilation",
    "pretrained": "pretrained_backbone",
    "weights": "backbone_weights",
    "norm": "norm",
    "trainable_layers": "trainable_layers",
    "num_stages": "num_stages",
}


def instantiate_data(node: DictConfig) -> Any:
    """Instantiate the data module; its own errors (missing files, bad annotations) surface as
    they are instead of wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        if err.__cause__ is not None and not isinstance(err.__cause__, TypeError):
            raise err.__cause__ from None
        raise


def model_settings(cfg: DictConfig, num_classes: int | None) -> dict[str, Any]:
    """``build_detr`` keyword arguments from the ``model`` and ``backbone`` config groups."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["num_classes"] is None:
        if num_classes is None:
            raise ValueError("model.num_classes is null and no dataset tells the class count")
        model["num_classes"] = num_classes
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    model.update({BACKBONE_ARGUMENTS[k]: v for k, v in backbone.items() if k != "lr"})
    return model


def ensure_backbone_weights(cfg: DictConfig) -> None:
    """Fetch (or find in the cache) the ImageNet weights the config asks for, before any data
    work, so an offline node fails at once with one message (SetupError)."""
    backbone = cfg.backbone
    if backbone.weights and not cfg.get("pretrained"):
        if not Path(str(backbone.weights)).expanduser().is_file():
            raise SetupError(
                f"backbone.weights={backbone.weights}: no such file; give a torchvision ResNet "
                "state-dict file, or backbone.weights=null to use backbone.pretrained"
            )
    elif backbone.pretrained and not cfg.get("pretrained"):
        ensure_imagenet_weights(backbone.name)


def build_module(cfg: DictConfig, datamodule: Any) -> DETRModule:
    """The DETRModule of a training config, initialized from ``cfg.pretrained`` if set.

    The label map and the evaluation settings come from ``datamodule``. With ``pretrained``,
    the class head is re-initialized when the checkpoint's labels differ from the data's (count,
    category ids or names).
    """
    model = model_settings(cfg, datamodule.num_classes)
    # before any model is built: the error names the annotation file
    label_map = padded_label_map(
        datamodule.label_map, model["num_classes"], datamodule.val_annotation_file
    )
    info = None
    if cfg.get("pretrained"):  # read and checked before the model is built
        with reported_as_setup_error(
            f"pretrained={cfg.pretrained}", CheckpointError, FileNotFoundError
        ):
            info = read_checkpoint(cfg.pretrained)
        check_architecture(info, model)
    if cfg.get("pretrained") and model["pretrained_backbone"]:
        log.info("pretrained=%s given: not loading ImageNet backbone weights", cfg.pretrained)
        model["pretrained_backbone"] = False
        model["backbone_weights"] = None
    module = DETRModule(
        model=model,
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        backbone_lr=float(cfg.backbone.lr),
        schedule=cfg.schedule,
        postprocess=cfg.postprocess,
        label_map=label_map.to_dict(),
        data=datamodule.evaluation_settings(),
        eval_backend=cfg.eval_backend,
    )
    if info is not None:
        reinit = _class_head_differs(info, module)
        with reported_as_setup_error(f"pretrained={cfg.pretrained}", CheckpointError):
            load_state_into(
                module.model, info["state_dict"], info["path"], reinit_class_head=reinit
            )
        log.info("initialized from %s (%s format)", cfg.pretrained, info["format"])
    return module


# build_detr arguments that a checkpoint's weights fix, and the override that sets each
ARCHITECTURE_OVERRIDES = {
    "backbone": "backbone",  # a config of the backbone group, e.g. backbone=resnet101
    "num_stages": "backbone.num_stages",
    "hidden_dim": "model.hidden_dim",
    "num_queries": "model.num_queries",
    "enc_layers": "model.enc_layers",
    "dec_layers": "model.dec_layers",
    "dim_feedforward": "model.dim_feedforward",
    "pre_norm": "model.pre_norm",
    "position_embedding": "model.position_embedding",
}
PAPER_MODELS = {"resnet50": "detr_r50", "resnet101": "detr_r101"}
# the official release's file names, e.g. detr-r101-dc5-a2e86def.pth
OFFICIAL_FILE_NAME = re.compile(r"detr-r(50|101)(-dc5)?(-panoptic)?-[0-9a-f]{8}\.pth")


def check_architecture(info: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse (SetupError) a ``pretrained`` checkpoint whose weights belong to another
    architecture than the config's, naming each override that fixes it; warn when an official
    file's name says DC5 and the config does not, or the other way round (the weights fit
    both)."""
    theirs = info["model"]
    defaults = {"num_stages": 4}  # read off the weights only when it is 3
    lines = []
    for key, override in ARCHITECTURE_OVERRIDES.items():
        value = theirs.get(key, defaults.get(key))
        if value is None or model.get(key) == value:
            continue
        fix = f"{override}={str(value).lower() if isinstance(value, bool) else value}"
        if key == "backbone" and value in PAPER_MODELS:
            fix += f" (model={PAPER_MODELS[value]} for the paper's {value} model)"
        lines.append(f"  {key}: checkpoint {value}, config {model.get(key)}: set {fix}")
    if lines:
        raise SetupError(
            f"pretrained={info['path']} holds the weights of another architecture than the "
            "config builds:\n" + "\n".join(lines) + "\nOnly the class head may differ (it is "
            "re-initialized when the dataset's classes differ from the checkpoint's)."
        )
    name = Path(info["path"]).name
    official = OFFICIAL_FILE_NAME.fullmatch(name)
    if official and bool(official.group(2)) != bool(model.get("dilation")):
        log.warning(
            "%s is the official %s checkpoint, but the config %s the last stage (dilation=%s): "
            "the weights fit either way, but they were trained %s. For the model they come "
            "from, use model=detr_r%s%s",
            info["path"],
            "DC5" if official.group(2) else "non-DC5",
            "dilates" if model.get("dilation") else "does not dilate",
            str(bool(model.get("dilation"))).lower(),
            "with it" if official.group(2) else "without it",
            official.group(1),
            "_dc5" if official.group(2) else "",
        )


def _class_head_differs(info: dict[str, Any], module: DETRModule) -> bool:
    """Whether the checkpoint's class head predicts other labels than the module's."""
    theirs = info["model"]["num_classes"]
    if theirs != module.model.num_classes:
        log.info(
            "%s has %d classes, the model %d: re-initializing the class head",
            info["path"],
            theirs,
            module.model.num_classes,
        )
        return True
    if info["label_map"] is None:
        log.warning(
            "%s stores no label map: assuming its %d labels mean the dataset's (%s); "
            "pass a checkpoint with a label map, or a model.num_classes that differs, to "
            "re-initialize the class head instead",
            info["path"],
            theirs,
            ", ".join(module.class_names[:5]),
        )
        return False
    if padded_label_map(info["label_map"], theirs).to_dict() != module.label_map:
        log.info(
            "%s was trained on other labels (category ids or names differ from the dataset's): "
            "re-initializing the class head",
            info["path"],
        )
        return True
    return False


def check_resume(
    module: DETRModule, ckpt_path: str, checkpoint: dict[str, Any] | None = None
) -> None:
    """Refuse to resume a checkpoint whose model or labels differ from the config's.

    ``checkpoint``: the file's contents if they were already loaded (not read again)."""
    if checkpoint is None:
        info = read_checkpoint(ckpt_path)
    else:
        info = read_loaded_checkpoint(checkpoint, ckpt_path)
    if info["format"] != "lightning":
        raise ValueError(
            f"ckpt_path={ckpt_path} is a {info['format']} checkpoint; ckpt_path resumes a "
            "training run from its Lightning .ckpt. To start from these weights use "
            f"pretrained={ckpt_path}"
        )
    # how the weights were first loaded, and how batches run (neither changes a weight)
    ignored = {"pretrained_backbone", "backbone_weights", "batch_invariant"}
    saved, ours = info["model"], module.hparams["model"]
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, config {ours.get(key)!r}"
        for key in sorted((set(saved) | set(ours)) - ignored)
        if saved.get(key) != ours.get(key)
    ]
    if info["label_map"] != module.label_map:
        differences.append("label map (the dataset's categories)")
    if differences:
        raise ValueError(
            f"cannot resume {ckpt_path}: its model differs from the config's in "
            + "; ".join(differences)
            + ". Resume with the run's own model.*/backbone.*/data.* overrides (see its "
            "config.yaml), or start a new run from its weights with pretrained=..."
        )


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint that this run resumes, or None to start a new run.

    ``ckpt_path=<file>`` resumes that file; ``ckpt_path=last`` the run dir's
    ``checkpoints/last.ckpt``; ``resume=auto`` the newest checkpoint of the run dir that loads
    (:func:`~detr_lightning.checkpointing.load_resume_checkpoint`), or nothing (a new run, with a
    log line) when there is none yet, so that one command serves the first start and every
    restart. A requeued job (SLURM, or a submitit launcher's job) resumes as with
    ``resume=auto`` when the run dir holds an ``hpc_ckpt_<n>.ckpt`` (saved before the job
    requeued itself; under SLURM Lightning would load it anyway; here it is checked first). A job
    that SLURM requeued (``SLURM_RESTART_COUNT`` > 0) resumes the run dir's newest checkpoint
    also when its command gives ``ckpt_path``, if that checkpoint is newer than the file.
    """
    return _resume(cfg)[0]


def _resume(cfg: DictConfig) -> tuple[str | None, LoadedCheckpoint | None]:
    """:func:`resume_checkpoint`, and the checkpoint's contents where finding it loaded them
    (``resume=auto``, SLURM requeue), else None."""
    ckpt_path, resume = cfg.get("ckpt_path"), cfg.get("resume")
    run_dir = Path(cfg.run_dir)
    if resume not in (None, "auto"):
        raise SetupError(f"resume={resume!r}: the only value is auto (null: do not resume)")
    if ckpt_path and resume:
        raise SetupError(
            f"ckpt_path={ckpt_path} and resume=auto both say what to resume; pass one of them"
        )
    if ckpt_path and _slurm_restarts() > 0:
        found = _newer_run_checkpoint(run_dir, ckpt_path)
        if found is not None:
            return str(found.path), found
    if ckpt_path == "last":
        path = last_checkpoint_path(run_dir)
        if not path.is_file():
            raise SetupError(
                f"ckpt_path=last: {path} does not exist. ckpt_path=last resumes the run in "
                "run_dir: pass the interrupted run's directory as run_dir=... (or "
                "hydra.run.dir=...), or give the checkpoint file as ckpt_path=PATH"
            )
        return str(path), None
    if ckpt_path:
        path = os.path.expanduser(str(ckpt_path))
        if not os.path.isfile(path):
            raise SetupError(
                f"ckpt_path={ckpt_path}: no such file. Give a Lightning checkpoint of the run "
                "(<run_dir>/checkpoints/last.ckpt), ckpt_path=last for the one of run_dir, or "
                "resume=auto to resume the newest checkpoint of run_dir"
            )
        return path, None
    job = SLURMEnvironment.detect() or launcher_requeue_handler() is not None
    requeued = job and any(run_dir.glob(HPC_CHECKPOINT_GLOB))
    if resume is None and not requeued:
        return None, None
    if resume == "auto":
        _check_fixed_run_dir(cfg)
    found = load_resume_checkpoint(run_dir)
    if found is None:
        log.info("resume=auto: no checkpoint in %s yet, starting a new run there", run_dir)
        return None, None
    state = found.state
    log.info(
        "resuming %s (epoch %d, global step %d)", found.path, state["epoch"], state["global_step"]
    )
    return str(found.path), found


def _slurm_restarts() -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``; 0 if never)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(count) if count.isdigit() else 0


def _newer_run_checkpoint(run_dir: Path, ckpt_path: str) -> LoadedCheckpoint | None:
    """For a requeued job that runs its first command again: the run dir's newest checkpoint
    that loads, where it is newer than ``ckpt_path`` (the file that command resumed; resumed
    again at every requeue, the run would go back to it every time), else None."""
    given = last_checkpoint_path(run_dir) if ckpt_path == "last" else Path(str(ckpt_path))
    try:
        found = load_resume_checkpoint(run_dir, newer_than=given.expanduser())
    except SetupError as error:
        log.warning("requeued job: %s; resuming ckpt_path=%s as given", error, ckpt_path)
        return None
    if found is not None:
        log.warning(
            "requeued job (SLURM_RESTART_COUNT=%d): resuming %s (epoch %d, global step %d), "
            "saved after ckpt_path=%s, which the job's command names",
            _slurm_restarts(), found.path, found.state["epoch"], found.state["global_step"],
            ckpt_path,
        )  # fmt: skip
    return found


def _load_if_torch_file(path: str) -> LoadedCheckpoint | None:
    """The contents of ``path`` if :func:`check_resume` would read it as one torch file and it
    loads, else None: other formats and broken files are then named by :func:`check_resume`."""
    if not Path(path).is_file() or needs_config_file(Path(path)):
        return None
    try:
        return LoadedCheckpoint.read(path)
    except CheckpointError:
        return None


def _loads_in_this_process(trainer: pl.Trainer) -> bool:
    """Whether ``trainer.fit`` restores its checkpoint in this process: not where it forks or
    spawns its ranks (``ddp_fork``, ``ddp_spawn``, ``ddp_notebook``), whose parent only waits
    and would hold the checkpoint for the whole run."""
    return not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _check_fixed_run_dir(cfg: DictConfig) -> None:
    """resume=auto looks in run_dir: refuse the default run dir, which is new at every start
    (outputs/train/<date>_<time>; under SLURM it is named after the job id and stays)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # called from Python: run_dir is what the caller gave
        return
    hydra = HydraConfig.get()
    if (
        run_dir_given(cfg)
        or Path(cfg.run_dir).resolve() != Path(hydra.runtime.output_dir).resolve()
    ):
        return  # run_dir=... given (Hydra's directory follows it: detr_lightning.hydra_dirs)
    node = "sweep" if hydra.mode == RunMode.MULTIRUN else "run"
    pattern = without_resolver(str(OmegaConf.to_container(hydra[node], resolve=False)["dir"]))
    if "${now:" in pattern and not ("SLURM_JOB_ID" in pattern and os.environ.get("SLURM_JOB_ID")):
        raise SetupError(
            f"resume=auto resumes the run in its run dir, but the run dir {cfg.run_dir} is new "
            f"at every start (hydra.{node}.dir={pattern}). Name the run's directory, the same "
            "on the first start and on every restart: run_dir=outputs/train/<name> or "
            "hydra.run.dir=outputs/train/<name>"
        )


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [
        instantiate(value) for value in node.values() if value is not None and "_target_" in value
    ]


def check_launched_processes(trainer: pl.Trainer) -> None:
    """Refuse a trainer whose devices x nodes is not the number of processes that torchrun or
    srun started, or that would start processes inside a job of the submitit local launcher.

    Lightning checks the count only where it starts the DDP processes itself. Otherwise, with
    one device, it runs one independent training per process (each with the whole batch, all
    writing into the same run dir), and with more devices per task each task starts its own.
    """
    devices, nodes = trainer.num_devices, trainer.num_nodes
    asked = (
        f"the trainer has {devices} device(s) x {nodes} node(s) (trainer.devices, "
        "trainer.num_nodes)"
    )
    if TorchElasticEnvironment.detect():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if devices == local and devices * nodes == world:
            return
        raise SetupError(
            f"torchrun started {world} processes ({local} per node), but {asked}: pass "
            f"trainer.devices={local} (torchrun's --nproc_per_node) and trainer.num_nodes="
            f"{world // max(local, 1)} (its --nnodes); each process is one device's rank"
        )
    # srun's tasks (unset in a batch script's own shell, one process)
    step = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    tasks = int(step) if step.isdigit() else None
    if SLURMEnvironment.detect():
        # Lightning takes the ranks from SLURM and starts no process itself: the srun tasks
        # are the ranks
        if devices * nodes != (tasks or 1):
            started = f"srun started {tasks} tasks" if tasks else "this process is not an srun task"
            raise SetupError(
                f"{started}, but {asked}: under SLURM every device is one srun task "
                "(#SBATCH --ntasks-per-node=<trainer.devices> --nodes=<trainer.num_nodes>, "
                "then srun python train.py ...); to have Lightning start the processes of one "
                "task itself, run it as a job named interactive (srun --job-name=interactive)"
            )
    elif tasks is not None and tasks > 1:
        # a job named bash or interactive: Lightning ignores SLURM, so every srun task would
        # be a separate run (and start its own processes for devices > 1)
        raise SetupError(
            f"srun started {tasks} tasks in the job {os.environ.get('SLURM_JOB_NAME')!r}, "
            "and Lightning does not take ranks from SLURM in a job of that name: run one "
            "srun task (Lightning then starts trainer.devices processes), or name the job "
            "otherwise (srun --job-name=detr) to run one task per device"
        )
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID") and devices * nodes > 1:
        raise SetupError(
            f"hydra/launcher=local runs each job as one process, in which Lightning cannot start "
            f"DDP processes ({asked}): use trainer.devices=1 with it, or run multi-device jobs "
            "one after the other with Hydra's basic launcher (python train.py -m ... without "
            "hydra/launcher)"
        )


def resolve_precision(trainer: DictConfig | dict, stage: str = "fit") -> Any:
    """``trainer.precision``, with ``auto`` resolved for the device the run will use.

    ``auto`` is ``bf16-mixed`` for training on CUDA GPUs with bf16 arithmetic (compute
    capability 8.0 and up: A100, H100, RTX 30xx and later), where it trained 1.10-1.35x
    faster than fp32 with 0.65x the peak memory at the paper config on an H200
    (``bench/train_step.py``); matching, the losses and the prediction heads run in float32
    under it. Validation during training and ``test_after_fit`` run in the
    training's precision. Everywhere else, and for evaluation by ``eval.py`` on any device (COCO
    figures comparable with fp32 results), ``auto`` is ``32-true``; so it is with fork-based
    strategies (``ddp_fork``, ``ddp_notebook``), where reading the GPU's capability first would
    start CUDA before the fork. Any other value is Lightning's, unchanged."""
    precision = trainer.get("precision")
    if str(precision) != "auto":
        return precision
    strategy = str(trainer.get("strategy"))
    if "fork" in strategy or "notebook" in strategy:
        # reading the GPU's capability would start CUDA before the workers fork, which breaks them
        log.info(
            "trainer.precision=auto is 32-true with strategy=%s: set trainer.precision=bf16-mixed "
            "for bf16",
            strategy,
        )
        return "32-true"
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if stage == "fit" and on_cuda and torch.cuda.get_device_capability() >= (8, 0):
        return "bf16-mixed"
    return "32-true"


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback] | None = None, stage: str = "fit"
) -> pl.Trainer:
    """The configured Trainer, with crash-safe checkpoint files that load with
    ``weights_only=True``, under SLURM Lightning's environment without its requeue handler, a
    device count that matches the processes torchrun or srun started, and
    ``trainer.precision=auto`` resolved for ``stage`` (:func:`resolve_precision`)."""
    loggers = _instantiate_dict(cfg.get("logger"))
    all_callbacks = _instantiate_dict(cfg.get("callbacks")) + list(callbacks or [])
    precision = resolve_precision(cfg.trainer, stage)
    if str(cfg.trainer.get("precision")) == "auto":
        log.info("trainer.precision=auto: %s", precision)
    trainer = instantiate(
        cfg.trainer,
        callbacks=all_callbacks,
        logger=loggers or False,
        default_root_dir=cfg.run_dir,
        plugins=[AtomicCheckpointIO()],
        precision=precision,
    )
    # Lightning chooses the cluster environment (torchrun's over SLURM's); the requeue is
    # SignalStop's (run_callbacks), which stops all ranks at one step, not that of Lightning's
    # SLURM environment, which saves from its signal handler, mid-step
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False
    check_launched_processes(trainer)
    return trainer


def compile_model(module: DETRModule, setting: Any) -> None:
    """``torch.compile`` the module's DETR in place (``nn.Module.compile``: the state dict and
    checkpoints keep their keys) when ``setting`` (the ``compile`` config key) is true or a
    mapping of ``torch.compile`` arguments (e.g. ``{mode: max-autotune}``); false/null: eager.

    Compilation specializes on input shapes: multi-scale batches of new sizes recompile until
    Dynamo switches to dynamic shapes, so the gain shows in long runs, not in the first steps
    (``bench/train_step.py`` measures both)."""
    if setting is None or setting is False:
        return
    if setting is True:
        options: dict[str, Any] = {}
    elif isinstance(setting, DictConfig):
        options = dict(OmegaConf.to_container(setting, resolve=True))
    elif isinstance(setting, dict):
        options = dict(setting)
    else:
        raise SetupError(
            f"compile={setting!r}: use true, false, or a mapping of torch.compile arguments "
            "such as {mode: max-autotune}"
        )
    log.info("compiling the model with torch.compile(%s)", options or "")
    module.model.compile(**options)


def requeue_signal(cfg: DictConfig) -> signal.Signals | None:
    """The signal on which a SLURM job saves its state and requeues itself
    (``slurm.requeue_signal`` with ``slurm.auto_requeue``; :class:`SignalStop`), or None (not
    under SLURM, or auto_requeue off)."""
    settings = cfg.get("slurm")
    if settings is None or not settings.auto_requeue or not SLURMEnvironment.detect():
        return None
    name = str(settings.requeue_signal).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if not hasattr(signal.Signals, name) or name in ("SIGTERM", "SIGKILL", "SIGSTOP"):
        raise SetupError(
            f"slurm.requeue_signal={settings.requeue_signal} is not a signal that a job can "
            "be asked for; use the one of sbatch --signal (e.g. USR1 for --signal=USR1@90)"
        )
    return signal.Signals[name]


def run_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Callbacks that every training run has, whatever the ``callbacks`` group says: loggers
    flushed into each checkpoint, the stop on SIGTERM and SLURM's requeue signal, the
    non-finite loss limit."""
    last = last_checkpoint_path(cfg.run_dir)
    callbacks: list[pl.Callback] = [ResumableLogs(), SignalStop(last, requeue_signal(cfg))]
    limit = cfg.get("nonfinite", {}).get("max_consecutive")
    if limit is not None:
        callbacks.append(NonFiniteStop(limit, last))
    return callbacks


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_cpu_kernel_cache(capacity: Any) -> None:
    """Bound oneDNN's cache of compiled CPU kernels (``cpu_kernel_cache`` in train.yaml).

    oneDNN compiles a kernel ("primitive") per convolution shape and keeps up to 1024 of them.
    Multi-scale training brings new shapes nearly every batch, so the cache seldom hits and its
    kernels pile up in the training process: one epoch of ``bench/train.py``'s CPU config
    peaked at 1392-1400 MB with no cache against 1509-1591 MB with oneDNN's default, for 2-3%
    of speed (kernels shared by same-shape convolutions in a step are compiled again). oneDNN
    reads its environment variable once, at its first kernel, so this takes effect when it runs
    before the process's first CPU convolution (as in ``train``); a value set in the
    environment wins. ``None`` leaves oneDNN's default.
    """
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise SetupError(
            f"cpu_kernel_cache must be a number of kernels >= 0 (0: no cache) or null, got "
            f"{capacity!r}"
        )
    configured = os.environ.get(ONEDNN_CACHE_VARIABLE)
    if configured is None:
        os.environ[ONEDNN_CACHE_VARIABLE] = str(capacity)
    elif configured != str(capacity):
        log.info(
            "oneDNN kernel cache: %s=%s from the environment, not cpu_kernel_cache=%d",
            ONEDNN_CACHE_VARIABLE, configured, capacity,
        )  # fmt: skip


def train(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Fit DETR as configured; returns the final validation metrics (+ ``run_dir``).

    ``callbacks`` are added to the configured ones (for scripts and tests). ``ckpt_path`` or
    ``resume=auto`` resume a run (:func:`resume_checkpoint`). A SIGTERM to any rank stops
    every rank after the same optimizer step, saves ``<run_dir>/checkpoints/last.ckpt`` and
    raises SystemExit(143); SLURM's requeue signal and submitit's (``hydra/launcher=slurm``) do
    the same with an ``hpc_ckpt_<n>.ckpt`` and requeue the job
    (:class:`~detr_lightning.callbacks.SignalStop`).
    """
    quiet_third_party()
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    limit_cpu_kernel_cache(cfg.get("cpu_kernel_cache"))
    check_data_source(cfg.data.get("root"), cfg.data.get("synthetic"))
    check_optimized_metric(cfg)
    # first: it checks the devices against the processes that a launcher started
    trainer = build_trainer(cfg, run_callbacks(cfg) + list(callbacks or []))
    ensure_backbone_weights(cfg)
    run_dir = Path(cfg.run_dir)
    # The resumed checkpoint is read once: chosen and checked here, then handed to Lightning.
    ckpt_path, resumed = _resume(cfg)
    if ckpt_path and resumed is None:
        resumed = _load_if_torch_file(ckpt_path)
    datamodule = instantiate_data(cfg.data)
    module = build_module(cfg, datamodule)
    if ckpt_path:
        check_resume(module, ckpt_path, None if resumed is None else resumed.state)
    compile_model(module, cfg.get("compile"))
    checkpoint_io = trainer.strategy.checkpoint_io
    if not isinstance(checkpoint_io, AtomicCheckpointIO):
        checkpoint_io = None
    if resumed is not None and checkpoint_io is not None and _loads_in_this_process(trainer):
        checkpoint_io.hand_over(resumed)
    del resumed  # held by the checkpoint IO until Lightning takes it
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        parameters = sum(p.numel() for p in module.model.parameters())
        log.info(
            "DETR %s: %.2fM parameters, %d classes, run dir %s",
            cfg.backbone.name,
            parameters / 1e6,
            module.model.num_classes,
            run_dir,
        )
    stop = next(c for c in trainer.callbacks if isinstance(c, SignalStop))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        # SignalStop saved the state; requeue the job if the signal asked for it, else exit
        # with 128 + 15, as a process that SIGTERM ended, so that schedulers and scripts see
        # an interrupted run, not a finished one
        stop.requeue(trainer)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if checkpoint_io is not None:  # a run that failed before its restore
            checkpoint_io.forget()
    metrics = result_from_metrics(trainer.callback_metrics, "val")
    history = next((c for c in trainer.callbacks if isinstance(c, MetricsHistory)), None)
    if cfg.get("test_after_fit") and stop.save_if_signalled(trainer):
        # signalled during the last validation: the fit is complete and now saved, and the
        # test is left for the restart (resume=auto finds the fit done and runs the test)
        if trainer.is_global_zero:
            log.warning("the fit is complete; test_after_fit is left for the restart")
        stop.requeue(trainer)
        raise SystemExit(128 + signal.SIGTERM)
    if cfg.get("test_after_fit"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", None) or None
        (logged,) = trainer.test(
            module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True
        )
        metrics = result_from_metrics(logged, "test")
        if trainer.is_global_zero and history:
            history.final_metrics = metrics
            history.write(module.label_map)
    if trainer.is_global_zero and metrics:
        log.info(
            "final validation (COCO, %s):\n%s",
            resolve_backend(cfg.eval_backend),
            report(metrics, module.label_map),
        )
    return metrics | {"run_dir": str(run_dir)}


__all__ = [
    "build_module",
    "build_trainer",
    "check_resume",
    "compile_model",
    "ensure_backbone_weights",
    "instantiate_data",
    "model_settings",
    "resolve_precision",
    "resume_checkpoint",
    "run_callbacks",
    "train",
]
