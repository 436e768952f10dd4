"""End to end: `autodrop search` on users' networks, from the command line and from Python."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from autodrop.api import search
from autodrop.cli import main
from autodrop.errors import AutodropWarning
from autodrop.outputs.results import load_results

ROOT = Path(__file__).resolve().parents[2]
FORUM = f"{ROOT / 'studies' / 'forum_net.py'}:Net"
USER = ROOT / "tests" / "user_models.py"
# A trial in a second or two on a 2-core CPU: 10 images per class, 16x16, one epoch.
TINY = dict(data="digits", image_size=16, train_per_class=10, epochs=1, batch_size=32, trials=3, pruner="none")


def _search(tmp_path: Path, model: str, **options):
    settings = {**TINY, **options, "model": model, "storage": f"sqlite:///{tmp_path / 'study.db'}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutodropWarning)
        return search(**settings)


@pytest.mark.slow
def test_search_on_the_forum_network_from_its_study_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = CliRunner().invoke(main, [
        "search", "--config", "studies/forum.toml", "--image-size", "16", "--train-per-class", "10", "--epochs", "1",
        "--trials", "3", "--batch-size", "32", "--model-arg", "width=4", "--storage", storage, "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "after:conv21#2" in result.output and "dropout#2" in result.output
    stored = load_results("forum-net", storage)
    assert stored.n_complete == 3
    assert stored.settings["model"] == FORUM
    assert stored.settings["model-args"] == {"width": 4}
    assert list(stored.sites)[:2] == ["after:conv1", "after:conv11#1"]
    head = next(b for b in stored.baselines if b.baseline == "head")
    assert head.placement["dropout#1"] == 0.5 and head.placement["after:conv1"] is None


@pytest.mark.slow
def test_search_on_a_residual_network_with_functional_activations(tmp_path):
    result = _search(tmp_path, f"{USER}:ResidualNet", model_args={"width": 4})
    assert list(result.sites) == ["after:stem", "after:conv_a", "after:add", "F.dropout"]
    assert result.n_complete == 3
    assert result.best is not None and result.best.val_accuracy is not None


@pytest.mark.slow
def test_search_on_torchvision_resnet18(tmp_path):
    result = _search(tmp_path, "torchvision:resnet18", trials=2)
    assert list(result.sites)[0] == "after:conv1" and list(result.sites)[-1] == "before:fc"
    # After the stem, one tied site inside each of the 4 stages, after each of the 8 blocks, before fc.
    assert len(result.sites) == 14 and "in:layer3:conv1" in result.sites
    assert result.n_complete == 2


@pytest.mark.slow
def test_search_on_an_untraceable_network_uses_hooks(tmp_path):
    result = _search(tmp_path, f"{USER}:BranchyNet", trials=2)
    assert result.sites == {"drop": "conv", "after:conv2": "conv", "before:fc": "fc"}
    assert result.n_complete == 2


@pytest.mark.slow
def test_a_rerun_with_the_same_user_model_resumes_the_study(tmp_path):
    _search(tmp_path, f"{USER}:ResidualNet", trials=2)
    result = _search(tmp_path, f"{USER}:ResidualNet", trials=3)
    assert result.n_complete == 3
