"""Data: decode once into uint8 tensors, split stratified, and refuse what cannot be used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import write_image_folder

from autodrop.config import DataConfig
from autodrop.errors import AutodropWarning, DataError
from autodrop.training.data import load_data


def test_digits_is_the_real_bundled_set_split_stratified():
    data = load_data(DataConfig(source="digits", image_size=16))
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == (1, 16, 16)
    assert len(data.train_labels) + len(data.val_labels) == 1797
    assert len(data.val_labels) == 360
    assert data.n_classes == 10
    val_counts = torch.bincount(data.val_labels, minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # each class keeps its share


def test_the_split_is_fixed_whatever_else_changes():
    first = load_data(DataConfig(source="digits", image_size=8))
    second = load_data(DataConfig(source="digits", image_size=8))
    assert torch.equal(first.val_images, second.val_images)


def test_folder_of_class_subfolders_is_split_by_val_fraction(image_folder):
    data = load_data(DataConfig(source=str(image_folder), image_size=8, val_fraction=0.3))
    assert data.classes == ("a", "b", "c")
    assert len(data.val_labels) == 9 and len(data.train_labels) == 21
    assert sorted(torch.bincount(data.val_labels).tolist()) == [3, 3, 3]
    assert data.channels == 1 and data.image_size == 8


def test_folder_with_train_and_val_is_used_as_given(tmp_path):
    write_image_folder(tmp_path / "d" / "train", {"x": 4, "y": 5})
    write_image_folder(tmp_path / "d" / "val", {"x": 2, "y": 1})
    data = load_data(DataConfig(source=str(tmp_path / "d"), image_size=8))
    assert len(data.train_labels) == 9 and len(data.val_labels) == 3
    assert data.val_labels.tolist() == [0, 0, 1]


def test_gray_rgb_rgba_and_palette_images_of_any_size_become_one_tensor(tmp_path):
    root = tmp_path / "mixed"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        rgb = Image.fromarray(np.full((20, 30, 3), 100, np.uint8), "RGB")
        rgb.save(root / name / "rgb.png")
        rgb.convert("L").resize((7, 7)).save(root / name / "gray.png")
        rgba = Image.fromarray(np.zeros((9, 9, 4), np.uint8), "RGBA")  # fully transparent
        rgba.save(root / name / "rgba.png")
        rgb.convert("P").save(root / name / "palette.png")
        rgb.save(root / name / "photo.jpg")
    data = load_data(DataConfig(source=str(root), image_size=10, val_fraction=0.5))
    assert data.channels == 3  # colour present, so colour is kept
    assert data.train_images.shape[1:] == (3, 10, 10)
    all_images = torch.cat([data.train_images, data.val_images])
    # A transparent image shows as white, not as the black underneath.
    assert (all_images.flatten(1).float().mean(1) == 255).sum() == 2
    gray = load_data(DataConfig(source=str(root), image_size=10, val_fraction=0.5, channels=1))
    assert gray.train_images.shape[1:] == (1, 10, 10)


def test_broken_and_non_image_files_are_skipped_with_a_warning_naming_them(image_folder):
    (image_folder / "a" / "notes.txt").write_text("not an image")
    good = (image_folder / "b" / "0.png").read_bytes()
    (image_folder / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(AutodropWarning) as caught:
        data = load_data(DataConfig(source=str(image_folder), image_size=8))
    messages = " ".join(str(w.message) for w in caught)
    assert "notes.txt" in messages and "truncated.png" in messages
    assert len(data.train_labels) + len(data.val_labels) == 30


def test_train_per_class_keeps_that_many_of_each_class():
    data = load_data(DataConfig(source="digits", image_size=8, train_per_class=7))
    assert torch.bincount(data.train_labels).tolist() == [7] * 10
    assert len(data.val_labels) == 360  # validation is untouched


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class subfolders"),
        (lambda root: write_image_folder(root, {"only": 5}), "only one class"),
        (lambda root: write_image_folder(root, {"a": 5, "b": 1}), "class 'b' has 1"),
        (lambda root: (root / "a").mkdir(parents=True) or (root / "b").mkdir(), "no readable images"),
    ],
    ids=["missing", "empty", "one-class", "class-too-small", "no-images"],
)
def test_unusable_folders_are_refused_with_a_clear_reason(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(source=str(root), image_size=8))


def test_a_folder_whose_only_files_are_broken_is_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(AutodropWarning), pytest.raises(DataError, match="no readable images"):
        load_data(DataConfig(source=str(tmp_path / "d"), image_size=8))


def test_images_over_pils_size_limits_are_skipped_with_a_warning_naming_them(image_folder, monkeypatch):
    # 40x40 lies between PIL's warning and error limits once MAX_IMAGE_PIXELS is 1000; 50x50 is beyond both.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 40), 128).save(image_folder / "a" / "warned.png")
    Image.new("L", (50, 50), 128).save(image_folder / "b" / "refused.png")
    with pytest.warns(AutodropWarning) as caught:
        data = load_data(DataConfig(source=str(image_folder), image_size=8))
    messages = [str(w.message) for w in caught if issubclass(w.category, AutodropWarning)]
    for name in ("warned.png", "refused.png"):
        assert any(name in m and "too large to decode safely" in m for m in messages), messages
    assert len(data.train_labels) + len(data.val_labels) == 30


def test_large_jpegs_are_decoded_at_reduced_size_when_that_covers_the_target(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    from autodrop.training.data import _decode

    path = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=90)
    loaded_sizes = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        loaded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    small = _decode(path, 32)
    assert loaded_sizes[0] == (80, 60)  # an eighth of 640x480, still at least 32 on each side
    assert small.shape == (32, 32, 3)
    with Image.open(path) as full:
        reference = np.asarray(full.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    assert abs(float(small.mean()) - float(reference.mean())) < 2
