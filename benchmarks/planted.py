"""Image folders made here, nothing downloaded: planted cases from scikit-learn's bundled digits,
where the right answer is known, and a small colour-image folder for trying a realistic recipe.

Used by benchmarks/search_quality.py, by the tests that check autodrop's answers, and by the
README (``python benchmarks/planted.py shapes DIR`` writes the colour folder).
"""

from __future__ import annotations

import argparse
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


SHAPES = ("disc", "ring", "square", "triangle")  # all mirror-symmetric: a horizontal flip keeps the class


def write_shapes(root: Path, *, per_class: int = 150, size: int = 32, seed: int = 0) -> Path:
    """Write ``per_class`` colour PNGs per class of :data:`SHAPES` under ``root/<class>/``.

    Each image is one shape of a random colour, size and place on a noisy background of another
    random colour with a shading gradient; some shapes run off the edge. Small photos in spirit:
    the class is in the outline, not the colour, and a random crop or flip keeps it.
    """
    from PIL import Image

    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for name in SHAPES:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            background = rng.uniform(0, 255, 3)
            slope = rng.normal(0, 40, 2) / size
            shade = (rows - size / 2) * slope[0] + (cols - size / 2) * slope[1]
            image = background + shade[..., None] + rng.normal(0, 18, (size, size, 3))
            colour = rng.uniform(0, 255, 3)
            while np.abs(colour - background).sum() < 150:  # the shape must stand out from its background
                colour = rng.uniform(0, 255, 3)
            radius = rng.uniform(0.18, 0.34) * size
            cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
            dy, dx = rows - cy, cols - cx
            if name == "disc":
                inside = dy**2 + dx**2 <= radius**2
            elif name == "ring":
                distance = np.sqrt(dy**2 + dx**2)
                inside = (distance <= radius) & (distance >= 0.55 * radius)
            elif name == "square":
                inside = (np.abs(dy) <= 0.85 * radius) & (np.abs(dx) <= 0.85 * radius)
            else:  # an upright triangle, apex on top
                height = 1.8 * radius
                top = cy - height / 2
                inside = (dy <= height / 2) & (np.abs(dx) <= (rows - top) * 0.6) & (rows >= top)
            image[inside] = colour + rng.normal(0, 12, (int(inside.sum()), 3))
            pixels = np.clip(image, 0, 255).round().astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a planted image folder.")
    parser.add_argument("kind", choices=["shapes", "noisy-digits"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-class", type=int, default=None)
    args = parser.parse_args()
    if args.kind == "shapes":
        write_shapes(args.folder, **({"per_class": args.per_class} if args.per_class else {}))
    else:
        write_noisy_digits(args.folder, **({"per_class": args.per_class} if args.per_class else {}))
    print(f"Wrote {args.kind} to {args.folder}")


if __name__ == "__main__":
    main()
