"""The search's answer on hand-made studies (no training): the verdict's branches, the best of many
runs, and importances that speak only as loud as the evidence."""

from __future__ import annotations

from handmade import binomial_noise, handmade_study

from autodrop.outputs.results import summarize_study
from autodrop.outputs.text import format_result, site_story


def _result(accuracy, **kwargs):
    return summarize_study(handmade_study(accuracy, **kwargs), "sqlite://")


def _none_at(value, others):
    """Accuracy: ``value`` for no dropout, ``others(placement, rng)`` for every other placement."""
    return lambda p, rng: value if all(r is None for r in p.values()) else others(p, rng)


def test_no_dropout_scoring_best_says_dropout_does_not_help():
    result = _result(_none_at(0.97, lambda p, rng: 0.90 + rng.uniform(0, 0.05)), n_searched=10)
    assert result.best.baseline == "none"
    assert result.verdict.startswith("No dropout scored best")


def test_a_lead_a_two_run_band_would_call_real_is_within_noise_for_the_best_of_thirty():
    noise = binomial_noise(0.95)
    # Every placement is 95% good; no dropout's one run happened to land a point low.
    result = _result(_none_at(0.94, lambda p, rng: noise(rng)), n_searched=26, seed=3)
    m = result.margin
    # Luck alone: the best of 29 runs leads one run by more than two runs' own 95% band...
    two_run_band = 1.645 * 2**0.5 * m.run_noise
    assert m.lead > two_run_band
    # ...and the verdict, knowing the best was picked from many, calls it noise.
    assert m.within_noise and m.chance > m.lead
    assert result.verdict.startswith("Within noise") and "best of 29 single runs" in result.verdict


def test_a_lead_beyond_what_luck_gives_the_best_of_many_is_beyond_noise():
    noise = binomial_noise(0.80)
    result = _result(_none_at(0.80, lambda p, rng: noise(rng) + (0.15 if p["fc1"] else 0.0)), n_searched=16)
    assert result.margin.lead > result.margin.chance
    assert result.verdict.startswith("Beyond noise") and "autodrop confirm" in result.verdict


def test_a_planted_driving_site_ranks_first_and_the_story_names_it():
    for site in ("fc1", "conv2"):
        drive = (lambda s: lambda p, rng: 0.95 - 0.4 * (p[s] or 0.0) + rng.normal(0, 0.005))(site)
        result = _result(drive, n_searched=16, seed=1)
        ranked = sorted(result.importances, key=result.importances.get, reverse=True)
        assert ranked[0] == site, result.importances
        low, high = result.importance_intervals[site]
        assert low <= result.importances[site] <= high and low > 0.5
        assert site_story(result).startswith(f"Most of the effect comes from {site}")


def test_pure_noise_is_reported_as_no_measurable_effect():
    noise = binomial_noise(0.95)
    result = _result(lambda p, rng: noise(rng), n_searched=26)
    assert result.effect_measurable is False
    story = site_story(result)
    assert story.startswith("No site's effect is measurable here") and "shares of noise" in story
    for site in result.sites:
        assert f"from {site}" not in story


def test_importances_count_completed_trials_and_say_how_many_were_searched():
    result = _result(lambda p, rng: 0.9 + rng.uniform(0, 0.05), n_searched=8)
    assert result.importance_note.startswith("from 12 completed trials (8 searched, 4 baselines)")
    text = format_result(result)
    assert "importance (90% interval)" in text
    low, high = result.importance_intervals["fc1"]
    assert f"({low:.2f}-{high:.2f})" in text
