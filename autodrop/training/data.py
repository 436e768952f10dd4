"""Images in, uint8 tensors out: decoded once, split once, then batched by indexing.

Every trial of a search reuses the same :class:`ImageData`; nothing here runs per epoch.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from autodrop.config import BUILTIN_DATASETS, DataConfig
from autodrop.errors import AutodropWarning, DataError
from autodrop.nets.shape import ModelShape
from autodrop.training import cache
from autodrop.training.device import data_fits

# Splits and subsets use this seed whatever the search's seed, so that every search (and every
# confirmation run) of one dataset is judged on the same validation images.
SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageData:
    """A dataset ready for training: uint8 images (N, C, H, W) and int64 labels, per split."""

    name: str
    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> ModelShape:
        """What a network must fit to train on these images."""
        return ModelShape(self.channels, self.n_classes, self.image_size)

    def to(self, device: torch.device | str) -> "ImageData":
        """Return the same data on ``device`` (still uint8: a quarter of float32's memory)."""
        return replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            val_images=self.val_images.to(device),
            val_labels=self.val_labels.to(device),
        )


def place_data(data: ImageData, device: torch.device, setting: str = "auto") -> ImageData:
    """Return ``data`` where trials on ``device`` read it: all on the device when ``setting`` is
    ``yes``, or ``auto`` and the images fit there (``device.data_fits``); else as it is, on the host,
    where each batch is gathered and copied over (training/loop.py). On a CPU the images stay
    where they are, a view of the mapped cache file: a copy would only double their memory."""
    if device.type == "cpu" or setting == "no":
        return data
    n_bytes = sum(t.numel() * t.element_size() for t in (data.train_images, data.val_images))
    if setting == "auto" and not data_fits(device, n_bytes):
        return data
    return data.to(device)


def fingerprint(data: ImageData) -> str:
    """Return a sha256 digest of the decoded images and labels of both splits: equal for equal data."""
    digest = hashlib.sha256()
    for tensor in (data.train_images, data.train_labels, data.val_images, data.val_labels):
        digest.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        step = 1 << 24  # hash in chunks: never a second full copy of a large set
        for start in range(0, flat.numel(), step):
            digest.update(flat[start : start + step].numpy())
    return digest.hexdigest()


def load_data(config: DataConfig) -> ImageData:
    """Return the images that ``config`` names, decoded, resized and split."""
    if config.source in BUILTIN_DATASETS:
        images, labels, classes = _load_digits(config.image_size)
        data = _split(config.source, images, labels, classes, config.val_fraction)
    else:
        data = _load_folder(config)
    if config.channels is not None and config.channels != data.channels:
        data = replace(
            data,
            train_images=_to_channels(data.train_images, config.channels),
            val_images=_to_channels(data.val_images, config.channels),
        )
    if config.train_per_class is not None:
        data = _keep_per_class(data, config.train_per_class)
    return data


def _load_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """scikit-learn's bundled 8x8 handwritten digits (no download), upscaled to image_size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values run 0..16; stretch them to the 0..255 of an 8-bit image.
    pixels = torch.from_numpy(digits.images).float().mul_(255.0 / 16.0).unsqueeze(1)
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = pixels.round_().clamp_(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    return images, labels, tuple(str(d) for d in range(10))


def _split(
    name: str, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], val_fraction: float
) -> ImageData:
    """Split stratified by class with the fixed SPLIT_SEED, after checking every class can be split."""
    train_idx, val_idx = (torch.from_numpy(i) for i in _split_indices(labels.numpy(), classes, val_fraction))
    return ImageData(name, classes, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx])


def _split_indices(labels: np.ndarray, classes: Sequence[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the sorted (train, validation) indices of a split stratified by class with SPLIT_SEED."""
    from sklearn.model_selection import train_test_split

    counts = Counter(labels.tolist())
    n = len(labels)
    n_val = math.ceil(val_fraction * n)
    smallest = min(range(len(classes)), key=lambda c: counts[c])
    if counts[smallest] < 2:
        raise DataError(
            f"class {classes[smallest]!r} has {counts[smallest]} readable image(s); each class needs "
            "at least 2 (one to train on, one to validate)."
        )
    if n_val < len(classes) or n - n_val < len(classes):
        raise DataError(
            f"{n} images cannot be split with --val-fraction {val_fraction} so that each of the "
            f"{len(classes)} classes has images on both sides; add images or change --val-fraction."
        )
    train_idx, val_idx = train_test_split(
        np.arange(n), test_size=val_fraction, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(train_idx), np.sort(val_idx)


_SPLITS = ("train_images", "train_labels", "val_images", "val_labels")


def _load_folder(config: DataConfig) -> ImageData:
    root = Path(config.source).expanduser()
    if not root.exists():
        raise DataError(
            f"--data {config.source!r} does not exist; give a folder of class subfolders, or one of: "
            f"{', '.join(BUILTIN_DATASETS)}."
        )
    if not root.is_dir():
        raise DataError(f"--data {config.source!r} is a file; give a folder with one subfolder per class.")
    name = root.resolve().name
    settings: dict[str, Any] = {"image_size": config.image_size, "channels": config.channels}
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_files, classes = _list_classes(root / "train")
        val_files, val_classes = _list_classes(root / "val")
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(f"{root / 'val'} has classes {extra} that {root / 'train'} lacks.")
        groups = [train_files, val_files]

        def build() -> dict[str, cache.Stored]:
            (train_images, train_labels), (val_images, val_labels) = _decode_all(groups, classes, config)
            _require_usable(root / "train", train_labels, classes)
            if len(val_labels) == 0:
                raise DataError(f"{root / 'val'} holds no readable images.")
            return dict(zip(_SPLITS, (train_images, train_labels, val_images, val_labels)))
    else:
        files, classes = _list_classes(root)
        groups = [files]
        # The split is stored, so that training reads both sides straight from the mapped file.
        settings["val_fraction"] = config.val_fraction

        def build() -> dict[str, cache.Stored]:
            ((images, labels),) = _decode_all(groups, classes, config)
            _require_usable(root, labels, classes)
            train_idx, val_idx = _split_indices(labels, classes, config.val_fraction)
            return {"train_images": cache.Rows(images, train_idx), "train_labels": labels[train_idx],
                    "val_images": cache.Rows(images, val_idx), "val_labels": labels[val_idx]}

    settings["classes"] = classes
    arrays = cache.cached_arrays(root, settings, groups, build)
    return ImageData(name, tuple(classes), *(torch.from_numpy(arrays[split]) for split in _SPLITS))


def _list_classes(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{str(root)!r} has no class subfolders; put each class's images in a folder of its own "
            "(e.g. data/cat/1.png, data/dog/2.png)."
        )
    files = [
        (path, class_dir.name)
        for class_dir in class_dirs
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    return files, [d.name for d in class_dirs]


def _decode_all(
    groups: Sequence[Sequence[tuple[Path, str]]], classes: Sequence[str], config: DataConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return (images, labels) for each group of files, every image decoded and resized straight into
    one preallocated uint8 array per group (N, C, H, W); unreadable files are skipped with a warning
    that names them.

    Without ``config.channels`` the arrays start gray and become colour at the first colour image
    (the gray ones so far copied across the channels), so train/ and val/ always match and a gray
    set never takes three times its size.
    """
    from PIL import Image

    index = {c: i for i, c in enumerate(classes)}
    size = config.image_size
    channels = config.channels or 1
    images = [np.empty((len(files), channels, size, size), dtype=np.uint8) for files in groups]
    labels = [np.empty(len(files), dtype=np.int64) for files in groups]
    counts = [0] * len(groups)
    for g, files in enumerate(groups):
        for path, label in files:
            try:
                array = _decode(path, size)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                warnings.warn(f"skipping {path}: too large to decode safely ({e})", AutodropWarning)
                continue
            except Exception as e:  # PIL raises many types for broken or non-image files
                warnings.warn(f"skipping {path}: not a readable image ({type(e).__name__}: {e})", AutodropWarning)
                continue
            if array.ndim == 3 and channels == 1 and config.channels is None:
                channels = 3
                images = [_to_colour(group, n) for group, n in zip(images, counts)]
            _put(images[g][counts[g]], array)
            labels[g][counts[g]] = index[label]
            counts[g] += 1
    return [(group[:n], group_labels[:n]) for group, group_labels, n in zip(images, labels, counts)]


def _to_colour(gray: np.ndarray, n: int) -> np.ndarray:
    """Return a three-channel array of ``gray``'s length holding its first ``n`` images in every channel."""
    colour = np.empty((len(gray), 3, *gray.shape[2:]), dtype=np.uint8)
    colour[:n] = gray[:n]  # gray broadcasts to every channel
    return colour


def _put(slot: np.ndarray, array: np.ndarray) -> None:
    """Write one decoded (H, W) or (H, W, 3) image into its (C, H, W) slot."""
    if array.ndim == 2:
        slot[:] = array[None]  # gray broadcasts to every channel
    elif slot.shape[0] == 1:
        # ITU-R 601 luma, as PIL's convert("L") computes it.
        slot[0] = (array @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)
    else:
        slot[:] = array.transpose(2, 0, 1)


def _decode(path: Path, size: int) -> np.ndarray:
    """Return the image at ``path`` as an (H, W) gray or (H, W, 3) RGB uint8 array, resized."""
    from PIL import Image

    with warnings.catch_warnings():
        # PIL only warns between its two size limits and would then decode the whole image: refuse it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = Image.open(path)
    with opened as image:
        if image.format == "JPEG":
            # Decodes at 1/2, 1/4 or 1/8 scale where that still covers the target size.
            image.draft(None, (size, size))
        image.load()  # decode now, so a truncated file fails here and not later
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # Deep grayscale: scale to 8 bits by the image's own range rather than clipping.
            values = np.asarray(image, dtype=np.float32)
            top = float(values.max()) or 1.0
            image = Image.fromarray((values * (255.0 / top)).clip(0, 255).astype(np.uint8))
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent pixels have arbitrary colour underneath; show them as white.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("L" if image.mode == "LA" else "RGB")
        elif image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode == "1" else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).copy()


def _require_usable(root: Path, labels: np.ndarray, classes: Sequence[str]) -> None:
    if len(labels) == 0:
        raise DataError(f"{str(root)!r} holds no readable images.")
    present = set(labels.tolist())
    if len(present) < 2:
        raise DataError(
            f"{str(root)!r} has readable images in only one class ({classes[next(iter(present))]!r}); "
            "classification needs at least two."
        )


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def _keep_per_class(data: ImageData, per_class: int) -> ImageData:
    """Keep at most ``per_class`` training images of each class, chosen with the fixed split seed."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(data.train_labels), generator=generator)
    kept: list[int] = []
    taken: Counter[int] = Counter()
    for i in order.tolist():
        label = int(data.train_labels[i])
        if taken[label] < per_class:
            taken[label] += 1
            kept.append(i)
    index = torch.tensor(sorted(kept))
    return replace(data, train_images=data.train_images[index], train_labels=data.train_labels[index])
