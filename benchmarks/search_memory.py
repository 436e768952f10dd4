"""Peak memory of a search: it should grow with the dataset once, not with each trial.

For each dataset, one fresh process runs a real ``autodrop.search`` with a few trials, then
resumes the same study with more trials, and reports its peak resident memory (RSS) after
loading the data, after the first run and after the resumed run. If memory grew per trial, the
peak would rise between the two runs.

Datasets: ``digits`` (1,797 gray 32x32 images) and ``synthetic`` (generated uint8 tensors,
``--images`` RGB 32x32 images, 50,000 by default), which stands in for a CIFAR-sized folder.
Usage: python benchmarks/search_memory.py [--images 50000] [--epochs 1] [--pack K]
Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(dataset: str, images: int, epochs: int, trials: tuple[int, int], pack: int, storage: str) -> None:
    """Run in a fresh process: load, search, resume; print one JSON line of peaks."""
    sys.path.insert(0, str(ROOT))
    import torch

    import autodrop.run.search as search_module
    from autodrop.api import search
    from autodrop.training.data import ImageData, _split, load_data

    peaks: dict[str, float] = {"start": _peak_mib()}
    real_load = load_data

    def load(config):  # noqa: ANN001 - stands in for autodrop.training.data.load_data
        if dataset == "digits":
            data = real_load(config)
        else:
            import numpy as np

            labels = torch.arange(images) % 10
            # numpy draws uint8 directly (torch.randint goes through int64: 8x the set's size).
            pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (images, 3, 32, 32), dtype=np.uint8))
            pixels[:, 0] //= 2  # a little signal per class, so training has something to learn
            pixels[:, 0] += (labels * 12).to(torch.uint8).view(-1, 1, 1)
            data = _split("synthetic", pixels, labels, tuple(str(c) for c in range(10)), config.val_fraction)
        assert isinstance(data, ImageData)
        peaks.setdefault("data loaded", _peak_mib())  # the resumed search loads it again
        return data

    search_module.load_data = load
    options = dict(data="digits", image_size=32, epochs=epochs, pruner="none", storage=storage, pack=pack)
    search(trials=trials[0], **options)
    peaks[f"after {trials[0]} trials"] = _peak_mib()
    search(trials=trials[1], **options)
    peaks[f"after {trials[1]} trials (resumed)"] = _peak_mib()
    n = 1797 if dataset == "digits" else images
    print(json.dumps({"dataset": dataset, "images": n, "peaks_mib": peaks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="images in the synthetic set")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pack", type=int, default=1, help="trials packed into one network (search's --pack)")
    parser.add_argument("--datasets", default="digits,synthetic")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        dataset, images, epochs, first, second, pack = args.child
        storage = f"sqlite:///{os.environ['AUTODROP_BENCH_DB']}"
        _child(dataset, int(images), int(epochs), (int(first), int(second)), int(pack), storage)
        return
    print(f"peak RSS of a search (fresh process per dataset; epochs={args.epochs}, pack={args.pack})")
    for dataset in args.datasets.split(","):
        trials = (2, 6) if dataset == "digits" else (1, 2)
        with tempfile.TemporaryDirectory(prefix="autodrop-mem-") as tmp:
            env = dict(os.environ, AUTODROP_BENCH_DB=str(Path(tmp) / "study.db"), PYTHONPATH=str(ROOT))
            result = subprocess.run(
                [sys.executable, __file__, "--child", dataset, str(args.images), str(args.epochs), *map(str, trials),
                 str(args.pack)],
                capture_output=True, text=True, env=env,
            )
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{dataset}: the search failed")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        peaks = ", ".join(f"{name} {mib:,.0f} MiB" for name, mib in report["peaks_mib"].items())
        print(f"{dataset} ({report['images']:,} images): {peaks}")


if __name__ == "__main__":
    main()
