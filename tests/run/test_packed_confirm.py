"""Packed confirm: a placement's seeds trained as one pack, each member as that seed's lone run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_options

import autodrop
from autodrop.cli import main
from autodrop.config import config_from_options
from autodrop.errors import ConfigError
from autodrop.run.confirm import CONFIRM_SEED_BASE, Candidate, CandidateTrainer
from autodrop.training import loop, packed
from autodrop.training.data import load_data

USER_MODELS = Path(__file__).resolve().parents[1] / "user_models.py"
SITES = ("conv1", "conv2", "conv3", "fc1", "fc2")
NONE = Candidate("none", 0, "none", {s: None for s in SITES}, {})
FC1 = Candidate("trial 3", 3, None, {s: (0.3 if s == "fc1" else None) for s in SITES}, {})


@pytest.fixture(scope="module")
def scarce_digits():
    config = config_from_options(dict(data="digits", image_size=16, train_per_class=20, epochs=2, batch_size=32,
                                      precision="fp32", augment="crop"))
    return config, load_data(config.data)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_packed_confirm_gives_each_seed_the_initial_weights_of_its_lone_run(scarce_digits, monkeypatch) -> None:
    config, data = scarce_digits
    lone: dict[int, dict[str, torch.Tensor]] = {}
    members: dict[int, dict[str, torch.Tensor]] = {}
    trial_init = loop.TrialTrainer.__init__
    set_members = packed.PackTrainer.set_members

    def record_lone(self, model, *args, seed, **kwargs):
        lone[seed] = _weights(model)
        trial_init(self, model, *args, seed=seed, **kwargs)

    def record_members(self, new):
        set_members(self, new)
        for i, member in enumerate(new):  # read back out of the packed network itself
            members[member.seed] = _weights(self.net.unpack(i, self.build()))

    monkeypatch.setattr(loop.TrialTrainer, "__init__", record_lone)
    monkeypatch.setattr(packed.PackTrainer, "set_members", record_members)
    # --pack 3 on a CPU: the pack rule's explicit size, which search takes too.
    packed_trainer = CandidateTrainer(dataclasses.replace(config, pack=3), data, device="cpu")
    assert packed_trainer.pack == 3
    packed_trainer.train(FC1, 3)
    CandidateTrainer(dataclasses.replace(config, pack=1), data, device="cpu").train(FC1, 3)

    seeds = [CONFIRM_SEED_BASE + i for i in range(3)]
    assert sorted(members) == sorted(lone) == seeds
    for seed in seeds:
        assert members[seed].keys() == lone[seed].keys()
        for key, value in lone[seed].items():
            assert torch.equal(members[seed][key], value), (seed, key)
    first = next(iter(lone[seeds[0]]))
    assert not torch.equal(lone[seeds[0]][first], lone[seeds[1]][first])  # the seeds' weights differ


def test_a_packed_member_without_dropout_trains_as_its_lone_run(scarce_digits) -> None:
    # Same initial weights, the seed's own batch order and augmentation draws: without dropout
    # (whose masks come from another stream in a pack) the runs are the lone runs.
    config, data = scarce_digits
    alone = CandidateTrainer(dataclasses.replace(config, pack=1), data, device="cpu")
    together = CandidateTrainer(dataclasses.replace(config, pack=2), data, device="cpu")
    alone.train(NONE, 2)
    together.train(NONE, 2)
    n_val = len(data.val_labels)
    for seed, (accuracy, gap) in alone.runs[NONE.key].items():
        packed_accuracy, packed_gap = together.runs[NONE.key][seed]
        assert abs(packed_accuracy - accuracy) <= 2 / n_val and abs(packed_gap - gap) <= 0.02, seed
    first, second = (alone.runs[NONE.key][str(CONFIRM_SEED_BASE + i)][0] for i in range(2))
    assert first != second  # the seeds' own orders, not one shared order


def test_confirm_packs_only_where_the_pack_rule_does(scarce_digits) -> None:
    config, data = scarce_digits
    assert CandidateTrainer(config, data, device="cpu").pack == 1  # a CPU: one at a time
    user = dataclasses.replace(config, model=f"{USER_MODELS}:ResidualNet", pack=2)
    with pytest.raises(ConfigError, match="--pack 2: this model's runs cannot be packed"):
        CandidateTrainer(user, data, device="cpu")


def test_confirm_command_says_it_packs(tmp_path) -> None:
    options = tiny_options(tmp_path, trials=6)
    autodrop.search(**options)
    result = CliRunner().invoke(
        main, ["confirm", "--study", "digits-simple-cnn", "--storage", options["storage"], "--seeds", "2",
               "--top", "1", "--pack", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "a placement's seeds 2 at a time as one packed network" in result.output
    assert "training none, seeds 1-2 as one pack" in result.output
    assert "float32" in result.output  # the study's precision, named
