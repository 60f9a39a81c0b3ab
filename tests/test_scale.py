"""The terms' scale (METHOD §9): logged gradient norms against autograd, balanced calibration hitting
its ratios on the first window, the reweighter's shares, and the inert-term warning."""

import io
import math
from types import SimpleNamespace

import pytest
import torch
from test_train_step import CPU, PLAN, TERMS, flat_grads, make_item, student

from schemas.method import CAPABILITIES, REFERENCE_MIX, UNIFORM_MIX
from train_student.agp import GradBank
from train_student.config import LossConfig
from train_student.reweight import LossReweighter
from train_student.scale import (
    INERT_RATIO,
    InertTerms,
    apply_calibration,
    balanced_lambdas,
    calibrate,
    first_window,
    term_grad_norms,
)
from train_student.step import CapturedForward, MicroStepper, TermWeights


# ---------------------------------------------------------------- pure parts
def test_balanced_lambdas_hand_value_and_zero_gradient():
    lams = balanced_lambdas({"ce": 2.0, "p": 1e-6, "r": 4e-6}, {"p": 0.5, "r": 0.25}, lam_ce=2.0)
    assert lams == pytest.approx({"ce": 2.0, "p": 2e6, "r": 2.5e5})
    with pytest.raises(ValueError, match=r"term\(s\) \['d'\].*loss.scale=reference"):
        balanced_lambdas({"ce": 1.0, "d": 0.0}, {"d": 0.5}, lam_ce=1.0)


def toy_forward(weight: torch.nn.Parameter):
    """ce = |w|^2 (gradient 2w), p = 3 w0 (gradient [3, 0]), d = w1^2 (gradient [0, 2 w1])."""
    return lambda item, terms: {"ce": weight.square().sum(), **{t: {"p": 3 * weight[0], "r": weight.sum(),
                                                                   "d": weight[1].square()}[t] for t in terms}}


def test_calibrate_hand_value_and_absent_terms():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    config = LossConfig(scale="balanced", lam_ce=2.0, balance_ratio={"perception": 0.5, "planning": 0.1},
                        mix={"perception": [1, 0, 1], "reasoning": [1, 0, 1], "planning": [0, 0, 1]})
    weights = TermWeights(config, ["p", "d"], CPU)
    items = [SimpleNamespace(capability="perception"), SimpleNamespace(capability="planning")]
    record = calibrate(toy_forward(weight), weights, [weight], items, config)
    assert record["grad_norms"] == pytest.approx({"ce": math.sqrt(20), "p": 3.0, "d": 4.0})  # p: first item only
    assert record["lambdas"] == pytest.approx({"ce": 2.0, "p": 0.5 * 2 * math.sqrt(20) / 3, "d": 0.1 * 2 * math.sqrt(20) / 4})
    assert record["samples"] == 2 and record["ratios"] == {"p": 0.5, "d": 0.1}
    assert weight.grad is None  # nothing accumulated
    with pytest.raises(ValueError, match=r"term\(s\) \['p'\] are in no sample"):
        calibrate(toy_forward(weight), weights, [weight], items[1:], config)
    apply_calibration(record, weights, None)
    torch.testing.assert_close(weights.lambdas(), torch.tensor([2.0, record["lambdas"]["p"], 0.0, record["lambdas"]["d"]]))


def test_term_grad_norms_equal_autograd():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    unused = torch.nn.Parameter(torch.ones(3))
    norms = term_grad_norms(toy_forward(weight)(None, ["p", "d"]), [weight, unused])
    assert {t: float(v) for t, v in norms.items()} == pytest.approx({"ce": math.sqrt(20), "p": 3.0, "d": 4.0})


def test_first_window_skips_skipped_items():
    items = [SimpleNamespace(key=i, skipped=i in (1, 2)) for i in range(8)]
    assert [item.key for item in first_window(iter(items), 3)] == [0, 3, 4]
    assert len(first_window(items[:2], 4)) == 1


def test_reweighter_shares_hold_the_calibrated_point():
    moved = {}
    for shares in (None, {"ce": 1.0, "p": 0.5}):
        reweighter = LossReweighter({"ce": 1.0, "p": 1.0})
        if shares:
            reweighter.set_shares(shares)
        reweighter.observe({"ce": torch.tensor(1.0), "p": torch.tensor(1.0)},
                           {"ce": torch.tensor(2.0), "p": torch.tensor(1.0)})  # G = (2, 1): shares (2/3, 1/3)
        moved[bool(shares)] = abs(float(reweighter.step()["p"]) - 1.0)
    assert moved[True] == 0.0 and moved[False] > 1e-5
    with pytest.raises(ValueError, match="shares"):
        LossReweighter({"ce": 1.0, "p": 1.0}).set_shares({"ce": 1.0})


def test_inert_terms_warn_once_per_term():
    stream = io.StringIO()
    inert = InertTerms(stream)
    row = {"step": 3, "grad_ratio_weighted": {"p": 2e-7, "r": 0.4, "d": INERT_RATIO / 2}}
    messages = inert.check(row)
    assert len(messages) == 2 and "inert term p (perception)" in messages[0] and "2.00e-07" in messages[0]
    assert "inert term d (planning)" in messages[1] and "--set loss.scale=balanced" in messages[1]
    assert inert.check(row) == [] and stream.getvalue().count("warning: inert term") == 2
    assert inert.check({"step": 1, "losses": {}}) == []  # plain mode: no norms, no warning


# ---------------------------------------------------------------- on the tiny student
def window(model_dir):
    return [make_item(model_dir, key=f"k{i}", capability=c, seed=i) for i, c in enumerate(CAPABILITIES)]


def test_logged_gradient_norms_and_ratios_equal_autograd(tiny_models):
    model_dir = tiny_models["internvl", "student"]
    model = student(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    config = LossConfig(lam_p=2.0, lam_d=0.5)
    weights = TermWeights(config, TERMS, CPU)
    forward = CapturedForward(model, PLAN, CPU)
    items = window(model_dir)
    expected = {t: [] for t in ["ce", *TERMS]}
    for item in items:
        losses = forward(item, TERMS)
        for t in expected:
            expected[t].append(float(flat_grads(losses[t], params).norm()))
    mean = {t: sum(v) / len(v) for t, v in expected.items()}
    stepper = MicroStepper(forward=forward, weights=weights, params=params, device=CPU, scale=1 / 3,
                           bank=GradBank(params, 4), agp=True, generator=torch.Generator().manual_seed(0))
    for item in items:
        stepper.micro_step(item)
    summary = stepper.finish_window(step=1)
    assert summary["grad_norm"] == pytest.approx(mean, rel=1e-4)
    lam = {"ce": 1.0, "p": 2.0, "r": 1.0, "d": 0.5}
    assert summary["grad_norm_weighted"] == pytest.approx({t: lam[t] * v for t, v in mean.items()}, rel=1e-4)
    assert summary["grad_ratio"] == pytest.approx({t: mean[t] / mean["ce"] for t in TERMS}, rel=1e-4)
    assert summary["grad_ratio_weighted"] == pytest.approx({t: lam[t] * mean[t] / mean["ce"] for t in TERMS}, rel=1e-4)
    plain = MicroStepper(forward=forward, weights=weights, params=params, device=CPU)
    plain.micro_step(items[0])
    assert "grad_norm" not in plain.finish_window(step=1)  # one backward of the sum: no per-term gradients


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_balanced_hits_the_requested_ratios_on_its_first_window(tiny_models, kind):
    model_dir = tiny_models["internvl", "student"]
    model = student(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    config = LossConfig(scale="balanced", kind=kind, balance_ratio={"perception": 0.5, "reasoning": 0.2,
                                                                    "planning": 1.0})
    reweighter = LossReweighter({"ce": 1.0, "p": 1.0, "r": 1.0, "d": 1.0})
    weights = TermWeights(config, TERMS, CPU, reweighter)
    forward = CapturedForward(model, PLAN, CPU, loss_kind=kind)
    items = window(model_dir)
    record = calibrate(forward, weights, params, items, config)
    apply_calibration(record, weights, reweighter)
    stepper = MicroStepper(forward=forward, weights=weights, params=params, device=CPU, scale=1 / 3,
                           bank=GradBank(params, 4), agp=True, generator=torch.Generator().manual_seed(0))
    for item in items:
        stepper.micro_step(item)
    summary = stepper.finish_window(step=1)
    assert summary["grad_ratio_weighted"] == pytest.approx({"p": 0.5, "r": 0.2, "d": 1.0}, rel=0.01)
    assert summary["weights"] == pytest.approx(record["lambdas"], rel=1e-5)
    assert min(record["lambdas"][t] for t in TERMS) > 10  # the reference lambdas (1) were far too small
    after = {t: float(v) for t, v in reweighter.step().items()}  # starts at its equilibrium: barely moves
    assert after == pytest.approx({"ce": 1.0, "p": 1.0, "r": 1.0, "d": 1.0}, rel=1e-3)


def test_scale_options_validated_at_load():
    from train_student.config import ConfigError, build_parser, config_from_args

    base = ["--student", "S", "--data", "D", "--out", "R", "--cache", "C"]
    c = config_from_args(build_parser().parse_args(base))
    assert (c.loss.kind, c.loss.scale, c.loss.balance_ratio) == ("kl", "balanced", dict.fromkeys(CAPABILITIES, 0.5))
    assert c.loss.mix == {k: list(v) for k, v in UNIFORM_MIX.items()}  # the study's recommended settings
    c = config_from_args(build_parser().parse_args([*base, "--reference"]))  # METHOD exactly, one flag away
    assert (c.loss.kind, c.loss.scale, c.loss.mix) == ("mse", "reference", {k: list(v) for k, v in REFERENCE_MIX.items()})
    c = config_from_args(build_parser().parse_args([*base, "--reference", "--set", "loss.kind=cosine"]))
    assert (c.loss.kind, c.loss.scale) == ("cosine", "reference")  # --set still overrides one field
    c = config_from_args(build_parser().parse_args([*base, "--set", "loss.balance_ratio.reasoning=0.2"]))
    assert c.loss.balance_ratio == {"perception": 0.5, "reasoning": 0.2, "planning": 0.5}
    with pytest.raises(ConfigError) as err:
        config_from_args(build_parser().parse_args([*base, "--set", "loss.kind=l1", "--set", "loss.scale=big",
                                                    "--set", "loss.balance_ratio.planning=0"]))
    message = str(err.value)
    assert "loss.kind='l1': choose from ('mse', 'kl', 'cosine')" in message
    assert "loss.scale='big': choose from ('reference', 'balanced')" in message
    assert "loss.balance_ratio has {'planning': 0.0}" in message


def test_reweighter_starts_at_large_static_weights():
    weights = LossReweighter({"ce": 1.0, "p": 5e3, "d": 1e-3}).weights()
    assert {t: float(v) for t, v in weights.items()} == pytest.approx({"ce": 1.0, "p": 5e3, "d": 1e-3}, rel=1e-4)
