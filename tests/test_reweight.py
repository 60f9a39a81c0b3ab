"""Online loss reweighting (METHOD §6) against a naive per-term implementation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train_student.reweight import LossReweighter

STATIC = {"ce": 1.0, "p": 0.8, "r": 0.1, "d": 0.1}


def inverse_softplus(w):
    return torch.log(torch.expm1(w).clamp_min(1e-20))


class NaiveReweighter:
    """METHOD §6 written term by term with torch.optim.AdamW (one Parameter per term)."""

    def __init__(self, static, *, alpha=0.0, lr=3e-4, betas=(0.9, 0.99), ce_floor=0.6):
        self.terms = [t for t in ("ce", "p", "r", "d") if static.get(t, 0) > 0]
        self.static, self.alpha, self.ce_floor = static, alpha, ce_floor
        self.a = {
            t: nn.Parameter(inverse_softplus(torch.tensor(float(static[t])).clamp(1e-6, 1e6)))
            for t in self.terms
        }
        self.opt = torch.optim.AdamW(
            list(self.a.values()), lr=lr, betas=betas, weight_decay=0.0, foreach=False
        )
        self.loss0 = {}
        self.window = {t: ([], []) for t in self.terms}
        self.micro_steps = 0

    def weights(self):
        out = {}
        for t in self.terms:
            w = torch.clamp(F.softplus(self.a[t]) + 1e-8, 1e-6, 1e6)
            out[t] = torch.clamp(w, min=self.ce_floor) if t == "ce" else w
        return out

    def observe(self, losses, norms):
        self.micro_steps += 1
        for t in losses:
            self.window[t][0].append(float(losses[t]))
            self.window[t][1].append(float(norms[t]))

    def step(self):
        # the reference divides by the window's micro-steps, also those where a term was absent
        n = self.micro_steps
        means = {t: (sum(ls) / n, sum(ns) / n) for t, (ls, ns) in self.window.items() if ls}
        self.window = {t: ([], []) for t in self.terms}
        self.micro_steps = 0
        avail = [t for t in self.terms if t in means]
        if len(avail) <= 1:
            return
        for t in avail:
            self.loss0.setdefault(t, means[t][0])
        w = self.weights()
        big_g = {t: w[t] * means[t][1] for t in avail}
        g_sum = sum(big_g.values())
        if float(g_sum.detach()) <= 0:
            return
        static_sum = sum(self.static[t] for t in avail)
        ratios = {t: means[t][0] / max(1e-12, self.loss0[t]) for t in avail}
        r_bar = sum(ratios.values()) / len(avail)
        objective = 0
        for t in avail:
            share = self.static[t] / static_sum
            target = share * g_sum * (ratios[t] / r_bar) ** self.alpha  # Gs not detached (ref)
            objective = objective + (big_g[t] - target).abs()
        self.opt.zero_grad()
        objective.backward()
        self.opt.step()
        with torch.no_grad():
            w = self.weights()
            scale = static_sum / sum(float(w[t]) for t in avail)
            for t in avail:
                new = torch.clamp(w[t] * scale, 1e-6, 1e6)
                if t == "ce":
                    new = torch.clamp(new, min=self.ce_floor)
                self.a[t].copy_(inverse_softplus(new))


def tensors(**values):
    return {k: torch.tensor(float(v)) for k, v in values.items()}


def as_floats(weights):
    return {t: float(w.detach()) for t, w in weights.items()}


def window(gen, terms, n_micro=4):
    """Random micro-step observations; a term is absent from a micro-step with prob. 1/3."""
    steps = []
    for _ in range(n_micro):
        present = [t for t in terms if t == "ce" or torch.rand(1, generator=gen) > 1 / 3]
        losses = {t: torch.rand((), generator=gen) * 2 + 0.1 for t in present}
        norms = {t: torch.rand((), generator=gen) * (10 if t == "p" else 1) for t in present}
        steps.append((losses, norms))
    return steps


def test_initial_weights_equal_static_and_zero_terms_dropped():
    rw = LossReweighter({"ce": 1.0, "p": 0.8, "r": 0.0, "d": 0.2})
    assert rw.terms == ["ce", "p", "d"]
    assert as_floats(rw.weights()) == pytest.approx({"ce": 1.0, "p": 0.8, "d": 0.2}, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_matches_naive_implementation(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 10))
    fast, naive = LossReweighter(STATIC, alpha=alpha), NaiveReweighter(STATIC, alpha=alpha)
    for _ in range(25):
        for losses, norms in window(gen, list(STATIC)):
            fast.observe(losses, norms)
            naive.observe(losses, norms)
        fast.step()
        naive.step()
        assert as_floats(fast.weights()) == pytest.approx(as_floats(naive.weights()), abs=2e-6)
    moved = as_floats(fast.weights())
    assert moved != pytest.approx(STATIC, abs=1e-5)


def test_hand_computed_single_step():
    # w = (1, 1), n = (1, 3): G = (1, 3), Gs = 4, targets (2, 2). The objective's gradient is
    # (-1, +3) * sigmoid(a); AdamW's first step moves each a by lr against its sign; the weights
    # move by about lr * sigmoid(a0) = 3e-4 * (1 - 1/e) and the rescale keeps their sum at 2.
    rw = LossReweighter({"ce": 1.0, "p": 1.0})
    rw.observe(tensors(ce=2.0, p=0.5), tensors(ce=1.0, p=3.0))
    w = as_floats(rw.step())
    delta = 3e-4 * (1 - math.exp(-1))
    assert w["ce"] == pytest.approx(1 + delta, abs=2e-7)
    assert w["p"] == pytest.approx(1 - delta, abs=2e-7)


def test_default_moves_are_about_1e_4_per_step():
    gen = torch.Generator().manual_seed(0)
    rw = LossReweighter(STATIC)
    for _ in range(5):
        before = as_floats(rw.weights())
        for losses, norms in window(gen, list(STATIC)):
            rw.observe(losses, norms)
        after = as_floats(rw.step())
        biggest = max(abs(after[t] - before[t]) for t in STATIC)
        assert 1e-5 < biggest < 5e-4


def test_large_gradient_norm_term_loses_weight():
    rw = LossReweighter({"ce": 1.0, "p": 1.0, "r": 1.0})
    for _ in range(300):
        for _ in range(2):
            rw.observe(
                {t: torch.tensor(1.0) for t in ("ce", "p", "r")},
                tensors(ce=1.0, p=50.0, r=1.0),
            )
        w = as_floats(rw.step())
    assert w["p"] < 1.0 - 0.01 and w["p"] < w["ce"] and w["p"] < w["r"]
    assert sum(w.values()) == pytest.approx(3.0, abs=1e-4)


def test_ce_floor_holds():
    rw = LossReweighter({"ce": 0.3, "p": 1.0})
    assert float(rw.weights()["ce"]) == pytest.approx(0.6)
    for _ in range(200):
        rw.observe(tensors(ce=1.0, p=1.0), tensors(ce=100.0, p=0.1))
        w = as_floats(rw.step())
        assert w["ce"] >= 0.6


def test_skipped_windows_leave_state_untouched():
    rw = LossReweighter(STATIC)
    start = rw.state_dict()
    rw.observe(tensors(ce=1.0), tensors(ce=2.0))  # one term only
    rw.step()
    rw.observe(tensors(ce=1.0, p=1.0), tensors(ce=0.0, p=0.0))
    rw.step()  # every norm 0
    state = rw.state_dict()
    for key in ("a", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(state[key], start[key])
    rw.observe(tensors(ce=1.0, p=1.0), tensors(ce=1.0, p=2.0))
    rw.step()  # r and d absent: untouched, ce and p step once
    state = rw.state_dict()
    assert state["steps"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.equal(state["a"][2:], start["a"][2:])
    assert not torch.equal(state["a"][:2], start["a"][:2])


def test_state_dict_round_trip_reproduces_next_step():
    gen = torch.Generator().manual_seed(4)
    rw = LossReweighter(STATIC, alpha=0.5)
    for _ in range(3):
        for losses, norms in window(gen, list(STATIC)):
            rw.observe(losses, norms)
        rw.step()
    partial = window(gen, list(STATIC), n_micro=2)
    rw.observe(*partial[0])  # checkpoint in the middle of a window
    saved = copy.deepcopy(rw.state_dict())
    resumed = LossReweighter(STATIC, alpha=0.5)
    resumed.load_state_dict(saved)
    for r in (rw, resumed):
        r.observe(*partial[1])
        r.step()
    for key, value in rw.state_dict().items():
        if key != "terms":
            assert torch.equal(value, resumed.state_dict()[key]), key
    with pytest.raises(ValueError, match="terms"):
        LossReweighter({"ce": 1.0, "p": 1.0}).load_state_dict(saved)


def test_argument_validation():
    with pytest.raises(ValueError, match="unknown terms"):
        LossReweighter({"ce": 1.0, "kl": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        LossReweighter({"ce": 1.0, "p": -1.0})
    with pytest.raises(ValueError, match="> 0"):
        LossReweighter({"ce": 0.0})
    rw = LossReweighter({"ce": 1.0, "p": 1.0})
    with pytest.raises(ValueError, match="same keys"):
        rw.observe(tensors(ce=1.0), tensors(p=1.0))
    with pytest.raises(ValueError, match="same keys"):
        rw.observe(tensors(d=1.0), tensors(d=1.0))


def test_step_needs_no_host_values():
    """Meta tensors have no values: any .item() or branch on a tensor value would raise."""
    rw = LossReweighter({"ce": 1.0, "p": 1.0, "r": 0.5}, alpha=0.5, device="meta")
    meta = {t: torch.empty((), device="meta") for t in ("ce", "p")}
    rw.observe(meta, meta)
    assert set(rw.step()) == {"ce", "p", "r"}


def test_zero_losses_with_alpha_stay_finite():
    rw = LossReweighter({"ce": 1.0, "p": 1.0}, alpha=0.5)
    for _ in range(3):
        rw.observe(tensors(ce=0.0, p=0.0), tensors(ce=1.0, p=2.0))
        assert all(math.isfinite(w) for w in as_floats(rw.step()).values())


def test_window_means_count_every_micro_step_and_gs_is_not_detached():
    # window: (ce=2, p=4) then (ce=2) only: p's mean loss is 4 / 2 micro-steps = 2 (the reference
    # divides by its accumulator's count), not 4; loss0 records it.
    rw = LossReweighter({"ce": 1.0, "p": 1.0})
    rw.observe(tensors(ce=2.0, p=4.0), tensors(ce=1.0, p=1.0))
    rw.observe(tensors(ce=2.0), tensors(ce=1.0))
    rw.step()
    assert rw.state["loss0"].tolist() == [2.0, 2.0]
    # Gs stays attached: w = (1, 1, 2), n = (1, 4, 1) -> G = (1, 4, 2), Gs = 7, shares (1/4, 1/4, 1/2),
    # residuals G - share * Gs = (-0.75, 2.25, -1.5). d obj / d G_j = sign_j - sum_k share_k sign_k
    # = sign_j + 0.5 (with Gs detached it would be sign_j), and d G_j / d a_j = n_j * sigmoid(a_j).
    three = LossReweighter({"ce": 1.0, "p": 1.0, "r": 2.0})
    norms = torch.tensor([1.0, 4.0, 1.0])
    grad, g_sum = three._objective_grad(torch.tensor([True, True, True]), torch.ones(3), norms)
    expected = torch.tensor([-0.5, 1.5, -0.5]) * norms * torch.sigmoid(three.state["a"])
    torch.testing.assert_close(grad, expected)
    assert float(g_sum) == pytest.approx(7.0)
