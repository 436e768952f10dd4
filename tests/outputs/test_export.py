"""autodrop export: the trial as plain PyTorch source and weights, checked from outside autodrop."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from autodrop.cli import main
from autodrop.nets.builtin import BUILTIN_MODELS

# Run in a fresh interpreter: -I ignores PYTHONPATH and the working folder, and autodrop is made
# unimportable, so the exported file can only work if it needs nothing but torch.
EVALUATE = r"""
import importlib.util, json, sys
sys.modules["autodrop"] = None  # any 'import autodrop' now fails
import torch
source, weights, tensors = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("winner", source)
winner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(winner)
classes = [v for v in vars(winner).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)]
model = classes[-1]()  # the network's class comes last, after any helper layers the file defines
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval()
val = torch.load(tensors, weights_only=True)
with torch.no_grad():
    predicted = model(winner.normalise(val["images"])).argmax(dim=1)
dropouts = {name: m.p for name, m in model.named_modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))}
print(json.dumps({"accuracy": (predicted == val["labels"]).float().mean().item(),
                  "correct": int((predicted == val["labels"]).sum()), "n": len(val["labels"]),
                  "dropouts": dropouts, "autodrop_loaded": sys.modules.get("autodrop") is not None}))
"""


@pytest.fixture(scope="module")
def val_tensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study's validation split, computed by autodrop and saved for the fresh interpreter."""
    import torch

    from autodrop.config import DataConfig
    from autodrop.training.data import load_data

    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=30))
    path = tmp_path_factory.mktemp("val") / "val.pt"
    torch.save({"images": data.val_images, "labels": data.val_labels}, path)
    return path


def evaluate_outside(source: Path, weights: Path, tensors: Path, cwd: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-I", "-c", EVALUATE, str(source), str(weights), str(tensors)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_exported_best_trial_reproduces_recorded_accuracy_without_autodrop(tiny_study, val_tensors, tmp_path):
    out, weights = tmp_path / "winner.py", tmp_path / "winner.pt"
    result = CliRunner().invoke(
        main, ["export", "--storage", tiny_study.url, "--study", tiny_study.name, "--out", str(out),
               "--weights", str(weights)],
    )
    assert result.exit_code == 0, result.output
    assert "stored weights" in result.output
    study = tiny_study.load()
    best = study.best_trial
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    measured = evaluate_outside(out, weights, val_tensors, elsewhere)
    assert measured["autodrop_loaded"] is False
    assert measured["n"] == study.user_attrs["autodrop.data"]["n_val"]
    assert measured["correct"] / measured["n"] == best.value  # exactly: the stored weights were used
    # The chosen rates are in the source as nn.Dropout or nn.Dropout2d layers, and only there.
    on = {k: v for k, v in best.params.items() if k.endswith(".p")}
    assert sorted(round(p, 3) for p in measured["dropouts"].values()) == sorted(round(p, 3) for p in on.values())


def test_exported_source_reads_like_hand_written_torch(tiny_study, tmp_path):
    from autodrop.outputs.export import export_model

    study = tiny_study.load()
    trial = study.trials[1]  # the "head" baseline: dropout 0.5 before fc1 and fc2
    assert trial.user_attrs["baseline"] == "head"
    export_model(tiny_study.name, tiny_study.url, trial=1, out=tmp_path / "head.py")
    source = (tmp_path / "head.py").read_text()
    assert "import autodrop" not in source and "from autodrop" not in source
    assert "class SimpleCNN(nn.Module):" in source
    assert "self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False)" in source
    assert "self.drop_fc1 = nn.Dropout(p=0.5)" in source and "self.drop_fc2 = nn.Dropout(p=0.5)" in source
    assert "drop_conv1" not in source  # an off site makes no layer
    assert "x = self.drop_fc1(x)" in source
    assert "trial 1" in source.splitlines()[0] and repr(tiny_study.name) in source.splitlines()[0]
    assert f"seed {trial.user_attrs['seed']}" in source


def test_export_without_kept_weights_retrains_with_the_trial_seed(tiny_study, tmp_path):
    from autodrop.outputs.export import export_model

    empty = tmp_path / "no-artifacts"
    empty.mkdir()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study was made: see the tiny_study fixture
    try:
        result = export_model(
            tiny_study.name, tiny_study.url, trial=0, out=tmp_path / "w.py", weights=tmp_path / "w.pt",
            artifact_dir=empty, device="cpu",
        )
    finally:
        torch.set_num_threads(threads)
    assert result.weights_from == "retrained"
    assert "No stored weights for trial 0: retrained it with its seed" in result.describe()
    # Same seed, same device: the retrained network scores (about) what the trial recorded.
    assert result.retrained_accuracy == pytest.approx(result.val_accuracy, abs=0.03)
    assert (tmp_path / "w.pt").stat().st_size > 0


def test_tampered_site_name_is_refused_and_nothing_written(tiny_study, tmp_path):
    copy = tiny_study.copy_to(tmp_path / "tampered")
    study = copy.load()
    sites = dict(study.user_attrs["autodrop.sites"])
    sites["x); import os; ("] = sites.pop("fc2")
    study.set_user_attr("autodrop.sites", sites)
    out = tmp_path / "evil.py"
    result = CliRunner().invoke(main, ["export", "--storage", copy.url, "--out", str(out)])
    assert result.exit_code == 2
    assert "Error:" in result.output and "drop sites autodrop does not write" in result.output
    assert not out.exists()


def test_tampered_rate_is_refused(tiny_study, tmp_path):
    copy = tiny_study.copy_to(tmp_path / "tampered")
    with sqlite3.connect(copy.db) as db:  # trial 1 (head) has fc1.p = 0.5; make it 5
        db.execute(
            "UPDATE trial_params SET param_value = 5 WHERE param_name = 'fc1.p' AND trial_id = "
            "(SELECT trial_id FROM trials WHERE number = 1)"
        )
    out = tmp_path / "evil.py"
    result = CliRunner().invoke(main, ["export", "--storage", copy.url, "--trial", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert "fc1" in result.output and "not a placement autodrop writes" in result.output
    assert not out.exists()


def test_tampered_model_name_is_refused(tiny_study, tmp_path):
    copy = tiny_study.copy_to(tmp_path / "tampered")
    study = copy.load()
    config = dict(study.user_attrs["autodrop.config"])
    config["model"] = "simple-cnn'); import os; ('"
    study.set_user_attr("autodrop.config", config)
    result = CliRunner().invoke(main, ["export", "--storage", copy.url, "--out", str(tmp_path / "evil.py")])
    assert result.exit_code == 2
    assert "only the built-in models" in result.output


USER_NET = """from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        return self.head(self.conv(x))
"""


@pytest.mark.parametrize("option", ["--out", "--weights"])
def test_export_refuses_to_overwrite_the_studys_model_file(tmp_path, option):
    import warnings

    from autodrop.api import search
    from autodrop.errors import AutodropWarning

    model_file = tmp_path / "net.py"
    model_file.write_text(USER_NET)
    link = tmp_path / "link.py"
    link.symlink_to(model_file)  # another name for the same file
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutodropWarning)
        search(data="digits", image_size=16, train_per_class=10, epochs=1, batch_size=32, trials=1, pruner="none",
               device="cpu", model=f"{model_file}:Net", storage=storage)
    outputs = {"--out": str(tmp_path / "w.py"), "--weights": str(tmp_path / "w.pt"), option: str(link)}
    # The model named again (as export needs): the path compared is the user's, not one the study holds.
    result = CliRunner().invoke(main, ["export", "--storage", storage, "--out", outputs["--out"],
                                       "--weights", outputs["--weights"], "--model", f"{model_file}:Net"])
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: {option} {str(link)!r} is the study's model file {str(model_file)!r}; "
                             "give another file name.\n")
    assert model_file.read_text() == USER_NET
    assert not (tmp_path / "w.py").exists() and not (tmp_path / "w.pt").exists()


def test_non_builtin_model_has_no_exporter_yet():
    from autodrop.errors import ModelError
    from autodrop.outputs.export import get_exporter

    with pytest.raises(ModelError, match="only the built-in models"):
        get_exporter("my-own-net")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trial", "99"], "has no trial 99"),
        (["--study", "nope"], "no study named 'nope' in this storage; studies there: tiny"),
        (["--out", "/no/such/folder/w.py"], "folder '/no/such/folder' does not exist"),
        (["--weights", "/no/such/folder/w.pt"], "--weights"),
    ],
)
def test_export_bad_input_is_one_line_exit_2(tiny_study, tmp_path, args, message):
    base = ["export", "--storage", tiny_study.url, "--out", str(tmp_path / "w.py")]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output


def test_export_refuses_a_trial_that_did_not_complete(tiny_study, tmp_path):
    copy = tiny_study.copy_to(tmp_path / "with-running")
    copy.load().ask()  # a trial that never finishes
    result = CliRunner().invoke(main, ["export", "--storage", copy.url, "--trial", "6", "--out", str(tmp_path / "w.py")])
    assert result.exit_code == 2
    assert "trial 6 of study 'tiny' did not complete (state: running)" in result.output


def test_export_refuses_an_empty_study(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = CliRunner().invoke(main, ["export", "--storage", url, "--out", str(tmp_path / "w.py")])
    assert result.exit_code == 2
    assert "study 'empty' has no trials yet" in result.output


def test_export_of_missing_sqlite_file_creates_nothing(tmp_path):
    missing = tmp_path / "missing.db"
    result = CliRunner().invoke(main, ["export", "--storage", f"sqlite:///{missing}", "--out", str(tmp_path / "w.py")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert not missing.exists()


@pytest.mark.parametrize("model_name", sorted(BUILTIN_MODELS))
def test_every_builtin_model_exports_to_matching_source(model_name, tmp_path):
    import importlib.util

    import torch

    from autodrop.config import SearchConfig
    from autodrop.nets.build import ModelShape, build_model
    from autodrop.nets.sites import site_kinds
    from autodrop.outputs.export import ExportRecord, class_name_for, export_builtin

    shape = ModelShape(3, 4, 32)
    sites = site_kinds(build_model(model_name, shape))
    placement = {site: (0.25 if i % 2 else None) for i, site in enumerate(sites)}
    record = ExportRecord(
        study_name="s", number=0, config=SearchConfig(model=model_name), shape=shape, classes=("a", "b", "c", "d"),
        data_name="d", sites=sites, placement=placement, val_accuracy=0.5, train_accuracy=None, seed=1,
        scaling=([0.1, 0.1, 0.1], [-1.0, -1.0, -1.0]),
    )
    source, model = export_builtin(record, class_name_for(model_name))
    path = tmp_path / "m.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("m", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = getattr(module, class_name_for(model_name))()
    written.load_state_dict(model.state_dict())
    model.eval(), written.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(written(x), model(x))  # same layers, same order, same weights
    assert sum(isinstance(m, torch.nn.Dropout) for m in written.modules()) == sum(r is not None for r in placement.values())


def test_channel_dropout_before_batch_norm_is_exported_as_written(tmp_path, monkeypatch):
    import importlib.util

    import torch

    from autodrop.config import SearchConfig
    from autodrop.nets import sites as sites_module
    from autodrop.nets.build import ModelShape, build_model
    from autodrop.nets.sites import site_kinds
    from autodrop.outputs.export import ExportRecord, class_name_for, export_builtin

    shape = ModelShape(1, 10, 16)
    sites = site_kinds(build_model("simple-cnn", shape))
    placement = {site: None for site in sites} | {"conv2": 0.3, "fc1": 0.5}
    record = ExportRecord(
        study_name="s", number=0, config=SearchConfig(model="simple-cnn"), shape=shape,
        classes=tuple(str(i) for i in range(10)), data_name="d", sites=sites, placement=placement,
        val_accuracy=0.5, train_accuracy=None, seed=1, scaling=([0.1], [-1.0]),
        variants={"conv2": {"dropout": "channel", "slot": "before-bn"}},
    )
    source, model = export_builtin(record, class_name_for("simple-cnn"))
    assert "self.drop_conv2_before_bn = nn.Dropout2d(p=0.3)" in source
    assert "self.drop_fc1 = nn.Dropout(p=0.5)" in source
    assert "drop_conv2 =" not in source.replace("drop_conv2_before_bn", "")
    lines = [line.strip() for line in source.splitlines()]
    assert lines.index("x = self.conv2(x)") + 1 == lines.index("x = self.drop_conv2_before_bn(x)")
    assert lines.index("x = self.drop_conv2_before_bn(x)") + 1 == lines.index("x = self.bn2(x)")
    path = tmp_path / "m.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("exported_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.SimpleCNN()
    written.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 16, 16)
    monkeypatch.setattr(sites_module, "use_fast_cpu_masks", False)  # compare with torch's own dropout masks
    torch.manual_seed(0)
    expected = model.train()(x)
    torch.manual_seed(0)
    assert torch.allclose(written.train()(x), expected, atol=1e-6)


@pytest.mark.parametrize("in_block", ["per-stage", "per-call"])
def test_exported_wide_resnet_with_in_block_and_branch_drop_reproduces_its_accuracy(in_block, val_tensors, tmp_path):
    import torch

    from autodrop.config import DataConfig, SearchConfig, TrainConfig
    from autodrop.nets.build import ModelShape
    from autodrop.outputs.export import ExportRecord, class_name_for, export_builtin
    from autodrop.training.data import load_data
    from autodrop.training.loop import evaluate
    from autodrop.training.normaliser import Normaliser
    from autodrop.training.placement import train_placement

    config = SearchConfig(data=DataConfig(source="digits", image_size=16, train_per_class=30), model="wrn",
                          model_args={"depth": 16, "width": 1}, in_block=in_block,
                          train=TrainConfig(epochs=2, batch_size=64, device="cpu"))
    data = load_data(config.data)
    normaliser = Normaliser(data.train_images)
    inner = "in:stage2:conv1" if in_block == "per-stage" else "in:block2.2:conv1"
    placement = {inner: 0.3, "block3.1": 0.2, "block1.2": 0.1}
    variants = {inner: {"dropout": "element"}, "block3.1": {"dropout": "branch"}, "block1.2": {"dropout": "branch"}}
    metrics, model = train_placement(config, data, normaliser, placement, variants, seed=3, device=torch.device("cpu"))
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    from autodrop.nets.sites import site_kinds

    sites = site_kinds(model)
    record = ExportRecord(
        study_name="s", number=0, config=config, shape=shape, classes=data.classes, data_name="digits", sites=sites,
        placement={site: placement.get(site) for site in sites}, variants=variants,
        val_accuracy=metrics.val_accuracy, train_accuracy=metrics.train_accuracy, seed=3,
        scaling=(normaliser.scale.flatten().tolist(), normaliser.shift.flatten().tolist()),
    )
    source, _ = export_builtin(record, class_name_for("wrn"))
    assert "class DropPath(nn.Module):" in source and "class Residual(nn.Module):" in source
    assert source.count("DropPath(p=") == 2 and "('drop', nn.Dropout(p=0.3))" in source
    out, weights = tmp_path / "wrn.py", tmp_path / "wrn.pt"
    out.write_text(source)
    torch.save(model.state_dict(), weights)
    measured = evaluate_outside(out, weights, val_tensors, tmp_path)
    _, accuracy = evaluate(model, data.val_images, data.val_labels, normaliser, torch.device("cpu"))
    assert measured["correct"] / measured["n"] == accuracy == metrics.val_accuracy
