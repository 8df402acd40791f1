"""The frozen TorchScript graph that runs the backbone trunk in CPU inference
(``detr_lightning.inference.graphs``): same outputs as the eager modules, used
only where it may be, rebuilt whenever the weights change."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from detr_lightning.inference.graphs import (
    INFERENCE_GRAPHS,
    enable_cpu_graphs,
    has_onednn_fusion_groups,
    onednn_graph_available,
    set_static_shapes,
    static_shapes,
)
from detr_lightning.models import DETR
from helpers.models import randomize_frozen_batchnorm
from helpers.models import tiny_detr as tiny_model
from helpers.models import tiny_eval_detr as tiny_eval_model

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="the inference graph needs oneDNN"
)


def tiny_detr(**settings) -> DETR:
    """A tiny DETR whose CPU inference runs through the graphs (as DETRModule's does)."""
    return enable_cpu_graphs(tiny_model(**settings))


def tiny_eval_detr() -> DETR:
    return enable_cpu_graphs(tiny_eval_model())


def _batch(height: int = 96, width: int = 128, pad: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, the second padded on the right by ``pad`` pixels."""
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, :, width - pad :] = True
    images[1, :, :, width - pad :] = 0
    return images, mask


def _eager(model: DETR, *inputs: torch.Tensor) -> dict:
    runner, model.backbone.trunk_runner = model.backbone.trunk_runner, None
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        model.backbone.trunk_runner = runner


def _close(actual: dict, expected: dict) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"num_stages": 3},
        {"backbone": "resnet50", "dilation": True, "hidden_dim": 32},
    ],
    ids=["resnet18", "resnet18-3-stages", "resnet50-dc5"],
)
def test_graph_gives_the_eager_outputs_at_every_size(settings: dict) -> None:
    torch.manual_seed(0)
    model = tiny_detr(**settings).eval()
    randomize_frozen_batchnorm(model, torch.Generator().manual_seed(0))
    images, mask = _batch()
    with torch.no_grad():
        first = model(images, mask)
        assert model.backbone in INFERENCE_GRAPHS
        second = model(images, mask)
    # the same graph for every call: the results of one input never depend on earlier calls
    assert torch.equal(first["pred_boxes"], second["pred_boxes"])
    expected = _eager(model, images, mask)
    _close(first, expected)
    # one graph serves other sizes and batch sizes than the one it was built at
    other = torch.randn(1, 3, 70, 150, generator=torch.Generator().manual_seed(2))
    other_mask = torch.zeros(1, 70, 150, dtype=torch.bool)
    with torch.inference_mode():
        graph_out = model(other, other_mask)
    assert model.backbone in INFERENCE_GRAPHS
    _close(graph_out, _eager(model, other, other_mask))


def test_weight_changes_rebuild_the_graph() -> None:
    model = tiny_eval_detr()
    images, mask = _batch()
    with torch.no_grad():
        before = model(images, mask)
        assert model.backbone in INFERENCE_GRAPHS
        model.backbone.body.layer3[0].conv1.weight.mul_(-2.0)  # an in-place edit
        changed = model(images, mask)  # a new graph of the new weights
    expected = _eager(model, images, mask)
    assert (before["pred_boxes"] - expected["pred_boxes"]).abs().max() > 1e-4
    _close(changed, expected)
    assert model.backbone in INFERENCE_GRAPHS

    state = copy.deepcopy(model.state_dict())
    other = tiny_detr().eval()  # other random weights, loaded over this model's
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
        loaded = model(images, mask)
    _close(loaded, _eager(other, images, mask))
    model.load_state_dict(state)


def test_graph_leaves_state_dict_and_copies_alone() -> None:
    model = tiny_eval_detr()
    keys = list(model.state_dict())
    images, mask = _batch()
    with torch.no_grad():
        model(images, mask)
    assert model.backbone in INFERENCE_GRAPHS
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert clone.backbone not in INFERENCE_GRAPHS
    with torch.no_grad():
        _close(clone(images, mask), _eager(model, images, mask))


def test_training_discards_the_graph_and_runs_eager() -> None:
    model = tiny_eval_detr()
    images, mask = _batch()
    with torch.no_grad():
        model(images, mask)
    assert model.backbone in INFERENCE_GRAPHS
    model.train()
    outputs = model(images, mask)  # the first training step frees the graph
    assert model.backbone not in INFERENCE_GRAPHS
    outputs["pred_boxes"].sum().backward()
    assert model.backbone.body.layer4[0].conv1.weight.grad is not None


def test_eval_with_gradients_runs_eager() -> None:
    """Eval mode with autograd on (e.g. saliency maps): gradients must reach the weights."""
    model = tiny_eval_detr()
    images, mask = _batch()
    outputs = model(images, mask)
    assert model.backbone not in INFERENCE_GRAPHS
    outputs["pred_logits"].sum().backward()
    assert model.backbone.body.layer2[0].conv1.weight.grad is not None


def test_autocast_and_other_dtypes_run_eager() -> None:
    model = tiny_eval_detr()
    images, mask = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, mask)
    assert model.backbone not in INFERENCE_GRAPHS
    backbone = copy.deepcopy(model.backbone).double()
    with torch.no_grad():
        features, _ = backbone(images.double(), mask)
    assert backbone not in INFERENCE_GRAPHS
    assert features.dtype == torch.float64


def test_forward_hooks_in_the_trunk_keep_firing() -> None:
    """The eager trunk calls the stem's pooling module (the convolutions go through
    ``conv_norm``); a hook there sees every call."""
    model = tiny_eval_detr()
    images, mask = _batch()
    seen: list[tuple[int, ...]] = []
    handle = model.backbone.body.maxpool.register_forward_hook(
        lambda module, args, output: seen.append(tuple(output.shape))
    )
    with torch.no_grad():
        for _ in range(3):
            model(images, mask)
    handle.remove()
    assert len(seen) == 3
    assert model.backbone not in INFERENCE_GRAPHS


def test_the_option_turns_it_off() -> None:
    model = enable_cpu_graphs(tiny_eval_detr(), False)
    images, mask = _batch()
    with torch.no_grad():
        model(images, mask)
    assert model.backbone not in INFERENCE_GRAPHS


@pytest.mark.parametrize("kind", ["for-loop", "foreach", "fused"])
def test_optimizer_steps_rebuild_the_graph(kind: str) -> None:
    """Each AdamW implementation updates the weights in place; the next evaluation must see
    the new weights, not the graph of the old ones."""
    model = tiny_eval_detr()
    images, mask = _batch()
    with torch.no_grad():
        model(images, mask)
    assert model.backbone in INFERENCE_GRAPHS
    options = {
        "for-loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, **options[kind])
    # still in eval mode (training would drop the graph): only the weight check sees it
    model(images, mask)["pred_boxes"].sum().backward()
    optimizer.step()
    assert model.backbone in INFERENCE_GRAPHS
    with torch.no_grad():
        outputs = model(images, mask)
    _close(outputs, _eager(model, images, mask))


needs_onednn_graph = pytest.mark.skipif(
    not onednn_graph_available(), reason="this PyTorch build has no oneDNN Graph"
)


def _ran_fused() -> bool:
    """Whether the TorchScript graph run last went through oneDNN Graph's fused kernels."""
    return has_onednn_fusion_groups(torch.jit.last_executed_optimized_graph())


@needs_onednn_graph
@pytest.mark.parametrize(
    "settings",
    [{}, {"backbone": "resnet50", "dilation": True, "hidden_dim": 32}],
    ids=["resnet18", "resnet50-dc5"],
)
def test_static_shapes_run_a_graph_compiled_for_them(settings: dict) -> None:
    torch.manual_seed(0)
    model = tiny_detr(**settings).eval()
    randomize_frozen_batchnorm(model, torch.Generator().manual_seed(0))
    images, mask = _batch()
    set_static_shapes(model.backbone, [tuple(images.shape)])
    with torch.no_grad():
        first = model(images, mask)
        assert _ran_fused()  # the real input went through the compiled kernels
        assert INFERENCE_GRAPHS.static_shapes(model.backbone) == {tuple(images.shape)}
        second = model(images, mask)
    # compiled and warmed up before the first real input: every call gives the same result
    assert torch.equal(first["pred_boxes"], second["pred_boxes"])
    assert torch.equal(first["pred_logits"], second["pred_logits"])
    _close(first, _eager(model, images, mask))
    # channels_last images of the shape go through it too
    with torch.no_grad():
        cl_images = images.contiguous(memory_format=torch.channels_last)
        assert torch.equal(model(cl_images, mask)["pred_boxes"], first["pred_boxes"])
    # other shapes take the general graph
    other, other_mask = images[:1], mask[:1]
    with torch.no_grad():
        _close(model(other, other_mask), _eager(model, other, other_mask))
    assert not _ran_fused()
    assert INFERENCE_GRAPHS.static_shapes(model.backbone) == {tuple(images.shape)}
    # new weights, new graphs
    with torch.no_grad():
        model.backbone.body.layer2[0].conv2.weight.mul_(-1.5)
        _close(model(images, mask), _eager(model, images, mask))
    assert INFERENCE_GRAPHS.static_shapes(model.backbone) == {tuple(images.shape)}
    assert not torch.jit.onednn_fusion_enabled()  # the process-wide switch is put back


@needs_onednn_graph
def test_a_user_switching_onednn_fusion_on_still_gets_the_eager_outputs() -> None:
    """The general graph's oneDNN layout ops fail under oneDNN Graph; it runs with the switch
    off, and the user's setting is put back."""
    model = tiny_eval_detr()
    images, mask = _batch()
    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.no_grad():
            for _ in range(3):  # TorchScript optimizes a graph after its first runs
                outputs = model(images, mask)
        assert torch.jit.onednn_fusion_enabled()
    finally:
        torch.jit.enable_onednn_fusion(False)
    assert model.backbone in INFERENCE_GRAPHS
    _close(outputs, _eager(model, images, mask))


def test_static_shapes_are_checked() -> None:
    backbone = tiny_eval_detr().backbone
    for bad in ([(1, 3, 64)], [(1, 1, 64, 64)], [(1, 3, 0, 64)], [(1, 3, 64.0, 64)],
                [(1, 3, True, 64)], ["1x3x64x64"]):  # fmt: skip
        with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
            set_static_shapes(backbone, bad)
    with pytest.raises(ValueError, match="wrap a single shape in a list"):
        set_static_shapes(backbone, (1, 3, 64, 64))
    set_static_shapes(backbone, [[np.int64(1), 3, torch.tensor(64), 96]])
    assert static_shapes(backbone) == {(1, 3, 64, 96)}
    assert all(type(n) is int for n in next(iter(static_shapes(backbone))))
    # only through the checks: the declaration is the registry's, not an attribute to set
    assert not hasattr(backbone, "static_shapes") and not hasattr(backbone, "_static_shapes")


@needs_onednn_graph
def test_clearing_static_shapes_drops_their_graphs_only() -> None:
    model = tiny_eval_detr()
    images, mask = _batch()
    set_static_shapes(model.backbone, [images.shape])
    with torch.no_grad():
        model(images, mask)
        model(images[:1], mask[:1])  # the general graph, for another shape
    assert INFERENCE_GRAPHS.static_shapes(model.backbone) == {tuple(images.shape)}
    set_static_shapes(model.backbone, [])
    assert model.backbone in INFERENCE_GRAPHS  # the general graph is kept
    assert INFERENCE_GRAPHS.static_shapes(model.backbone) == set()
    with torch.no_grad():
        outputs = model(images, mask)
    assert not _ran_fused()
    assert INFERENCE_GRAPHS.static_shapes(model.backbone) == set()
    _close(outputs, _eager(model, images, mask))


@needs_onednn_graph
def test_static_and_general_graphs_from_two_threads() -> None:
    """The switch is process-wide: a thread running a static-shape graph (switch on) and one
    running the general graph (switch off) must not change it under each other."""
    model = tiny_eval_detr()
    images, mask = _batch()
    small, small_mask = images[:1, :, :64, :96].contiguous(), mask[:1, :64, :96]
    set_static_shapes(model.backbone, [images.shape])
    expected = {"static": _eager(model, images, mask), "general": _eager(model, small, small_mask)}
    inputs = {"static": (images, mask), "general": (small, small_mask)}
    failures: list[BaseException] = []

    def work(kind: str) -> None:
        try:
            for _ in range(4):
                with torch.no_grad():
                    _close(model(*inputs[kind]), expected[kind])
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(kind,)) for kind in ("static", "general")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert not torch.jit.onednn_fusion_enabled()
