"""AGP (METHOD §5): Gram-space coefficients against the direct definition on flat vectors."""

import pytest
import torch
from torch import nn

from train_student.agp import GradBank, agp_coefficients, agp_reference, agp_step

NAMES = ("p", "r", "d")
KINDS = ("random", "conflicting", "aligned", "orthogonal", "zero_term", "zero_ce")


def make_bases(kind, n_terms, gen, size=24):
    """``[1 + n_terms, size]`` float64 bases ``[g_ce, g_c...]`` of one scenario."""
    g_ce = torch.randn(size, generator=gen, dtype=torch.float64)
    noise = torch.randn(n_terms, size, generator=gen, dtype=torch.float64)
    scale = torch.rand(n_terms, 1, generator=gen, dtype=torch.float64) + 0.5
    if kind == "random":
        terms = noise
    elif kind == "conflicting":
        terms = -scale * g_ce + 0.5 * noise
    elif kind == "aligned":
        terms = scale * g_ce + 0.1 * noise
    elif kind == "orthogonal":  # disjoint supports: every dot product is exactly 0
        bases = torch.zeros(1 + n_terms, size, dtype=torch.float64)
        for i in range(1 + n_terms):
            bases[i, i * 4 : i * 4 + 4] = torch.randn(4, generator=gen, dtype=torch.float64)
        return bases
    elif kind == "zero_term":
        terms = -scale * g_ce + noise
        terms[0] = 0
    else:  # zero_ce
        terms = noise
        g_ce = torch.zeros_like(g_ce)
    return torch.cat([g_ce[None], terms])


def reference_for(bases, order):
    terms = {NAMES[i]: bases[1 + i] for i in range(bases.shape[0] - 1)}
    return agp_reference(bases[0], terms, [NAMES[int(i) - 1] for i in order])


def gram_of(bases):
    """Gram matrix without BLAS (tiny CPU matmuls are slow in some MKL builds)."""
    return (bases[:, None] * bases[None]).sum(-1)


def rel_err(got, expected):
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_coefficients_match_reference(kind, n_terms):
    gen = torch.Generator().manual_seed(1000 * n_terms + KINDS.index(kind))
    fired_total = 0
    for _ in range(40):
        bases = make_bases(kind, n_terms, gen)
        order = torch.randperm(n_terms, generator=gen) + 1
        coeffs, fired = agp_coefficients(gram_of(bases), order)
        assert coeffs.shape == (1 + n_terms,) and fired.shape == (2, n_terms)
        assert rel_err(coeffs @ bases, reference_for(bases, order)) < 1e-5
        fired_total += int(fired.sum())
    if kind == "conflicting" or (kind in ("random", "zero_term") and n_terms > 1):
        assert fired_total > 0  # the scenario exercises the projections
    if kind in ("aligned", "orthogonal"):
        assert fired_total == 0


def test_float32_gram_close_to_float64_reference():
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        bases = make_bases("conflicting", 3, gen)
        order = torch.randperm(3, generator=gen) + 1
        coeffs, _ = agp_coefficients((gram_of(bases)).float(), order)
        assert rel_err(coeffs.double() @ bases, reference_for(bases, order)) < 1e-4


def test_only_ce_and_all_zero():
    gram = torch.tensor([[4.0]])
    coeffs, fired = agp_coefficients(gram, torch.zeros(0, dtype=torch.long))
    assert coeffs.tolist() == [1.0] and fired.shape == (2, 0)
    zeros = torch.zeros(4, 5, dtype=torch.float64)
    coeffs, fired = agp_coefficients(zeros @ zeros.T, torch.tensor([2, 1, 3]))
    assert torch.isfinite(coeffs).all() and int(fired.sum()) == 0
    assert torch.equal(reference_for(zeros, [2, 1, 3]), torch.zeros(5, dtype=torch.float64))


def test_hand_computed_2d_example():
    # g_ce=(1,0), g_p=(-1,1), g_r=(0,-2):
    # stage 1: m_p = g_ce + (0,1) = (1,1) (fired), m_r = g_ce + g_r = (1,-2) (g_r . g_ce = 0);
    # stage 2: m_p . m_r = -1: u_p = (1,1) + (1,-2)/5 = (1.2,0.6), u_r = (1,-2) + (1,1)/2 = (1.5,-1.5)
    bases = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    expected = torch.tensor([2.7, -0.9], dtype=torch.float64)
    for order in ([1, 2], [2, 1]):
        coeffs, fired = agp_coefficients(gram_of(bases), torch.tensor(order))
        torch.testing.assert_close(coeffs, torch.tensor([4.2, 1.5, 1.2], dtype=torch.float64))
        assert fired.tolist() == [[1, 0], [1, 1]]
        torch.testing.assert_close(reference_for(bases, order), expected)
    no_proj = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(reference_for(no_proj, [1]), torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_stage2_order_matters_with_three_terms():
    gen = torch.Generator().manual_seed(3)
    differs = False
    for _ in range(20):
        bases = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        bases[0] *= 0.1  # a weak anchor leaves the merged gradients free to conflict
        results = [
            agp_coefficients(gram_of(bases), torch.tensor(o))[0] @ bases
            for o in ([1, 2, 3], [3, 2, 1])
        ]
        differs |= not torch.allclose(*results)
    assert differs


def test_coefficients_need_no_host_values():
    """Meta tensors have no values: any .item() or branch on a tensor value would raise."""
    gram = torch.empty(4, 4, device="meta")
    coeffs, fired = agp_coefficients(gram, torch.empty(3, dtype=torch.long, device="meta"))
    assert coeffs.shape == (4,) and fired.shape == (2, 3)


def test_reference_rejects_bad_order():
    with pytest.raises(ValueError):
        agp_reference(torch.zeros(2), {"p": torch.zeros(2)}, ["r"])


# ---- GradBank and agp_step on a tiny module -------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(2))  # never gets a gradient
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x) * self.frozen))


def term_losses(model, x):
    out = model(x)
    return [out.square().mean(), (out - 1).abs().mean(), -out[:, 0].mean(), (out[:, 1] + 2).square().mean()]


def flat_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def run_window(model, bank, gen, inputs, weights=None):
    """Two micro-steps through the bank; returns the float64 AGP reference of the window."""
    expected = 0
    for x in inputs:
        losses = term_losses(model, x)
        for row, loss in enumerate(losses):
            loss.backward(retain_graph=True)
            bank.store(row)
        w = torch.ones(len(losses)) if weights is None else weights
        stats = agp_step(bank, len(losses), gen, weights=weights)
        bases = torch.stack([flat_grads(model, loss) for loss in losses]).double() * w[:, None].double()
        expected = expected + reference_for(bases, stats["order"])
    bank.flush_to_grads()
    return expected, stats


def model_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]).double()


@pytest.mark.parametrize("use_weights", [False, True])
def test_gradbank_round_trip_matches_reference(use_weights):
    torch.manual_seed(0)
    model = Tiny()
    bank = GradBank(model.parameters(), max_terms=4)
    assert bank.buffer.shape == (4, sum(p.numel() for p in model.parameters() if p.requires_grad))
    inputs = [torch.randn(5, 4), torch.randn(5, 4)]
    weights = torch.tensor([1.0, 0.5, 2.0, 0.3]) if use_weights else None
    expected, stats = run_window(model, bank, torch.Generator().manual_seed(1), inputs, weights)
    assert rel_err(model_grad(model), expected) < 1e-5
    assert model.frozen.grad is None and torch.equal(model.unused.grad, torch.zeros(2))
    assert torch.count_nonzero(bank.total) == 0  # flushed
    assert stats["fired"].shape == (2, 3) and stats["cos"].shape == (4, 4)
    torch.testing.assert_close(stats["cos"].diagonal(), torch.ones(4))
    torch.testing.assert_close(stats["norms"], bank.norms(4))


def test_gradbank_bf16_close_to_float32():
    torch.manual_seed(0)
    inputs = [torch.randn(5, 4), torch.randn(5, 4)]
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        model = Tiny()
        bank = GradBank(model.parameters(), max_terms=4, dtype=dtype)
        run_window(model, bank, torch.Generator().manual_seed(1), inputs)
        grads[dtype] = model_grad(model)
    assert rel_err(grads[torch.bfloat16], grads[torch.float32]) < 2e-2


def test_flush_adds_to_existing_grad_and_store_zeros():
    model = nn.Linear(2, 1, bias=False)
    bank = GradBank(model.parameters(), max_terms=2)
    model.weight.grad = torch.tensor([[1.0, 2.0]])
    bank.store(0)
    assert model.weight.grad is None
    bank.store(1)  # None grad -> zero row
    assert bank.buffer.tolist() == [[1.0, 2.0], [0.0, 0.0]]
    bank.combine(torch.tensor([3.0, 5.0]), 2)
    model.weight.grad = torch.tensor([[10.0, 10.0]])
    bank.flush_to_grads()
    assert model.weight.grad.tolist() == [[13.0, 16.0]]
    torch.testing.assert_close(bank.gram(2), torch.tensor([[5.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        bank.store(2)
    with pytest.raises(ValueError):
        bank.combine(torch.ones(3), 2)


def test_gradbank_validates_arguments():
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad"):
        GradBank([frozen], max_terms=2)
    with pytest.raises(ValueError, match="dtype"):
        GradBank(nn.Linear(2, 2).parameters(), max_terms=2, dtype=torch.float16)
    with pytest.raises(ValueError, match="max_terms"):
        GradBank(nn.Linear(2, 2).parameters(), max_terms=0)


def test_agp_step_order_generator_reproducible():
    def run(seed):
        model = nn.Linear(3, 4)
        with torch.no_grad():
            model.weight.copy_(torch.arange(12.0).view(4, 3) / 10)
            model.bias.zero_()
        bank = GradBank(model.parameters(), max_terms=4)
        gen = torch.Generator().manual_seed(seed)
        x = torch.tensor([[1.0, -2.0, 0.5]])
        orders, coeffs = [], []
        for step in range(6):
            out = model(x * (step + 1))
            for row, target in enumerate((0.0, 5.0, -3.0, 1.0)):
                (out[0, row] - target).square().backward(retain_graph=True)
                bank.store(row)
            stats = agp_step(bank, 4, gen)
            orders.append(stats["order"].tolist())
            coeffs.append(stats["coeffs"])
        return orders, torch.stack(coeffs)

    orders_a, coeffs_a = run(5)
    orders_b, coeffs_b = run(5)
    assert orders_a == orders_b and torch.equal(coeffs_a, coeffs_b)
    assert all(sorted(o) == [1, 2, 3] for o in orders_a)
    assert any(run(s)[0] != orders_a for s in (6, 7, 8))


def test_agp_step_ce_only():
    model = nn.Linear(2, 1)
    bank = GradBank(model.parameters(), max_terms=4)
    model(torch.ones(1, 2)).sum().backward()
    expected = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    bank.store(0)
    stats = agp_step(bank, 1, torch.Generator().manual_seed(0))
    assert stats["coeffs"].tolist() == [1.0] and stats["fired"].shape == (2, 0)
    bank.flush_to_grads()
    torch.testing.assert_close(torch.cat([model.weight.grad.reshape(-1), model.bias.grad]), expected)
