"""Shared pieces of the benchmarks: environment record, process-tree memory, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA_CACHE = ROOT / "bench" / ".data"


# bench/inference_hf.py's row that times our backbone alone: a bound on any model built on its
# trunk, not a variant (bench/run_all.py puts it in the summary)
INFERENCE_BOUND_ROW = "bound: detr-lightning backbone alone"


def environment() -> dict[str, Any]:
    """What the figures depend on: versions, CPU, cores, load, commit."""
    import torch
    import torchvision

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1min": os.getloadavg()[0],
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the kernel's peak resident set) of one process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class TreeMemory:
    """Polls a process and its descendants: the peak RSS of the main process and the largest
    peak of any descendant (data-loader workers). The same measure for every code base."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.main_mb = 0.0
        self.child_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            main = _peak_rss_mb(self.pid)
            if main is not None:
                self.main_mb = max(self.main_mb, main)
            stack = _children(self.pid)
            while stack:
                pid = stack.pop()
                peak = _peak_rss_mb(pid)
                if peak is not None:
                    self.child_mb = max(self.child_mb, peak)
                stack.extend(_children(pid))
            self._stop.wait(self.interval)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max of a series."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (returned and printed)."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | os.PathLike | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


def ensure_dataset(root: str | os.PathLike | None, train: int = 1000, val: int = 200) -> Path:
    """The benchmark dataset: ``root`` if given, else bench/.data/coco-like (written once)."""
    if root:
        return Path(root)
    target = DATA_CACHE / f"coco-like-{train}-{val}"
    if not (target / "annotations" / "instances_val2017.json").is_file():
        from make_dataset import write_dataset

        write_dataset(target, train, val)
    return target
