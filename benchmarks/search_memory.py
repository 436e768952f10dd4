"""Peak memory of a search against the size of its images, with one worker and with two.

Writes (once) a folder of ``--images`` generated RGB PNGs of ``--size`` pixels (20,000 at 64x64 by
default: 234 MiB as uint8) and a small folder of the same kind (``--small`` images). Runs the
command line's ``autodrop search`` on each (one epoch, one trial per worker, batch 128, on the CPU,
a network with almost no arithmetic unless ``--model`` names another) in a fresh process, first once to build the decoded-image cache, then with 1 and with 2
workers reading it, and samples the whole process tree's memory every 0.1 s:

- largest RSS: the high-water mark of the largest single process (the kernel's, from wait4);
- summed RSS: the largest sum over the tree's processes of their resident memory, in which a page
  of the shared cache file counts once per process that maps it;
- summed PSS (``/proc/PID/smaps_rollup``): the same, with each shared page split between the
  processes that map it, so the page cache's one copy of the images counts once: the memory the
  search takes from the machine.

The data's share of a run is its peak on the large folder minus the peak on the small one (the
libraries, the network and its activations are the same in both) over the difference of their
dataset bytes. Aim (issue 15): one worker's share at most 1.5x the dataset; each extra worker
adds at most 0.3x. The last lines print these ratios.

Usage: python benchmarks/search_memory.py [--images 20000] [--small 500] [--size 64] [--folder DIR]
Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def write_folder(root: Path, n_images: int, size: int, n_classes: int = 10) -> Path:
    """Write ``n_images`` RGB PNGs in ``n_classes`` class folders (once: an existing complete folder is kept)."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n_images):
        c = i % n_classes
        # Each class its own colour and stripe direction, plus noise: learnable, and PNGs of a realistic size.
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], dtype=np.float32)
        stripes = np.sin(2 * np.pi * (c + 1) * (ramp[:, None] if c % 2 else ramp[None, :]))[..., None]
        pixels = colour * 0.6 + 60 * stripes + rng.normal(0, 30, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(root / f"c{c}" / f"{i}.png",
                                                                          compress_level=1)
    done.write_text(f"{n_images} images of {size}x{size}\n")
    return root


@dataclass
class Peak:
    largest_rss: int = 0  # bytes: the largest single process's high-water mark
    summed_rss: int = 0  # bytes: the largest sum over the tree at one sample
    summed_pss: int | None = None  # bytes; None where smaps_rollup cannot be read
    seconds: float = 0.0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(tree.get(p, []))
    return found


def _rss_pss(pid: int) -> tuple[int, int | None]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            return 0, None
        return pages * os.sysconf("SC_PAGE_SIZE"), None
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if ":" in line}
    return values.get("Rss", 0), values.get("Pss")


def measure(command: list[str], env: dict[str, str]) -> Peak:
    """Run ``command`` and return the peaks of its process tree."""
    peak = Peak()
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    errors: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            rss_sum, pss_sum, pss_ok = 0, 0, True
            for pid in _tree(process.pid):
                rss, pss = _rss_pss(pid)
                rss_sum += rss
                if pss is None:
                    pss_ok = False
                else:
                    pss_sum += pss
            peak.summed_rss = max(peak.summed_rss, rss_sum)
            if pss_ok:
                peak.summed_pss = max(peak.summed_pss or 0, pss_sum)
            stop.wait(0.1)

    def drain() -> None:
        assert process.stderr is not None
        errors.append(process.stderr.read())

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    for t in threads:
        t.join()
    if process.returncode != 0:
        print(errors[0][-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    peak.largest_rss = usage.ru_maxrss * 1024  # kB on Linux
    peak.seconds = time.monotonic() - start
    return peak


# A network with almost no arithmetic: what is measured is the data's memory, and this keeps a run of
# 20,000 images to a minute on a small CPU (simple-cnn's 64x64 epoch took 19 minutes on a busy 2-core box).
TINY_MODEL = """from torch import nn


class Tiny(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 8, stride=8), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
"""


def model_spec(name: str, folder: Path) -> str:
    """Return the --model value for ``name``: a built-in, or ``tiny`` (written into ``folder``)."""
    if name != "tiny":
        return name
    path = folder / "tiny_model.py"
    path.write_text(TINY_MODEL)
    return f"{path}:Tiny"


def search_command(folder: Path, size: int, workers: int, epochs: int, storage: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "autodrop", "search", "--data", str(folder), "--image-size", str(size),
            "--model", model, "--epochs", str(epochs), "--trials", str(workers), "--workers", str(workers),
            "--pruner", "none", "--device", "cpu", "--batch-size", "128", "--storage", f"sqlite:///{storage}",
            "--quiet"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="images in the large folder")
    parser.add_argument("--small", type=int, default=500, help="images in the small folder (the base)")
    parser.add_argument("--size", type=int, default=64, help="pixels per side")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="tiny", help="tiny (one strided conv, written here) or a built-in name")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    parser.add_argument("--folder", default=None,
                        help="where the generated folders are kept between runs (default: a folder in the temp dir)")
    args = parser.parse_args()
    base = Path(args.folder) if args.folder else Path(tempfile.gettempdir()) / "autodrop-memory-bench"
    worker_counts = [int(w) for w in args.workers.split(",")]
    print(f"peak memory of `autodrop search` ({args.size}x{args.size} RGB PNGs, {args.epochs} epoch(s), one trial "
          f"per worker, model {args.model}, batch 128, CPU); CPU: {cpu_name()}, {os.cpu_count()} cores")
    folders = {n: write_folder(base / f"folder-{n}-{args.size}", n, args.size) for n in (args.small, args.images)}
    n_bytes = {n: n * 3 * args.size * args.size for n in folders}
    print(f"dataset: {args.images:,} images = {n_bytes[args.images] / MiB:,.1f} MiB as uint8; "
          f"small folder: {args.small:,} images = {n_bytes[args.small] / MiB:,.1f} MiB")
    print(f"{'run':<44}{'largest RSS':>12}{'summed RSS':>12}{'summed PSS':>12}{'seconds':>9}")
    peaks: dict[tuple[int, str], Peak] = {}
    with tempfile.TemporaryDirectory(prefix="autodrop-mem-") as tmp:
        model = model_spec(args.model, Path(tmp))
        for n, folder in folders.items():
            cache = base / f"cache-{n}-{args.size}"
            shutil.rmtree(cache, ignore_errors=True)  # the first run builds it
            env = dict(os.environ, PYTHONPATH=str(ROOT), AUTODROP_CACHE_DIR=str(cache))
            runs = [("build", 1)] + [(f"{w} worker{'s' if w > 1 else ''}", w) for w in worker_counts]
            for label, workers in runs:
                storage = Path(tmp) / f"{n}-{label.replace(' ', '-')}.db"
                peak = measure(search_command(folder, args.size, workers, args.epochs, storage, model), env)
                peaks[(n, label)] = peak
                pss = f"{peak.summed_pss / MiB:>8,.0f} MiB" if peak.summed_pss is not None else f"{'n/a':>12}"
                name = f"{n:,} images, " + ("first search (decodes, writes the cache)" if label == "build" else label)
                print(f"{name:<44}{peak.largest_rss / MiB:>8,.0f} MiB{peak.summed_rss / MiB:>8,.0f} MiB{pss}"
                      f"{peak.seconds:>9.0f}", flush=True)
    extra = n_bytes[args.images] - n_bytes[args.small]

    def share(label: str, kind: str) -> float | None:
        big, small = getattr(peaks[(args.images, label)], kind), getattr(peaks[(args.small, label)], kind)
        return None if big is None or small is None else (big - small) / extra

    print(f"base (the small folder's first search): largest RSS {peaks[(args.small, 'build')].largest_rss / MiB:,.0f} "
          f"MiB; the data's share below is the large folder's peak minus the small one's, over "
          f"{extra / MiB:,.1f} MiB")
    shares = {}
    for label in ["build"] + [f"{w} worker{'s' if w > 1 else ''}" for w in worker_counts]:
        shares[label] = {kind: share(label, kind) for kind in ("largest_rss", "summed_rss", "summed_pss")}
        text = ", ".join(f"{kind.replace('_', ' ')} {value:.2f}x" for kind, value in shares[label].items()
                         if value is not None)
        print(f"data's share, {'first search' if label == 'build' else label}: {text} the dataset")
    if 1 in worker_counts and len(worker_counts) > 1:
        w = max(worker_counts)
        kind = "summed_pss" if shares["1 worker"]["summed_pss"] is not None else "summed_rss"
        one, many = shares["1 worker"][kind], shares[f"{w} workers"][kind]
        assert one is not None and many is not None
        print(f"each extra worker adds {(many - one) / (w - 1):.2f}x the dataset ({kind.replace('_', ' ')}; "
              f"aim <= 0.30x)")
    one = shares["1 worker"]["largest_rss"] if 1 in worker_counts else None
    if one is not None:
        print(f"one worker: {one:.2f}x the dataset above the base (largest RSS; aim <= 1.50x)")


if __name__ == "__main__":
    main()
