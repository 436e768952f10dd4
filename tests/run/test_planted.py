"""A planted case where dropout truly helps: digits with 30% wrong training labels, trained long
enough that a network without dropout memorises them. The search must find a placement well above
its own no-dropout baseline, and confirm must confirm it."""

from __future__ import annotations

import pytest
from tiny import write_noisy_digits

import autodrop
from autodrop.run.confirm import confirm_study

pytestmark = pytest.mark.slow


def test_on_wrong_labels_the_search_finds_dropout_that_helps_and_confirm_confirms_it(tmp_path):
    data = write_noisy_digits(tmp_path / "noisy", per_class=50, wrong=0.3)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = autodrop.search(data=str(data), image_size=16, epochs=12, batch_size=64, trials=12, storage=storage,
                             study="noisy")
    none = next(b for b in result.baselines if b.baseline == "none")
    searched = [t for t in result.trials if t.state == "complete" and t.baseline is None]
    # The sampler's own choice, not a recipe, clears no dropout by five points.
    assert max(t.val_accuracy for t in searched) - none.val_accuracy >= 0.05
    confirmation = confirm_study("noisy", storage, top=1, device="cpu", data=str(data))
    assert confirmation.verdict.startswith("Confirmed"), confirmation.verdict
    assert confirmation.comparison.reference == "none" and confirmation.comparison.ci_low > 0
