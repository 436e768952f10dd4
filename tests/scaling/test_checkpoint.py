"""Per-epoch checkpoints: a resumed trial trains on as if it had never stopped."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from autodrop.config import TrainConfig
from autodrop.errors import AutodropWarning
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.sites import apply_placement, site_kinds
from autodrop.run.checkpoints import checkpoint_path
from autodrop.training.checkpoint import load_checkpoint, save_checkpoint
from autodrop.training.data import ImageData
from autodrop.training.loop import TrainingState, train_trial
from autodrop.training.normaliser import Normaliser

CPU = torch.device("cpu")
UUID = "0123456789abcdef0123456789abcdef"
OWNER = {"study": UUID, "trial": 0, "placement": "conv1=0.3", "seed": 3, "epochs": 4}


@pytest.fixture(scope="module")
def data() -> ImageData:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    images = torch.randint(0, 120, (60, 1, 16, 16), generator=generator, dtype=torch.uint8)
    for c in range(3):
        images[labels == c, :, :, c * 5 : c * 5 + 6] += 100
    return ImageData("tiny", ("a", "b", "c"), images[:45], labels[:45], images[45:], labels[45:])


def _model(data: ImageData) -> torch.nn.Module:
    torch.manual_seed(7)
    model = build_model("simple-cnn", ModelShape(1, 3, 16))
    apply_placement(model, {site: 0.3 for site in site_kinds(model)})  # dropout on: its masks must resume too
    return model


FULL_RECIPE = {"augment": ("flip", "crop", "cutout"), "weight_decay": 5e-4, "lr_schedule": "cosine",
               "label_smoothing": 0.1}


@pytest.mark.parametrize(("schedule", "dies_after", "recipe"), [
    ("whole", 1, {}),
    ("early", 3, {}),
    # Every option of the recipe on: the schedule's step and the augmentation draws resume too.
    ("whole", 2, {**FULL_RECIPE, "optimizer": "adam"}),
    ("early", 1, {**FULL_RECIPE, "optimizer": "sgd", "lr_schedule": "onecycle"}),
])
def test_resumed_training_matches_uninterrupted_training(data: ImageData, tmp_path: Path, schedule: str,
                                                         dies_after: int, recipe: dict) -> None:
    torch.set_num_threads(1)
    # With the early schedule, dropout is off from epoch 3: a trial resumed at epoch 4 must not turn it on again.
    config = TrainConfig(epochs=4, batch_size=16, device="cpu", schedule=schedule, **recipe)
    normaliser = Normaliser(data.train_images)

    straight = _model(data)
    expected = train_trial(straight, data, normaliser, config, seed=3, device=CPU)

    path = checkpoint_path(tmp_path, "study", UUID, 0)
    first = _model(data)

    class Died(Exception):
        pass

    def save_then_die(state: TrainingState) -> None:
        save_checkpoint(path, state, OWNER)
        if state.metrics.epoch == dies_after:
            raise Died  # the worker dies right after this checkpoint

    with pytest.raises(Died):
        train_trial(first, data, normaliser, config, seed=3, device=CPU, on_checkpoint=save_then_die)

    resume = load_checkpoint(path, CPU, OWNER, config.epochs)
    assert resume is not None and resume.metrics.epoch == dies_after
    epochs_seen: list[int] = []
    resumed = _model(data)  # fresh weights: everything must come from the checkpoint
    got = train_trial(resumed, data, normaliser, config, seed=3, device=CPU, resume=resume,
                      on_epoch=lambda m: epochs_seen.append(m.epoch))
    assert epochs_seen == list(range(dies_after + 1, 5))
    assert got == expected
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_a_checkpoint_is_used_only_by_its_own_trial_and_up_to_its_last_epoch(data: ImageData, tmp_path: Path) -> None:
    config = TrainConfig(epochs=2, batch_size=16, device="cpu")
    path = checkpoint_path(tmp_path, "study", UUID, 1)
    states: list[TrainingState] = []
    train_trial(_model(data), data, Normaliser(data.train_images), config, seed=1, device=CPU,
                on_checkpoint=states.append)
    owner = dict(OWNER, trial=1, epochs=2)
    save_checkpoint(path, states[0], owner)
    assert load_checkpoint(path, CPU, owner, 2) is not None
    for key, other in (("study", "f" * 32), ("trial", 2), ("placement", "fc1=0.5"), ("seed", 4), ("epochs", 3)):
        with pytest.warns(AutodropWarning, match="belongs to another study, trial or setting"):
            assert load_checkpoint(path, CPU, dict(owner, **{key: other}), 2) is None
    # Saved after the last epoch (killed before the trial was told): a retry only has to tell it.
    save_checkpoint(path, states[1], owner)
    resume = load_checkpoint(path, CPU, owner, 2)
    assert resume is not None and resume.metrics.epoch == 2
    with pytest.warns(AutodropWarning, match="not one of the trial's 1"):
        assert load_checkpoint(path, CPU, owner, 1) is None


def test_missing_or_broken_checkpoint_starts_over_with_a_warning(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.pt"
    with pytest.warns(AutodropWarning, match="starts over from epoch 1"):
        assert load_checkpoint(missing, CPU, OWNER, 4) is None
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.warns(AutodropWarning, match="is not used"):
        assert load_checkpoint(broken, CPU, OWNER, 4) is None


def test_failed_checkpoint_write_keeps_the_previous_one(data: ImageData, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(epochs=1, batch_size=16, device="cpu")
    states: list[TrainingState] = []
    train_trial(_model(data), data, Normaliser(data.train_images), config, seed=0, device=CPU,
                on_checkpoint=states.append)
    path = checkpoint_path(tmp_path, "my study/v2", UUID, 3)
    assert path.parent.name == "my-study-v2-0123456789ab" and path.name == "trial-3.pt"
    owner = dict(OWNER, trial=3, epochs=2)
    save_checkpoint(path, states[0], owner)
    before = path.read_bytes()

    def dies_halfway(payload: object, target: Path) -> None:
        Path(target).write_bytes(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        save_checkpoint(path, states[0], owner)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["trial-3.pt"]  # no half-written file left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.undo()
        assert load_checkpoint(path, CPU, owner, 2) is not None


def test_a_folder_removed_while_saving_is_made_again(data: ImageData, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    states: list[TrainingState] = []
    train_trial(_model(data), data, Normaliser(data.train_images), TrainConfig(epochs=2, batch_size=16, device="cpu"),
                seed=0, device=CPU, on_checkpoint=states.append)
    path = checkpoint_path(tmp_path, "study", UUID, 5)
    real_save = torch.save
    calls = {"n": 0}

    def folder_vanishes_once(payload: object, target: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            # Another worker's finished trial removed the emptied folder; torch reports a RuntimeError.
            path.parent.rmdir()
            raise RuntimeError("File ... cannot be opened.")
        real_save(payload, target)

    monkeypatch.setattr(torch, "save", folder_vanishes_once)
    save_checkpoint(path, states[0], dict(OWNER, trial=5, epochs=2))
    assert path.exists() and calls["n"] == 2
