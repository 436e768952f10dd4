"""A study's precision: stored as the one it trained in, kept on resume, used by all that retrains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import search_on_one_thread, tiny_options

import autodrop
from autodrop.cli import main
from autodrop.config import config_from_options, config_from_sources
from autodrop.errors import ConfigError, StorageError
from autodrop.run import records
from autodrop.run.confirm import confirm_study
from autodrop.run.records import read_study
from autodrop.run.search import create_study, prepare_study
from autodrop.run.storage import open_existing_study
from autodrop.training import device as device_module
from autodrop.training import loop

STUDY = "digits-simple-cnn"


@pytest.fixture(scope="module")
def bf16_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished six-trial digits study trained in bf16 (emulated on a CPU without bf16 units)."""
    return search_on_one_thread(tiny_options(tmp_path_factory.mktemp("bf16"), trials=6, precision="bf16"))


def _stored_precision(storage: str) -> str:
    return read_study(open_existing_study(STUDY, storage).study).config.train.precision


def test_the_study_stores_its_precision_and_the_answer_names_it(bf16_study: dict) -> None:
    assert _stored_precision(bf16_study["options"]["storage"]) == "bf16"
    assert bf16_study["result"].recipe.endswith(", bf16 autocast")


def test_resuming_with_another_precision_is_refused(bf16_study: dict) -> None:
    with pytest.raises(ConfigError, match=r"other settings: precision 'bf16' \(now 'fp32'\)"):
        autodrop.search(**{**bf16_study["options"], "trials": 7, "precision": "fp32"})


def test_auto_goes_on_in_the_study_s_own_precision(bf16_study: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "cpu_capabilities", lambda: {})  # a CPU without bf16 units
    config = config_from_options({**bf16_study["options"], "trials": 7, "precision": "auto", "device": "cpu"})
    assert prepare_study(config).precision == "bf16"


@pytest.mark.parametrize(("reported", "stored"), [({"avx512_bf16": True}, "bf16"), ({}, "fp32")])
def test_auto_stores_what_the_device_computes_natively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       reported: dict, stored: str) -> None:
    monkeypatch.setattr(device_module, "cpu_capabilities", lambda: reported)
    options = tiny_options(tmp_path, device="cpu")
    create_study(config_from_options(options))
    assert _stored_precision(options["storage"]) == stored


def test_an_older_study_without_a_precision_reads_as_fp32_and_auto_is_never_stored(tmp_path: Path) -> None:
    options = tiny_options(tmp_path, precision="bf16")
    create_study(config_from_options(options))
    study = open_existing_study(STUDY, options["storage"]).study
    settings = dict(study.user_attrs[records.SETTINGS_KEY])
    del settings["precision"]
    study.set_user_attr(records.SETTINGS_KEY, settings)
    assert _stored_precision(options["storage"]) == "fp32"
    study.set_user_attr(records.SETTINGS_KEY, {**settings, "precision": "auto"})
    with pytest.raises(StorageError, match="precision 'auto'"):
        read_study(study)


def test_confirm_and_export_retrain_in_the_stored_precision(bf16_study: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from autodrop.outputs.export import export_model

    storage = bf16_study["options"]["storage"]
    asked: list[str] = []
    autocast_for = loop.autocast_for

    def spy(device, precision="auto"):
        asked.append(precision)
        return autocast_for(device, precision)

    monkeypatch.setattr(loop, "autocast_for", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study was made
    try:
        confirm_study(STUDY, storage, n_seeds=2, top=1, device="cpu")
        assert asked and set(asked) == {"bf16"}
        asked.clear()
        confirm_study(STUDY, storage, n_seeds=3, top=1, device="cpu", precision="fp32")  # named: honoured
        assert asked and set(asked) == {"fp32"}
        best = bf16_study["result"].best.number
        empty = tmp_path / "no-artifacts"
        empty.mkdir()
        kept = export_model(STUDY, storage, trial=best, out=tmp_path / "kept.py", weights=tmp_path / "kept.pt",
                            device="cpu")
        retrained = export_model(STUDY, storage, trial=best, out=tmp_path / "again.py",
                                 weights=tmp_path / "again.pt", artifact_dir=empty, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert kept.weights_from != "retrained" and retrained.weights_from == "retrained"
    # Retrained in the study's bf16 with the same seed: the search's weights, bit for bit.
    kept_weights = torch.load(tmp_path / "kept.pt", weights_only=True)
    again_weights = torch.load(tmp_path / "again.pt", weights_only=True)
    for key, value in kept_weights.items():
        assert torch.equal(value, again_weights[key]), key
    assert "bf16 autocast." in (tmp_path / "again.py").read_text()


def test_the_command_line_and_a_spec_take_the_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tmp_path / "study.toml"
    spec.write_text('precision = "bf16"\n')
    assert config_from_sources(str(spec), {}, ()).train.precision == "bf16"
    assert config_from_sources(str(spec), {"precision": "fp32"}, ()).train.precision == "fp32"
    spec.write_text('precision = "half"\n')
    with pytest.raises(ConfigError, match="--precision must be one of auto, fp32, bf16, but got 'half'"):
        config_from_sources(str(spec), {}, ())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--quiet", "--precision", "fp16"])
    assert result.exit_code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in result.output
