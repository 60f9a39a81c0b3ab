"""The micro-step on a tiny student: AGP equals a direct computation, no-AGP is one backward of the
weighted sum, NaN stops with the key, checkpointing keeps captured maps, per-parameter AGP."""

import pytest
import torch
from conftest import make_sample

from pipeline.attention.capture import enable_capture
from pipeline.attention.layout import build_layout
from pipeline.attention.maps import dense_to_tril, tv_block
from pipeline.models.load import load_model
from pipeline.models.processors import load_processor
from schemas.method import REFERENCE_MIX, LayerPlan
from train_student.agp import GradBank, agp_reference
from train_student.config import LossConfig
from train_student.data import TrainItem
from train_student.losses import row_cosine, row_kl
from train_student.online import ParameterGrads, per_parameter_combine
from train_student.reweight import LossReweighter
from train_student.step import (
    CapturedForward,
    MicroStepper,
    NonFiniteLossError,
    TermWeights,
    distill_losses,
    prepare_student,
)

CPU = torch.device("cpu")
TERMS = ["p", "r", "d"]
PLAN = LayerPlan.for_model(4, 0, -2)


def make_item(model_dir, *, key="k0", capability="perception", seed=0, nan=False):
    record, images = make_sample(1, key=key, capability=capability)
    lay = build_layout(record, images, load_processor(model_dir))
    g = torch.Generator().manual_seed(seed)
    s, n_text, n_vision = lay.seq_len, lay.n_text, lay.n_vision
    targets = {"perception": torch.rand(n_text, n_vision, generator=g) / n_vision,
               "planning": torch.rand(n_text, n_vision, generator=g) / n_vision,
               "reasoning": dense_to_tril(torch.rand(len(PLAN.mid), s, s, generator=g).tril() * 2 / s)}
    if nan:
        targets["perception"][0, 0] = float("nan")
    return TrainItem(key=key, index=0, capability=capability, inputs=lay.model_inputs, labels=lay.labels,
                     is_vision=lay.is_vision, answer_start=lay.answer_span[0], targets=targets)


def student(model_dir):
    torch.manual_seed(0)
    model = load_model(model_dir)
    enable_capture(model)
    model.train()
    return model


def flat_grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]).double()


def test_agp_step_equals_direct_computation(tiny_models):
    model_dir = tiny_models["internvl", "student"]
    model = student(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    reweighter = LossReweighter({"ce": 1.0, "p": 1.0, "r": 1.0, "d": 1.0})
    weights = TermWeights(LossConfig(), TERMS, CPU, reweighter)
    forward = CapturedForward(model, PLAN, CPU)
    generator = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    stepper = MicroStepper(forward=forward, weights=weights, params=params, device=CPU, scale=0.5,
                           bank=GradBank(params, 4), agp=True, generator=generator)
    expected, norms = 0, []
    for i, capability in enumerate(["perception", "planning"]):
        item = make_item(model_dir, key=f"k{i}", capability=capability, seed=i)
        stepper.micro_step(item)
        losses = forward(item, TERMS)
        present, _, w = weights.for_sample(capability)
        g = {t: flat_grads(losses[t] * 0.5, params) for t in present}
        norms.append([float(g[t].norm()) for t in present])
        order = [TERMS[int(j) - 1] for j in torch.randperm(3, generator=replay) + 1]
        expected = expected + agp_reference(w[0].double() * g["ce"],
                                            {t: w[j + 1].double() * g[t] for j, t in enumerate(TERMS)}, order)
    got = stepper.bank.total.double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    torch.testing.assert_close(reweighter.state["norm_sum"], torch.tensor(norms).sum(0).float(), rtol=1e-4, atol=0)
    summary = stepper.finish_window(step=1)
    assert summary["samples"] == 2 and set(summary["losses"]) == {"ce", "p", "r", "d"}
    assert set(summary["cos"]) == {"ce/p", "ce/r", "ce/d", "p/r", "p/d", "r/d"} and summary["nonfinite_key"] is None


def test_without_agp_one_backward_of_the_weighted_sum(tiny_models, monkeypatch):
    model_dir = tiny_models["internvl", "student"]
    model = student(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = TermWeights(LossConfig(lam_p=2.0, mix={k: list(v) for k, v in REFERENCE_MIX.items()}), TERMS, CPU)
    forward = CapturedForward(model, PLAN, CPU)
    item = make_item(model_dir, capability="reasoning")
    losses = forward(item, TERMS)
    present, _, w = weights.for_sample("reasoning")
    assert present == ["ce", "p", "r", "d"]
    torch.testing.assert_close(w, torch.tensor([1.0, 0.2, 0.8, 0.1]))
    expected = flat_grads(0.25 * sum(w[i] * losses[t] for i, t in enumerate(present)), params)
    calls = []
    original = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    MicroStepper(forward=forward, weights=weights, params=params, device=CPU, scale=0.25).micro_step(item)
    assert len(calls) == 1
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_nonfinite_loss_stops_with_step_and_key(tiny_models):
    model_dir = tiny_models["internvl", "student"]
    model = student(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = MicroStepper(forward=CapturedForward(model, PLAN, CPU), weights=TermWeights(LossConfig(), TERMS, CPU),
                           params=params, device=CPU, bank=GradBank(params, 4), agp=True,
                           generator=torch.Generator().manual_seed(0))
    stepper.micro_step(make_item(model_dir, key="good"))
    stepper.micro_step(make_item(model_dir, key="poisoned", nan=True))
    with pytest.raises(NonFiniteLossError, match="optimizer step 3, sample poisoned"):
        stepper.finish_window(step=3)


def test_gradient_checkpointing_skips_captured_layers(tiny_models):
    model_dir = tiny_models["internvl", "student"]
    item = make_item(model_dir, capability="planning")
    grads = []
    for checkpointing in (False, True):
        model = student(model_dir)
        summary = prepare_student(model, freeze_vision=True, gradient_checkpointing=checkpointing,
                                  captured=PLAN.layers(TERMS))
        assert "vision tower frozen" in summary
        layers = model.model.language_model.layers
        if checkpointing:
            assert [layer.gradient_checkpointing for layer in layers] == [False, False, False, True]
        params = [p for p in model.parameters() if p.requires_grad]
        assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
        losses = CapturedForward(model, PLAN, CPU)(item, TERMS)
        grads.append([flat_grads(losses[t], params) for t in ("ce", "p", "d")])
    for plain, checkpointed in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-9)


def test_packed_and_dense_reasoning_targets_agree():
    g = torch.Generator().manual_seed(0)
    maps = {layer: torch.rand(9, 9, generator=g).tril() for layer in range(3)}
    dense = torch.rand(3, 9, 9, generator=g).tril()
    is_vision = torch.tensor([False, True, True, True, False, False, True, False, False])
    a = distill_losses(maps, is_vision, {"reasoning": dense}, PLAN, ["r"])["r"]
    b = distill_losses(maps, is_vision, {"reasoning": dense_to_tril(dense)}, PLAN, ["r"])["r"]
    torch.testing.assert_close(a, b)
    assert PLAN.layers(["p"]) == [0] and PLAN.layers(["d"]) == [2] and PLAN.layers(["r", "p"]) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["kl", "cosine"])
def test_distill_losses_of_a_row_kind(kind):
    g = torch.Generator().manual_seed(1)
    maps = {layer: torch.rand(9, 9, generator=g).tril() for layer in range(3)}
    is_vision = torch.tensor([False, True, True, True, False, False, True, False, False])
    targets = {"perception": torch.rand(5, 4, generator=g), "planning": torch.rand(5, 4, generator=g),
               "reasoning": torch.rand(3, 9, 9, generator=g).tril()}
    losses = distill_losses(maps, is_vision, targets, PLAN, TERMS, kind)
    row = row_kl if kind == "kl" else row_cosine
    torch.testing.assert_close(losses["p"], row(tv_block(maps[0], is_vision), targets["perception"]))
    torch.testing.assert_close(losses["d"], row(tv_block(maps[2], is_vision), targets["planning"]))
    torch.testing.assert_close(losses["r"], row(torch.stack([maps[i] for i in PLAN.mid]), targets["reasoning"]))


def test_term_weights_skip_zero_mix_and_lambdas():
    weights = TermWeights(LossConfig(lam_r=0.0, mix={"perception": [1, 0, 1], "reasoning": [0.1, 0.8, 0.1],
                                                     "planning": [0.1, 0.1, 0.8]}), TERMS, CPU)
    present, ids, w = weights.for_sample("perception")
    assert present == ["ce", "p", "d"] and ids.tolist() == [0, 1, 3]
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 0.5]))
    assert weights.for_sample("reasoning")[0] == ["ce", "p", "d"]


def test_per_parameter_agp_equals_reference():
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (5,), (2, 2)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    bank = ParameterGrads(params)
    rows = []
    for row in range(4):
        grads = [torch.randn(s, generator=g) - (row > 0) * 0.8 for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        bank.store(row)
        rows.append(torch.cat([x.reshape(-1) for x in grads]).double())
    weights = torch.tensor([1.0, 0.8, 0.1, 0.1])
    stats = per_parameter_combine(bank, 4, torch.Generator().manual_seed(9), weights, True)
    order = [TERMS[int(j) - 1] for j in torch.randperm(3, generator=torch.Generator().manual_seed(9)) + 1]
    expected = agp_reference(rows[0], {t: weights[i + 1].double() * rows[i + 1] for i, t in enumerate(TERMS)}, order)
    bank.flush_to_grads()
    got = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    assert stats["fired"].sum() > 0
    torch.testing.assert_close(stats["norms"].double(), torch.stack([r.norm() for r in rows]), rtol=1e-5, atol=0)
