"""Planted cases made from scikit-learn's bundled digits, where the right answer is known.

Used by benchmarks/search_quality.py and by the tests that check autodrop's answers; nothing is
downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SPLIT_SEED = 0


def write_noisy_digits(root: Path, *, per_class: int = 50, wrong: float = 0.3) -> Path:
    """Write digits as 8x8 PNGs: val/ clean (the fixed 20% split), train/ ``per_class`` images per
    class with a ``wrong`` share of their labels replaced by another class, drawn with a fixed seed."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if root.exists():
        shutil.rmtree(root)
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    labels = digits.target
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                          random_state=SPLIT_SEED)
    rng = np.random.default_rng(SPLIT_SEED)
    kept = np.concatenate([rng.permutation(train_idx[labels[train_idx] == c])[:per_class] for c in range(10)])
    noisy = labels.copy()
    flip = rng.permutation(kept)[: int(round(wrong * len(kept)))]
    noisy[flip] = (labels[flip] + rng.integers(1, 10, len(flip))) % 10  # always another class
    for split, index, truth in (("train", kept, noisy), ("val", val_idx, labels)):
        for i in index:
            folder = root / split / str(truth[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], "L").save(folder / f"{i}.png")
    return root
