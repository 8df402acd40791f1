"""Whether another convolution algorithm could make the fp32 ResNet trunk faster on this CPU.

    PYTHONPATH=src python bench/conv_algorithms.py [--size 800 1066] [--iters 7] \
        [--json bench/results/conv_algorithms.json]

The trunk's stride-1 3x3 convolutions (each followed by bias and ReLU, as with frozen BatchNorm
folded in) at the feature sizes of a ResNet stage for a ``--size`` image, batch 1,
channels_last, timed three ways in alternation:

- ``direct``: ``F.conv2d``, oneDNN's direct convolution (what the model runs);
- ``winograd``: Winograd F(2x2, 3x3) written with PyTorch operations: the input cut into 4x4
  tiles with stride 2 and transformed, 16 batched matrix products of [tiles, C_in] x
  [C_in, C_out] (2.25x fewer multiply-adds than the direct convolution), the output transformed
  back; the weights' transform is done once, outside the timing;
- ``nnpack``: ``torch._nnpack_spatial_convolution`` (NNPACK picks its algorithm).

Reported: the median time, the speedup against ``direct`` (median of the per-round ratios) and
the largest difference from the same convolution computed in float64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json

# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): Y = A^T [(G g G^T) * (B^T d B)] A
B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
A_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
# on a row-major flattened 4x4 tile: vec(M X M^T) = (M kron M) vec(X)
INPUT_TRANSFORM = torch.kron(B_T, B_T).float()  # [16, 16]
OUTPUT_TRANSFORM = torch.kron(A_T, A_T).float()  # [4, 16]
STAGES = {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)}


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> the 16 transformed matrices [16, C_in, C_out]."""
    out_channels, in_channels = weight.shape[:2]
    transformed = torch.einsum("ik,ockl,jl->ijco", G, weight.double(), G)
    return transformed.reshape(16, in_channels, out_channels).float().contiguous()


def winograd_conv_relu(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(conv2d(x, w, bias, padding=1)) for a batch of one, by F(2x2, 3x3)."""
    _, channels, height, width = x.shape
    tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
    padded = F.pad(x, (1, 2 * tiles_w + 1 - width, 1, 2 * tiles_h + 1 - height))
    tiles = padded.permute(0, 2, 3, 1)[0].unfold(0, 4, 2).unfold(1, 4, 2)  # [th, tw, C, 4, 4]
    tiles = tiles.permute(3, 4, 0, 1, 2).reshape(16, -1)
    transformed = (INPUT_TRANSFORM @ tiles).view(16, tiles_h * tiles_w, channels)
    products = torch.bmm(transformed, weights)  # [16, tiles, C_out]
    out_channels = weights.shape[2]
    out = (OUTPUT_TRANSFORM @ products.view(16, -1)).view(2, 2, tiles_h, tiles_w, out_channels)
    out = out.permute(2, 0, 3, 1, 4).reshape(2 * tiles_h, 2 * tiles_w, out_channels)
    out = out[:height, :width].permute(2, 0, 1).unsqueeze(0)
    return torch.relu(out + bias.view(1, -1, 1, 1))


def time_stage(
    channels: int, height: int, width: int, generator: torch.Generator, warmup: int, iters: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each algorithm's times and largest error against float64 for one convolution shape."""
    x = torch.randn(1, channels, height, width, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    scale = (2 / (9 * channels)) ** 0.5
    weight = torch.randn(channels, channels, 3, 3, generator=generator) * scale
    bias = torch.randn(channels, generator=generator) * 0.1
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    packed = winograd_weights(weight)
    runs = {
        "direct": lambda: F.conv2d(x, weight_cl, bias, padding=1).relu_(),
        "winograd": lambda: winograd_conv_relu(x, packed, bias),
        "nnpack": lambda: torch._nnpack_spatial_convolution(
            x.contiguous(), weight, bias, [1, 1]
        ).relu_(),
    }
    with torch.inference_mode():
        truth = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu_()
        try:
            runs["nnpack"]()
        except RuntimeError as error:  # a torch built without NNPACK
            print(f"nnpack left out: {error}".splitlines()[0])
            del runs["nnpack"]
        times: dict[str, list[float]] = {name: [] for name in runs}
        errors = {}
        for step in range(warmup + iters):
            for name, run in runs.items():
                started = time.perf_counter()
                out = run()
                if step >= warmup:
                    times[name].append(time.perf_counter() - started)
                errors[name] = (out.double() - truth).abs().max().item()
    return times, errors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows, records = [], []
    for stage, (channels, stride) in STAGES.items():
        # the feature size of a stage: the trunk's stride-2 layers round up
        height, width = (-(-n // stride) for n in args.size)
        times, errors = time_stage(channels, height, width, generator, args.warmup, args.iters)
        for name, values in times.items():
            speedup = statistics.median(d / v for d, v in zip(times["direct"], values))
            record = {"stage": stage, "channels": channels, "height": height, "width": width,
                      "algorithm": name, "ms": 1e3 * statistics.median(values),
                      "speedup": speedup, "max_abs_error": errors[name],
                      "times": values}  # fmt: skip
            records.append(record)
            rows.append([f"{stage} {channels}x{height}x{width}", name,
                         f"{record['ms']:.1f} ({1e3 * min(values):.1f}-{1e3 * max(values):.1f})",
                         f"{speedup:.2f}x", f"{errors[name]:.1e}"])  # fmt: skip
    table = print_table(
        f"3x3 convolution + bias + ReLU, batch 1, fp32, {torch.get_num_threads()} threads, "
        f"image {args.size[0]}x{args.size[1]}",
        ["stage, C x H x W", "algorithm", "ms median (min-max)", "speedup", "max |error| vs fp64"],
        rows,
    )
    write_json(args.json, {"environment": environment(), "rows": records, "table": table})


if __name__ == "__main__":
    main()
