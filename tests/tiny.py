"""Shared test helpers: tiny search settings on the bundled digits, and small generated image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Small enough that a trial takes about a second on a 2-core CPU, big enough to learn something.
TINY = dict(data="digits", image_size=16, train_per_class=30, epochs=2, batch_size=64, trials=5, pruner="none", quiet=True)


def tiny_options(tmp_path: Path, **overrides) -> dict:
    """Search options for a tiny digits study stored under ``tmp_path``."""
    options = {k: v for k, v in TINY.items() if k != "quiet"}
    options["storage"] = f"sqlite:///{tmp_path / 'study.db'}"
    options.update(overrides)
    return options


def write_image_folder(root: Path, classes: dict[str, int], size: int = 12, mode: str = "L") -> Path:
    """Write ``classes[name]`` small random images per class under ``root/name/``; return root."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            # Each class gets its own brightness, so the classes are learnable.
            base = 40 + 60 * c
            pixels = np.clip(rng.normal(base, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB").convert(mode)
            image.save(root / name / f"{i}.png")
    return root


def write_noisy_digits(root: Path, **kwargs) -> Path:
    """The digits with wrong training labels, written as an image folder (benchmarks/planted.py)."""
    import sys

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from planted import write_noisy_digits as write

    return write(root, **kwargs)


def search_on_one_thread(options: dict) -> dict:
    """Run ``autodrop.search(**options)`` on one thread (a module-scoped study shared by several
    tests: one thread keeps its numbers the same whatever else the machine runs)."""
    import torch

    import autodrop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = autodrop.search(**options)
    finally:
        torch.set_num_threads(threads)
    return {"options": options, "result": result}
