"""Memory that grows with the data once: decoding streams into one array, the cache is read
memory-mapped (the arrays trials train on are views of the file), and host-side batching gives the
batches on-device batching gives."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autodrop.config import DataConfig, TrainConfig
from autodrop.training import cache
from autodrop.training import data as data_module
from autodrop.training.cache import CACHE_ENV
from autodrop.training.data import load_data, place_data
from autodrop.training.loop import batches_on_host, epoch_batches, train_trial
from autodrop.training.normaliser import Normaliser

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def mapped_file(tensor: torch.Tensor) -> Path | None:
    """Return the file whose mapping holds ``tensor``'s first and last bytes, or None (anonymous memory)."""
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size() - 1
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= first and last < high:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.fixture
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def _mixed_folder(root: Path, n: int = 8) -> Path:
    """Gray, colour, transparent and palette images of several sizes, in two classes."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = (9 + i, 7 + 2 * i)
            pixels = rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8)
            mode = ("L", "RGB", "RGBA", "P")[(i + c) % 4]
            image = Image.fromarray(pixels, "RGBA")
            image = image.convert("RGB").convert("P") if mode == "P" else image.convert(mode)
            image.save(root / name / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    return root


def _gray_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), "L").save(root / name / f"{i}.png")
    return root


def _listed_then_stacked(root: Path, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The decoding autodrop did before streaming: a list of decoded images, then one stacked copy."""
    files, classes = data_module._list_classes(root)
    decoded = []
    for path, label in files:
        try:
            decoded.append((data_module._decode(path, config.image_size), label))
        except Exception:
            pass
    channels = config.channels or (1 if all(a.ndim == 2 for a, _ in decoded) else 3)
    images = np.empty((len(decoded), channels, config.image_size, config.image_size), dtype=np.uint8)
    for i, (array, _) in enumerate(decoded):
        if array.ndim == 2:
            images[i] = array[None]
        elif channels == 1:
            images[i, 0] = (array @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)
        else:
            images[i] = array.transpose(2, 0, 1)
    labels = np.array([classes.index(label) for _, label in decoded], dtype=np.int64)
    return images, labels


@pytest.mark.parametrize("channels", [None, 1, 3])
@pytest.mark.parametrize("folder", [_mixed_folder, _gray_folder])
def test_streaming_decode_gives_the_arrays_list_and_stack_decoding_gave(tmp_path, folder, channels) -> None:
    root = folder(tmp_path / "images")
    config = DataConfig(source=str(root), image_size=12, channels=channels)
    expected_images, expected_labels = _listed_then_stacked(root, config)
    files, classes = data_module._list_classes(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broken file's
        ((images, labels),) = data_module._decode_all([files], classes, config)
    assert images.dtype == np.uint8 and images.shape == expected_images.shape
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


@pytest.mark.parametrize("cache_on", [True, False])
def test_loaded_split_matches_splitting_the_decoded_images(tmp_path, monkeypatch, cache_on) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache") if cache_on else "off")
    root = _mixed_folder(tmp_path / "images", n=12)
    config = DataConfig(source=str(root), image_size=12, val_fraction=0.25)
    images, labels = _listed_then_stacked(root, config)
    expected = data_module._split("images", torch.from_numpy(images), torch.from_numpy(labels), ("a", "b"), 0.25)
    for _ in range(2):  # built, then (with the cache) read back
        with pytest.warns():
            data = load_data(config)
        for name in ("train_images", "train_labels", "val_images", "val_labels"):
            assert torch.equal(getattr(data, name), getattr(expected, name)), name


@linux_only
def test_cached_images_are_views_of_the_mapped_file_through_training(tmp_path, cache_folder) -> None:
    root = _gray_folder(tmp_path / "images", n=20)
    config = DataConfig(source=str(root), image_size=16)
    for attempt in ("built", "read again"):
        data = load_data(config)
        (cache_file,) = cache_folder.glob("*" + cache.SUFFIX)
        for name in ("train_images", "val_images", "train_labels", "val_labels"):
            assert mapped_file(getattr(data, name)) == cache_file, (attempt, name)
    cpu = torch.device("cpu")
    for setting in ("auto", "yes", "no"):
        placed = place_data(data, cpu, setting)
        assert placed.train_images.data_ptr() == data.train_images.data_ptr()  # no copy on a CPU


@linux_only
def test_a_search_trains_on_the_mapped_file(tmp_path, cache_folder) -> None:
    """What each worker process does (run/search._worker_main: prepare_study, then StudyTrials)."""
    from autodrop.config import config_from_options
    from autodrop.run.progress import Progress
    from autodrop.run.search import prepare_study
    from autodrop.run.trials import StudyTrials

    root = _gray_folder(tmp_path / "images", n=20)
    config = config_from_options({"data": str(root), "image-size": 16, "epochs": 1, "trials": 2,
                                  "storage": f"sqlite:///{tmp_path / 'study.db'}", "device": "cpu"})
    prepare_study(config)  # the parent process builds the cache
    prepared = prepare_study(config)  # a worker reads it
    trials = StudyTrials(prepared, config, torch.device("cpu"), Progress(), pack=1)
    (cache_file,) = cache_folder.glob("*" + cache.SUFFIX)
    assert mapped_file(trials.trainer.data.train_images) == cache_file
    assert mapped_file(trials.trainer.data.val_images) == cache_file


def test_a_freshly_built_cache_with_no_room_stays_in_memory(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    root = _gray_folder(tmp_path / "images")
    with pytest.warns(match="cannot write the decoded-image cache"):
        data = load_data(DataConfig(source=str(root), image_size=8))
    assert not isinstance(data.train_images.numpy(), np.memmap)
    assert len(data.train_labels) + len(data.val_labels) == 12


def _data(n: int = 50):
    from autodrop.training.data import ImageData

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 3
    return ImageData("t", ("0", "1", "2"), images, labels, images[:10].clone(), labels[:10].clone())


def test_host_batches_are_the_device_batches_for_a_seed() -> None:
    data, device = _data(), torch.device("cpu")
    runs = []
    for on_host in (False, True):
        generator = torch.Generator().manual_seed(7)
        runs.append([(x.clone(), y.clone()) for _ in range(2)
                     for x, y in epoch_batches(data, 16, generator, device, on_host=on_host)])
    assert len(runs[0]) == len(runs[1]) == 2 * 4  # 50 images: three of 16 and one of 2, per epoch
    for (x0, y0), (x1, y1) in zip(*runs):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_a_trial_trained_from_host_batches_matches_one_from_device_batches() -> None:
    from autodrop.nets.build import build_model

    data, device = _data(), torch.device("cpu")
    normaliser = Normaliser(data.train_images)
    results = []
    for setting in ("auto", "no"):
        config = TrainConfig(epochs=2, batch_size=16, device="cpu", data_on_device=setting)
        placed = place_data(data, device, setting)
        assert batches_on_host(placed, device, config) == (setting == "no")
        torch.manual_seed(0)
        model = build_model("simple-cnn", data.shape)
        results.append(train_trial(model, placed, normaliser, config, seed=3, device=device))
    assert results[0] == results[1]


def test_normaliser_statistics_in_chunks_match_the_whole_set(monkeypatch) -> None:
    from autodrop.training import normaliser as normaliser_module

    images = _data(40).train_images
    whole = Normaliser(images)
    monkeypatch.setattr(normaliser_module, "_CHUNK_VALUES", 3 * 8 * 8 * 3)  # three images a chunk
    chunked = Normaliser(images)
    floats = images.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(whole.scale.flatten(), (1 / floats.std(dim=1)).float())
    assert torch.equal(whole.scale, chunked.scale) and torch.equal(whole.shift, chunked.shift)


def test_a_pack_trained_from_host_batches_matches_one_from_device_batches() -> None:
    from autodrop.nets.build import build_model
    from autodrop.training.loop import Member
    from autodrop.training.packed import PackTrainer

    data, device = _data(), torch.device("cpu")
    normaliser = Normaliser(data.train_images)
    results = []
    for setting in ("auto", "no"):
        config = TrainConfig(epochs=2, batch_size=16, device="cpu", data_on_device=setting)
        trainer = PackTrainer(place_data(data, device, setting), normaliser, config, device=device, seed=0,
                              build=lambda: build_model("simple-cnn", data.shape), capacity=2)
        assert trainer.on_host == (setting == "no")
        models = []
        for seed in range(2):
            torch.manual_seed(seed)
            models.append(build_model("simple-cnn", data.shape))
        trainer.set_members([Member(i, m, seed=i) for i, m in enumerate(models)])
        results.append([trainer.run_epoch() for _ in range(2)])
    assert results[0] == results[1]


def _train_images_file(config: DataConfig) -> str | None:
    """In a worker process: load the data as a search's worker does, and say which file its training images map."""
    found = mapped_file(load_data(config).train_images)
    return None if found is None else str(found)


@linux_only
def test_worker_processes_map_the_one_cache_file(tmp_path, cache_folder) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = _gray_folder(tmp_path / "images", n=20)
    config = DataConfig(source=str(root), image_size=16)
    load_data(config)  # the parent builds the cache, as prepare_study does before workers start
    (cache_file,) = cache_folder.glob("*" + cache.SUFFIX)
    # Spawned, as run/processes.py starts workers; they inherit the cache folder through the environment.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        found = list(pool.map(_train_images_file, [config, config]))
    assert found == [str(cache_file)] * 2
