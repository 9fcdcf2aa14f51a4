"""Token budgets: the published anchors, both r conventions, schedules and refusals."""

import pytest

from tokenfuse.exporter.budgets import BudgetReport, Shape, parse_r, plan_schedule
from tokenfuse.exporter.errors import UsageError
from tokenfuse.exporter.methods import MethodConfig

VIT_B = Shape(tokens=197, layers=12, width=768, mlp_width=3072, heads=12)


def test_vit_b_pitome_09_ends_at_60_tokens_with_flops_ratio_0565():
    schedule = plan_schedule("pitome", VIT_B, r=0.9)
    assert schedule == (178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60)
    report = BudgetReport(VIT_B, schedule, 0.9)
    assert report.flops_ratio == pytest.approx(0.565, abs=0.001)
    assert report.paper_kept_fraction == pytest.approx(0.538, abs=0.0005)
    assert "0.538" in report.table() and "0.565" in report.table()


def test_paper_kept_fraction_for_48_layers():
    """The paper's 0.362 for 48 layers is the ratio^i average at ratio 0.95 (at 0.9 it would be 0.186)."""
    shape = Shape(tokens=257, layers=48, width=1280, mlp_width=5120, heads=16)
    assert BudgetReport(shape, (257,) * 48, 0.95).paper_kept_fraction == pytest.approx(0.362, abs=0.0005)
    assert BudgetReport(shape, (257,) * 48, 0.9).paper_kept_fraction == pytest.approx(0.186, abs=0.0005)


def test_tome_integer_r_removes_constant_tokens():
    assert plan_schedule("tome", VIT_B, r=13) == tuple(197 - 13 * i for i in range(1, 13))


def test_none_keeps_every_token_and_has_ratio_one():
    schedule = plan_schedule("none", VIT_B, r=0.9)
    assert schedule == (197,) * 12
    assert BudgetReport(VIT_B, schedule, None).flops_ratio == 1.0


def test_explicit_schedule_and_min_tokens_floor():
    explicit = (180, 160, 140, 120, 100, 90, 80, 70, 60, 55, 50, 45)
    assert plan_schedule("tome", VIT_B, schedule=list(explicit)) == explicit
    floored = plan_schedule("pitome", VIT_B, r=0.9, min_tokens=100)
    assert min(floored) == 100 and floored[:4] == (178, 161, 145, 131)


def test_turbo_threshold_stops_merging_below_it():
    schedule = plan_schedule(MethodConfig("turbo", turbo_threshold=100), VIT_B, r=13)
    assert schedule[-1] == 93 and schedule[-2] == 93  # 197 - 8*13 = 93 < 100: no more merging


@pytest.mark.parametrize("text, value", [("0.9", 0.9), ("13", 13), ("0.5", 0.5), ("1", 1)])
def test_parse_r(text, value):
    assert parse_r(text) == value and type(parse_r(text)) is type(value)


@pytest.mark.parametrize("text", ["0", "1.0", "1.5", "-3", "abc", "0.0"])
def test_parse_r_refuses(text):
    with pytest.raises(UsageError):
        parse_r(text)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("tome", dict(r=99)),  # more than (197 - 1) // 2 in the first layer
        ("tome", dict(r=50)),  # fine at first, impossible by layer 4
        ("pitome", dict(schedule=[100] * 11)),  # wrong length
        ("pitome", dict(schedule=[180, 190] + [100] * 10)),  # grows
        ("pitome", dict(r=0.9, min_tokens=1)),  # floor at the protected token
        ("pitome", dict(r=0.9, min_tokens=500)),  # above the model's tokens
        ("crossget", dict(schedule=[1] + [1] * 11)),  # fewer tokens than the protected ones + 1
        ("pitome", dict()),  # no budget at all
        ("pitome", dict(r=0.9, schedule=[100] * 12)),  # two budgets
    ],
)
def test_impossible_budgets_are_refused(method, kwargs):
    with pytest.raises(UsageError):
        plan_schedule(method, VIT_B, **kwargs)


def test_crossget_may_remove_more_per_layer_than_bipartite_methods():
    assert plan_schedule("crossget", VIT_B, schedule=[90] + [90] * 11)[0] == 90
    with pytest.raises(UsageError):
        plan_schedule("pitome", VIT_B, schedule=[90] + [90] * 11)
