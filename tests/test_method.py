"""The method's vocabulary and layer plan (schemas.method, METHOD sections 3-4)."""

import pytest

from cache_teacher.worker import signal_plan
from schemas.method import (
    CAPABILITIES,
    LOSS_TERMS,
    ROLE_TERM,
    SIGNAL_ROLE,
    SIGNALS,
    TERM_SIGNAL,
    TERMS,
    LayerPlan,
    lambdas,
    resolve_layer_range,
)
from train_student.config import LossConfig


def test_vocabulary_is_consistent():
    assert LOSS_TERMS == ("ce", "p", "r", "d") and TERMS == LOSS_TERMS[1:]
    assert ROLE_TERM == {"perception": "p", "reasoning": "r", "planning": "d"}
    assert tuple(ROLE_TERM) == CAPABILITIES
    assert SIGNAL_ROLE == {"first_tv": "perception", "penult_tv": "planning", "mid": "reasoning"}
    assert sorted(TERM_SIGNAL.values()) == sorted(SIGNALS)


def test_resolve_layer_range_defaults_and_negative():
    assert resolve_layer_range(0, -2, 24) == list(range(23))
    assert resolve_layer_range(-3, -1, 5) == [2, 3, 4]
    assert resolve_layer_range(2, 2, 5) == [2]


@pytest.mark.parametrize("start,end,num", [(0, 5, 5), (-6, 2, 5), (3, 1, 5), (0, -2, 1), (0, 0, 0)])
def test_resolve_layer_range_errors_name_values(start, end, num):
    with pytest.raises(ValueError) as err:
        resolve_layer_range(start, end, num)
    assert str(num) in str(err.value)


def test_layer_plan_of_a_24_layer_student():
    plan = LayerPlan.for_model(24)
    assert (plan.first, plan.penult, plan.mid) == (0, 22, tuple(range(23)))
    assert plan.term_layers("p") == [0] and plan.term_layers("d") == [22]
    assert plan.layers(["p", "d"]) == [0, 22]
    assert plan.layers(TERMS) == list(range(23))
    assert LayerPlan.for_model(28, 2, -3).mid == tuple(range(2, 26))


def test_layer_plan_refuses_a_one_layer_model():
    with pytest.raises(ValueError, match="1 decoder layer"):
        LayerPlan.for_model(1)


def test_cache_signal_plan_follows_the_layer_plan():
    plan = signal_plan(28, list(SIGNALS), student_layers=24)
    assert plan["first_tv"].layers == [0] and plan["penult_tv"].layers == [26]
    assert plan["mid"].layers == list(range(27)) and len(plan["mid"].groups) == 23
    assert {name: spec.role for name, spec in plan.items()} == SIGNAL_ROLE


def test_lambdas_read_every_term():
    assert lambdas(LossConfig(lam_ce=2.0, lam_r=0.5)) == {"ce": 2.0, "p": 1.0, "r": 0.5, "d": 1.0}
