"""A study's training recipe: stored with it, shown with the answer, and used by all that retrains."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import search_on_one_thread, tiny_options

import autodrop
from autodrop.cli import main
from autodrop.config import TrainConfig
from autodrop.errors import ConfigError
from autodrop.outputs.text import format_result
from autodrop.run.confirm import (
    CONFIRM_SEED_BASE,
    Candidate,
    CandidateTrainer,
    confirm_study,
)
from autodrop.run.records import placement_key, read_confirmation_runs, read_study
from autodrop.run.storage import open_existing_study
from autodrop.training.data import load_data

RECIPE = dict(optimizer="sgd", augment="flip,crop", weight_decay=5e-4, lr_schedule="cosine", label_smoothing=0.1)
RECIPE_WORDS = "SGD (Nesterov) 0.05, cosine, weight decay 0.0005, flip+crop, label smoothing 0.1, batch 64, 2 epochs, float32"


@pytest.fixture(scope="module")
def recipe_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished six-trial digits study trained with a realistic recipe, made on one thread."""
    return search_on_one_thread(tiny_options(tmp_path_factory.mktemp("recipe"), trials=6, **RECIPE))


def test_the_answer_names_the_recipe_it_holds_for(recipe_study: dict) -> None:
    result = recipe_study["result"]
    assert result.recipe == RECIPE_WORDS
    assert f"Trained with {RECIPE_WORDS}: the answer holds for this recipe." in format_result(result)
    stored = autodrop.load_results("digits-simple-cnn", storage=recipe_study["options"]["storage"])
    assert stored.recipe == RECIPE_WORDS


def test_the_recipe_is_stored_with_the_study(recipe_study: dict) -> None:
    study = open_existing_study("digits-simple-cnn", recipe_study["options"]["storage"]).study
    train = read_study(study).config.train
    assert (train.optimizer, train.augment, train.weight_decay, train.lr_schedule, train.label_smoothing) == (
        "sgd", ("flip", "crop"), 5e-4, "cosine", 0.1)
    assert train.learning_rate == 0.05  # SGD's own default, stored as the value used


@pytest.mark.parametrize("change", [
    {"augment": "flip"}, {"augment": "none"}, {"weight_decay": 0.0}, {"optimizer": "adam"},
    {"lr_schedule": "onecycle"}, {"label_smoothing": 0.0}, {"lr": 0.01},
])
def test_resuming_with_another_recipe_is_refused(recipe_study: dict, change: dict) -> None:
    key = next(iter(change)).replace("_", "-")
    with pytest.raises(ConfigError, match=f"other settings: .*{key}"):
        autodrop.search(**{**recipe_study["options"], "trials": 7, **change})


def test_confirm_retrains_with_the_stored_recipe(recipe_study: dict) -> None:
    storage = recipe_study["options"]["storage"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        confirm_study("digits-simple-cnn", storage, n_seeds=2, top=1, device="cpu")
        study = open_existing_study("digits-simple-cnn", storage).study
        record = read_study(study)
        runs = read_confirmation_runs(study)
        none = Candidate("none", 0, "none", {site: None for site in record.sites}, {})
        stored = runs[placement_key(none.placement, none.variants)][str(CONFIRM_SEED_BASE)]
        # The same seed trained here with the study's recipe gives the stored run; with the plain one it does not.
        images = load_data(record.config.data)
        again = CandidateTrainer(record.config, images, device="cpu")
        again.train(none, 1)
        plain = dataclasses.replace(record.config, train=TrainConfig(epochs=2, batch_size=64, device="cpu"))
        other = CandidateTrainer(plain, images, device="cpu")
        other.train(none, 1)
    finally:
        torch.set_num_threads(threads)
    assert again.runs[none.key][str(CONFIRM_SEED_BASE)] == stored
    assert other.runs[none.key][str(CONFIRM_SEED_BASE)] != stored


def test_export_retrains_with_the_stored_recipe_and_names_it(recipe_study: dict, tmp_path: Path) -> None:
    from autodrop.outputs.export import export_model

    storage = recipe_study["options"]["storage"]
    best = recipe_study["result"].best.number
    empty = tmp_path / "no-artifacts"
    empty.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study was made
    try:
        kept = export_model("digits-simple-cnn", storage, trial=best, out=tmp_path / "kept.py",
                            weights=tmp_path / "kept.pt", device="cpu")
        retrained = export_model("digits-simple-cnn", storage, trial=best, out=tmp_path / "again.py",
                                 weights=tmp_path / "again.pt", artifact_dir=empty, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert kept.weights_from != "retrained" and retrained.weights_from == "retrained"
    # Same seed, same recipe, same device: the retrained weights are the search's, bit for bit.
    kept_weights = torch.load(tmp_path / "kept.pt", weights_only=True)
    again_weights = torch.load(tmp_path / "again.pt", weights_only=True)
    assert kept_weights.keys() == again_weights.keys()
    for key, value in kept_weights.items():
        assert torch.equal(value, again_weights[key]), key
    assert f"# Trained with {RECIPE_WORDS}." in (tmp_path / "again.py").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--augment", "flip,rotate"], "--augment must be none or a comma-separated list of flip, crop, cutout"),
    (["--augment", "flip,flip"], "--augment must be none"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0 and below 1, but got -0.1"),
    (["--weight-decay", "5"], "--weight-decay must be at least 0 and below 1, but got 5.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be at least 0 and below 1, but got 1.0"),
    (["--label-smoothing", "nan"], "--label-smoothing must be at least 0 and below 1, but got nan"),
    (["--lr-schedule", "linear"], "'linear' is not one of 'constant', 'cosine', 'onecycle'"),
    (["--optimizer", "rmsprop"], "'rmsprop' is not one of 'adam', 'sgd'"),
])
def test_bad_recipe_input_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_spec_and_the_api_take_the_recipe_keys(tmp_path: Path) -> None:
    from autodrop.config import config_from_sources

    spec = tmp_path / "photos.toml"
    spec.write_text('augment = ["flip", "crop"]\nweight-decay = 5e-4\nlr-schedule = "cosine"\n'
                    'optimizer = "sgd"\nlabel-smoothing = 0.1\nlr = 0.1\n')
    config = config_from_sources(str(spec), {"weight_decay": 1e-3}, ())
    assert config.train == dataclasses.replace(config.train, augment=("flip", "crop"), weight_decay=1e-3,
                                               lr_schedule="cosine", optimizer="sgd", label_smoothing=0.1, lr=0.1)
    with pytest.raises(ConfigError, match="--augment"):
        autodrop.search(**tiny_options(tmp_path, augment=["flip", "spin"]))


def test_the_readme_colour_study_runs_on_the_shapes_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from PIL import Image

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    assert "python benchmarks/planted.py shapes shapes" in readme
    assert "autodrop search --config studies/photos.toml" in readme
    monkeypatch.chdir(tmp_path)
    made = subprocess.run([sys.executable, str(repo / "benchmarks" / "planted.py"), "shapes", "shapes",
                           "--per-class", "12"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "shapes").iterdir()) == ["disc", "ring", "square", "triangle"]
    assert Image.open(next((tmp_path / "shapes" / "disc").iterdir())).mode == "RGB"
    # The spec as shipped, shortened: the recipe is the spec's.
    result = CliRunner().invoke(main, ["search", "--config", str(repo / "studies" / "photos.toml"), "--trials", "2",
                                       "--epochs", "1", "--image-size", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("Trained with SGD (Nesterov) 0.05, cosine, weight decay 0.0005, flip+crop, label smoothing 0.1, "
            "batch 64, 1 epoch, float32:") in result.output
    assert "data shapes (38 train / 10 val images)" in result.output
