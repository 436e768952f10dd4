"""The trial loop's fast paths give the same numbers as the plain model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autodrop.training.device as train_module
from autodrop.config import DataConfig, TrainConfig
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.packed import PackedNet
from autodrop.nets.sites import apply_placement
from autodrop.training.data import load_data
from autodrop.training.loop import evaluate, train_trial
from autodrop.training.normaliser import Normaliser
from autodrop.training.optim import Adam
from autodrop.training.plan import FoldedConv, forward_plan


def _model(name: str = "simple-cnn", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build_model(name, ModelShape(1, 10, 16))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


def test_eval_plan_folds_batch_norm_and_gives_the_same_outputs() -> None:
    model = _model().eval()
    plan = forward_plan(model, training=False)
    assert plan is not model
    x = torch.randn(8, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(plan(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(cell, FoldedConv) for cell in plan.__closure__[0].cell_contents)


def test_train_plan_pools_before_relu_with_equal_outputs_and_gradients() -> None:
    model = _model().train()
    twin = _model().train()
    x = torch.randn(8, 1, 16, 16)
    plan = forward_plan(model, training=True)
    out_plan, out_plain = plan(x), twin(x)
    torch.testing.assert_close(out_plan, out_plain, atol=1e-5, rtol=1e-5)
    out_plan.square().sum().backward()
    out_plain.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_plan_with_dropout_draws_the_same_masks() -> None:
    model, twin = _model(), _model()
    for m in (model, twin):
        apply_placement(m, {"conv1": 0.3, "fc1": 0.5})
        m.train()
    x = torch.randn(8, 1, 16, 16)
    torch.manual_seed(4)
    a = forward_plan(model, training=True)(x)
    torch.manual_seed(4)
    b = twin(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_plan_leaves_hooked_and_custom_models_alone() -> None:
    model = _model()
    model.register_forward_hook(lambda *args: None)
    assert forward_plan(model, training=False) is model

    class Custom(nn.Module):
        def forward(self, x):
            return x

    custom = Custom()
    assert forward_plan(custom, training=True) is custom


def test_packed_eval_plan_equals_separate_models() -> None:
    members = [_model(seed=s) for s in range(3)]
    packed = PackedNet(members).eval()
    x = torch.randn(8, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = forward_plan(packed.layers, training=packed.training)(x)
        for k, member in enumerate(members):
            torch.testing.assert_close(out[k], member.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pixels", [7 * 256, 128 * 256, 4096 * 256])
def test_evaluation_does_not_depend_on_the_chunk_size(pixels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=5))
    normaliser = Normaliser(data.train_images)
    model = _model().to(memory_format=torch.channels_last)
    device = torch.device("cpu")
    reference = evaluate(model, data.val_images, data.val_labels, normaliser, device)
    monkeypatch.setattr(train_module, "CPU_EVAL_PIXELS", pixels)
    loss, accuracy = evaluate(model, data.val_images, data.val_labels, normaliser, device)
    assert accuracy == reference[1]
    assert loss == pytest.approx(reference[0], rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_adam_matches_torch_optim_adam(fused: bool) -> None:
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (5, 7)]
    ours = [torch.randn(s).requires_grad_() for s in shapes]
    ours[0] = ours[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = Adam(ours, lr=1e-2)
    optimizer.fused = fused and optimizer.fused
    reference = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            for p, g in zip(params, grads):
                p.grad = g.clone().contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_training_does_not_import_torch_dynamo() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\n"
        "from autodrop.config import DataConfig, TrainConfig\n"
        "from autodrop.training.data import load_data\n"
        "from autodrop.nets.build import ModelShape, build_model\n"
        "from autodrop.training.normaliser import Normaliser\nfrom autodrop.training.loop import train_trial\n"
        "data = load_data(DataConfig(source='digits', image_size=16, train_per_class=3))\n"
        "model = build_model('simple-cnn', ModelShape(1, 10, 16))\n"
        "train_trial(model, data, Normaliser(data.train_images), TrainConfig(epochs=1, batch_size=16), seed=0,\n"
        "            device=torch.device('cpu'))\n"
        "print('DYNAMO', 'torch._dynamo' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "DYNAMO False"


def test_train_trial_learns_and_is_reproducible() -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=20))
    normaliser = Normaliser(data.train_images)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("simple-cnn", ModelShape(1, 10, 16))
        apply_placement(model, {"conv2": 0.2, "fc1": 0.3})
        results.append(train_trial(model, data, normaliser, TrainConfig(epochs=3, batch_size=32), seed=7,
                                   device=torch.device("cpu")))
    assert results[0] == results[1]
    assert results[0].val_accuracy > 0.3  # ten classes: chance is 0.1


def test_cpu_eval_chunks_shrink_with_the_image_size() -> None:
    cpu = torch.device("cpu")
    assert train_module.eval_chunk_size(cpu, 32) == 128
    assert train_module.eval_chunk_size(cpu, 64) == 32
    assert train_module.eval_chunk_size(cpu, 1024) == 1
    assert train_module.eval_chunk_size(torch.device("cuda"), 32) == train_module.EVAL_CHUNK


def test_normaliser_matches_the_plain_statistics() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2500, 3, 5, 5), dtype=torch.uint8)  # more than one chunk
    normaliser = Normaliser(images)
    pixels = images.float().transpose(0, 1).reshape(3, -1)
    mean, std = pixels.mean(dim=1), pixels.std(dim=1)
    torch.testing.assert_close(normaliser.scale.flatten(), 1 / std)
    torch.testing.assert_close(normaliser.shift.flatten(), -mean / std)
