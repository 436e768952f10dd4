"""--precision: bf16 autocast where the device computes it natively, float32 state, the same answers."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from autodrop.config import DataConfig, TrainConfig
from autodrop.nets.build import build_model
from autodrop.training import device as device_module
from autodrop.training.data import load_data
from autodrop.training.device import autocast_for, native_bf16, resolve_precision
from autodrop.training.loop import TrialTrainer, evaluate
from autodrop.training.normaliser import Normaliser

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("reported", "native"), [
    ({"capability": "AVX512", "avx512_bf16": True, "amx_bf16": False}, True),
    ({"capability": "AVX512", "avx512_bf16": False, "amx_bf16": True}, True),
    ({"capability": "AVX512", "avx512_bf16": False, "amx_bf16": False}, False),  # AVX-512 alone emulates bf16
    ({"capability": "AVX2"}, False),
])
def test_auto_picks_bf16_on_a_cpu_only_where_native_support_is_reported(monkeypatch, reported, native) -> None:
    monkeypatch.setattr(device_module, "cpu_capabilities", lambda: reported)
    assert native_bf16(CPU) is native
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_on_a_gpu_only_where_native_support_is_reported(monkeypatch, native) -> None:
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native or including_emulation  # recent torch answers yes for emulated bf16 too

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert native_bf16(CUDA) is native
    assert resolve_precision("auto", CUDA) == ("bf16" if native else "fp32")
    assert asked == [False, False]


def test_a_device_without_bf16_units_and_a_missing_gpu_answer_fp32(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", CUDA) == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_fp32_and_bf16_are_honoured_whatever_the_hardware(monkeypatch) -> None:
    for reported in ({"avx512_bf16": True}, {}):
        monkeypatch.setattr(device_module, "cpu_capabilities", lambda reported=reported: reported)
        assert resolve_precision("fp32", CPU) == "fp32" and isinstance(autocast_for(CPU, "fp32"), nullcontext)
        assert resolve_precision("bf16", CPU) == "bf16"
        with autocast_for(CPU, "bf16"):
            assert nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, but got 'fp16'"):
        resolve_precision("fp16", CPU)


def test_the_reported_capabilities_name_the_cpu_level() -> None:
    found = device_module.cpu_capabilities()
    assert found["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(native_bf16(CPU), bool)


@pytest.fixture(scope="module")
def digits():
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=40))
    return data, Normaliser(data.train_images)


def _trainer(data, normaliser, precision: str, epochs: int = 4) -> TrialTrainer:
    torch.manual_seed(0)
    model = build_model("simple-cnn", data.shape)
    config = TrainConfig(epochs=epochs, batch_size=32, precision=precision)
    return TrialTrainer(model, data, normaliser, config, seed=0, device=CPU)


def test_a_bf16_trial_on_the_cpu_trains_with_float32_state(digits) -> None:
    data, normaliser = digits
    trainer = _trainer(data, normaliser, "bf16", epochs=3)
    losses = [trainer.train_epoch().train_loss for _ in range(3)]
    assert losses[-1] < 0.6 * losses[0], losses  # the loss falls
    assert trainer.last.val_accuracy > 0.5  # ten classes: it learns
    # Weights, batch-norm statistics and the optimiser state stay float32; only the arithmetic is bf16.
    assert all(v.dtype in (torch.float32, torch.int64) for v in trainer.model.state_dict().values())
    tensors = list(_tensors(trainer.optimizer.state_dict()))
    assert tensors and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


# bf16 keeps 8 bits of mantissa: each logit is off by up to about 0.4% of its size, which moves the
# mean loss by less than that and flips only images whose two best classes are that close. On the
# digits here the loss moved by 0.15% and no image flipped; the bounds leave room for other CPUs.
LOSS_TOLERANCE = 0.01  # relative
ACCURACY_TOLERANCE = 0.01  # absolute: 3 images of the 360


def test_bf16_evaluation_matches_float32_on_planted_inputs(digits) -> None:
    data, normaliser = digits
    trainer = _trainer(data, normaliser, "fp32", epochs=3)
    for _ in range(3):
        trainer.train_epoch()
    model = trainer.model
    # Planted inputs: the validation images, and the same images with every fourth one blanked
    # (no evidence, so its logits are near ties: the hardest case for rounding).
    blanked = data.val_images.clone()
    blanked[::4] = 0
    for images in (data.val_images, blanked):
        loss32, accuracy32 = evaluate(model, images, data.val_labels, normaliser, CPU, precision="fp32")
        loss16, accuracy16 = evaluate(model, images, data.val_labels, normaliser, CPU, precision="bf16")
        assert abs(loss16 - loss32) <= LOSS_TOLERANCE * loss32, (loss16, loss32)
        assert abs(accuracy16 - accuracy32) <= ACCURACY_TOLERANCE, (accuracy16, accuracy32)
    assert accuracy32 > 0.5


def test_the_recipe_line_names_the_precision() -> None:
    assert TrainConfig(precision="bf16").describe().endswith(", bf16 autocast")
    assert TrainConfig(precision="fp32").describe().endswith(", float32")
    assert TrainConfig().describe().endswith(", precision auto")
