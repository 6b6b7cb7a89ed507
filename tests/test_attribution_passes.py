"""fastpatch.attribution.passes: one step schedule and one argument check for every integrated method."""

from __future__ import annotations

import pytest
import zoo

from fastpatch import attribution as fa
from fastpatch.attribution.passes import RULES, check_schedule, ig_alphas


def test_one_schedule_for_every_rule():
    assert ig_alphas(4, "left") == [0.0, 0.25, 0.5, 0.75]
    assert ig_alphas(4, "midpoint") == [0.125, 0.375, 0.625, 0.875]
    assert ig_alphas(4, "right") == [0.25, 0.5, 0.75, 1.0]
    # every method's rules come from the one vocabulary
    for rules in (fa.IG_RULES, fa.ATTENTION_IG_RULES):
        assert set(rules) <= set(RULES)


@pytest.mark.parametrize("steps", [True, False, 0, -1, 2.0, "2"])
def test_check_schedule_refuses_what_is_not_a_step_count(steps):
    with pytest.raises(ValueError, match="ig_steps must be a positive integer"):
        check_schedule(steps, "midpoint", RULES)
    with pytest.raises(ValueError, match="ig_steps must be None or a positive integer"):
        check_schedule(steps, "midpoint", RULES, optional=True)
    check_schedule(None, "midpoint", RULES, optional=True)
    with pytest.raises(ValueError, match="rule must be one of"):
        check_schedule(2, "trapezoid", RULES)


def test_every_integrated_method_refuses_a_bool_step_count():
    """``ig_steps=True`` is refused alike by node IG, EAP-IG and integrated attention attribution,
    before any pass."""
    model = zoo.gpt2()
    clean, corrupted = zoo.prompt_pair()

    def metric(logits):
        return logits[:, -1, 0].mean()

    with pytest.raises(ValueError, match="ig_steps must be"):
        fa.get_attr_patch_ig(model, clean, corrupted, metric, "resid_pre", True)
    with pytest.raises(ValueError, match="ig_steps must be"):
        fa.get_attr_patch_edges(model, clean, corrupted, metric, ig_steps=True)
    with pytest.raises(ValueError, match="ig_steps must be"):
        fa.get_attention_attribution(model, clean, metric, integrated=True, ig_steps=True)
