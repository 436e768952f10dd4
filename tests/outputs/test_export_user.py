"""Exporting a user's network with its chosen dropout: source that runs without autodrop."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from autodrop.errors import AutodropWarning, ModelError
from autodrop.nets import sites
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.sites import apply_placement, site_kinds
from autodrop.outputs.export_user import export_custom_source

ROOT = Path(__file__).resolve().parents[2]
FORUM = f"{ROOT / 'studies' / 'forum_net.py'}:Net"
USER = ROOT / "tests" / "user_models.py"

# Runs the exported file in a fresh interpreter where importing autodrop fails, loads the weights,
# and saves its outputs in eval mode and (seeded) train mode.
RUNNER = """
import sys
sys.modules["autodrop"] = None  # any import of autodrop now raises ImportError
import importlib.util
import torch
folder = sys.argv[1]
spec = importlib.util.spec_from_file_location("winner", folder + "/winner.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.build_model()
model.load_state_dict(torch.load(folder + "/weights.pt", weights_only=True))
x = torch.load(folder + "/x.pt")
model.eval()
with torch.no_grad():
    eval_out = model(x)
model.train()
torch.manual_seed(5)
with torch.no_grad():
    train_out = model(x)
torch.save((eval_out, train_out), folder + "/out.pt")
"""


def _round_trip(tmp_path: Path, spec: str, shape: ModelShape, model_args: dict, every_other: bool = True) -> str:
    """Export a placement, run the file without autodrop, and compare it with autodrop's network."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutodropWarning)
        model = build_model(spec, shape, model_args=model_args)
        names = list(site_kinds(model))
        placement = {name: (0.3 + 0.01 * i if i % 2 == 0 else None) for i, name in enumerate(names)}
        source = export_custom_source(spec, model_args, placement, channels=shape.channels,
                                      n_classes=shape.n_classes, image_size=shape.image_size,
                                      header=["study demo, trial 3"])
    (tmp_path / "winner.py").write_text(source)
    apply_placement(model, placement)
    # One optimiser step, so the weights and batch-norm statistics are not the initial ones.
    x = torch.randn(4, shape.channels, shape.image_size, shape.image_size)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).sum().backward()
    optimizer.step()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(x, tmp_path / "x.pt")
    model.eval()
    with torch.no_grad():
        eval_expected = model(x)
    model.train()
    torch.manual_seed(5)
    sites.use_fast_cpu_masks = False  # the exported file uses nn.Dropout, so compare with its masks
    try:
        with torch.no_grad():
            train_expected = model(x)
    finally:
        sites.use_fast_cpu_masks = True
    (tmp_path / "run.py").write_text(RUNNER)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    eval_out, train_out = torch.load(tmp_path / "out.pt")
    # Another process may sum in another order: equal up to float rounding.
    torch.testing.assert_close(eval_out, eval_expected, rtol=1e-5, atol=1e-4)
    # Same dropout layers at the same places with the same rates: the same masks from the same seed.
    torch.testing.assert_close(train_out, train_expected, rtol=1e-5, atol=1e-4)
    return source


def test_traced_forum_network_exports_as_a_class_importing_the_users_code(tmp_path):
    source = _round_trip(tmp_path, FORUM, ModelShape(1, 10, 16), {"width": 4})
    assert "from forum_net import Net" in source
    assert "net = Net(num_classes=10, in_channels=1, image_size=16, width=4)" in source
    assert "self.drop_after_conv1 = nn.Dropout(p=0.3)  # site after:conv1" in source
    assert "class ExportedModel(nn.Module):" in source
    assert "# study demo, trial 3" in source
    assert "autodrop_sites" not in source and "import autodrop" not in source


@pytest.mark.slow
def test_residual_network_with_functional_dropout_exports(tmp_path):
    source = _round_trip(tmp_path, f"{USER}:ResidualNet", ModelShape(1, 10, 16), {})
    assert "torch.relu" in source


def test_hooked_network_exports_with_its_hooks(tmp_path):
    source = _round_trip(tmp_path, f"{USER}:BranchyNet", ModelShape(1, 10, 16), {})
    assert "class SiteCallHooks" in source
    assert "('replace', 'drop', 1, nn.Dropout2d(p=0.3)),  # site drop" in source


@pytest.mark.slow
def test_resnet18_exports_with_its_first_conv_adapted(tmp_path):
    source = _round_trip(tmp_path, "torchvision:resnet18", ModelShape(1, 10, 16), {})
    assert "torchvision.models.get_model('resnet18', weights=None, num_classes=10)" in source
    assert "_set_submodule(net, 'conv1', nn.Conv2d(in_channels=1" in source


def test_placement_naming_sites_the_network_lacks_is_refused():
    with pytest.raises(ModelError, match="does not have"):
        export_custom_source(f"{USER}:ResidualNet", {}, {"after:conv9": 0.5, "__import__('os')": 0.1},
                             channels=1, n_classes=10, image_size=16)


@pytest.mark.parametrize("rate", [1.5, -0.1, float("nan"), "0.5", True])
def test_rates_outside_zero_to_one_are_refused(rate):
    with pytest.raises(ModelError, match="needs a rate in"):
        export_custom_source(f"{USER}:ResidualNet", {}, {"after:stem": rate}, channels=1, n_classes=10, image_size=16)


def test_model_args_and_class_name_that_are_not_plain_values_are_refused():
    with pytest.raises(Exception, match="identifier"):
        export_custom_source(f"{USER}:ResidualNet", {"width); import os; (": 1}, {}, channels=1, n_classes=10,
                             image_size=16)
    with pytest.raises(ModelError, match="class_name"):
        export_custom_source(f"{USER}:ResidualNet", {}, {}, channels=1, n_classes=10, image_size=16,
                             class_name="X(nn.Module): pass\nimport os\nclass Y")


def test_header_lines_cannot_break_out_of_their_comment():
    source = export_custom_source(f"{USER}:ResidualNet", {}, {}, channels=1, n_classes=10, image_size=16,
                                  header=["trial 1\nimport os"])
    assert "\nimport os" not in source
    compile(source, "winner.py", "exec")


QUOTED_MODEL = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Branchy(Small):
    def forward(self, x):
        if x.mean() > 100:  # data-dependent: torch.fx cannot trace it, so hooks find the sites
            x = x / 255
        return super().forward(x)
'''


@pytest.mark.parametrize("name", ["Small", "Branchy"], ids=["traced", "hooked"])
def test_model_file_name_with_triple_quotes_exports_source_that_runs(tmp_path, name):
    path = tmp_path / 'net"""x.py'
    path.write_text(QUOTED_MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutodropWarning)
        source = export_custom_source(f"{path}:{name}", {}, {}, channels=1, n_classes=3, image_size=8)
    namespace: dict = {}
    exec(compile(source, "winner.py", "exec"), namespace)
    model = namespace["build_model"]()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
