"""Attention-map geometry, losses and term mixing (METHOD §3-4) against naive loops and hand-computed values."""

import math

import pytest
import torch

from pipeline.attention.maps import (
    dense_to_tril,
    group_layers,
    group_mean,
    tril_to_dense,
    tv_block,
)
from schemas.method import REFERENCE_MIX, lambdas
from train_student.config import LossConfig
from train_student.losses import ROW_EPS, attention_losses, masked_tv_mse, reasoning_mse, row_cosine, row_kl
from train_student.mixing import normalise_mix, term_weights


def naive_group_layers(k, teacher_layers):
    m = len(teacher_layers)
    g = max(1, m - k + 1)
    groups = []
    for i in range(k):
        o = min(i, m - g)
        groups.append([teacher_layers[o + j] for j in range(g)])
    return groups


def naive_tv_loss(student, teacher, is_vision):
    """METHOD's L_p on full S x S maps: sum(M_tv * (A_s - A_t)^2) / max(1, sum(M_tv))."""
    size = student.shape[0]
    num, den = 0.0, 0
    for i in range(size):
        for j in range(size):
            if not is_vision[i] and is_vision[j]:
                num += float(student[i, j] - teacher[i, j]) ** 2
                den += 1
    return num / max(1, den)


def causal_maps(*lead, size, generator):
    logits = torch.randn(*lead, size, size, generator=generator)
    mask = torch.ones(size, size, dtype=torch.bool).triu(1)
    return logits.masked_fill(mask, float("-inf")).softmax(-1)


# ---- layer ranges and groups ----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 9, 12])
@pytest.mark.parametrize("m", [1, 3, 9, 14])
def test_group_layers_matches_naive(k, m):
    teacher = list(range(10, 10 + m))
    assert group_layers(k, teacher) == naive_group_layers(k, teacher)


def test_group_layers_hand_values():
    assert group_layers(3, [0, 1, 2, 3, 4]) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert group_layers(4, [7, 8]) == [[7], [8], [8], [8]]  # m < k: g = 1, o clamps
    with pytest.raises(ValueError):
        group_layers(3, [])


@pytest.mark.parametrize("k,m", [(3, 7), (5, 5), (6, 2), (1, 4)])
def test_group_mean_matches_naive(k, m):
    gen = torch.Generator().manual_seed(k * 10 + m)
    maps = torch.randn(m, 4, 6, generator=gen)
    expected = torch.stack([maps[grp].mean(0) for grp in naive_group_layers(k, list(range(m)))])
    got = group_mean(maps, k)
    assert got.shape == (k, 4, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_group_mean_hand_value():
    maps = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(4, 1)  # m=4, k=2 -> g=3
    assert group_mean(maps, 2).flatten().tolist() == pytest.approx([7 / 3, 14 / 3])


# ---- text-to-vision loss ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_masked_tv_mse_equals_full_map_loss(seed):
    gen = torch.Generator().manual_seed(seed)
    size = 9
    is_vision = torch.rand(size, generator=gen) < 0.5
    student = causal_maps(size=size, generator=gen).requires_grad_(True)
    teacher = causal_maps(size=size, generator=gen)
    loss = masked_tv_mse(tv_block(student, is_vision), tv_block(teacher, is_vision))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(naive_tv_loss(student.detach(), teacher, is_vision), rel=1e-5)
    loss.backward()
    mask = (~is_vision)[:, None] & is_vision[None, :]
    assert student.grad[~mask].abs().max() == 0
    if mask.any():
        assert student.grad[mask].abs().max() > 0


def test_tv_block_matches_loop():
    gen = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 6, 6, generator=gen)
    is_vision = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    text = [i for i in range(6) if not is_vision[i]]
    vision = [j for j in range(6) if is_vision[j]]
    expected = torch.tensor([[[attn[b, i, j] for j in vision] for i in text] for b in range(2)])
    torch.testing.assert_close(tv_block(attn, is_vision), expected)
    with pytest.raises(ValueError):
        tv_block(attn, is_vision[:5])


def test_masked_tv_mse_hand_value_and_empty_blocks():
    student = torch.zeros(3, 3)
    teacher = torch.zeros(3, 3)
    student[0, 1], student[2, 1] = 0.5, 0.1  # text rows 0 and 2, vision column 1
    student[1, 0] = 9.0  # vision row: not in the mask
    is_vision = torch.tensor([False, True, False])
    loss = masked_tv_mse(tv_block(student, is_vision), tv_block(teacher, is_vision))
    assert float(loss) == pytest.approx((0.25 + 0.01) / 2)
    for mask in (torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)):
        s = torch.rand(3, 3, requires_grad=True)
        empty = masked_tv_mse(tv_block(s, mask), tv_block(torch.rand(3, 3), mask))
        assert empty.item() == 0.0
        empty.backward()  # a graph exists even without masked entries
    with pytest.raises(ValueError):
        masked_tv_mse(torch.zeros(2, 3), torch.zeros(3, 2))


def test_masked_tv_mse_casts_to_float32():
    s = torch.rand(4, 5, dtype=torch.bfloat16)
    t = torch.rand(4, 5, dtype=torch.float16)
    expected = ((s.float() - t.float()) ** 2).sum() / 20
    out = masked_tv_mse(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# ---- reasoning loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_reasoning_mse_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    k, size = 3, 5
    student = causal_maps(k, size=size, generator=gen).requires_grad_(True)
    target = causal_maps(k, size=size, generator=gen)
    plain = student.detach()
    per_layer = []
    for layer in range(k):
        total = sum(
            float(plain[layer, i, j] - target[layer, i, j]) ** 2
            for i in range(size)
            for j in range(size)
        )
        per_layer.append(total / (size * size))
    loss = reasoning_mse(student, target)
    assert loss.item() == pytest.approx(sum(per_layer) / k, rel=1e-5)
    loss.backward()
    assert student.grad.abs().sum() > 0


def test_reasoning_mse_hand_value_and_shape_error():
    student = torch.zeros(2, 2, 2)
    student[0, 0, 0] = 1.0
    student[1, 1, 0] = 2.0
    assert float(reasoning_mse(student, torch.zeros(2, 2, 2))) == pytest.approx((1 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError):
        reasoning_mse(torch.zeros(2, 3, 3), torch.zeros(1, 3, 3))


def test_reasoning_pipeline_from_packed_teacher_maps():
    gen = torch.Generator().manual_seed(3)
    size, k, m = 6, 3, 5
    teacher = causal_maps(m, size=size, generator=gen)
    student = causal_maps(k, size=size, generator=gen)
    packed = dense_to_tril(teacher).half()  # as in the cache
    targets = tril_to_dense(group_mean(packed, k), size)
    expected = torch.stack([teacher.half().float()[g].mean(0) for g in group_layers(k, list(range(m)))])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(reasoning_mse(student, targets), ((student - expected) ** 2).mean())


# ---- per-row kinds: KL and cosine ---------------------------------------------------------------


def naive_row_kl(student, teacher):
    """Loop over rows: KL(teacher row || student row), rows renormalised, empty teacher rows left out."""
    s, t = student.reshape(-1, student.shape[-1]).tolist(), teacher.reshape(-1, teacher.shape[-1]).tolist()
    values = []
    for srow, trow in zip(s, t):
        trow = [max(v, 0.0) for v in trow]
        if sum(trow) <= ROW_EPS:
            continue
        p = [v / sum(trow) for v in trow]
        q = [v / max(sum(srow), ROW_EPS) for v in srow]
        values.append(sum(pj * (math.log(pj + ROW_EPS) - math.log(qj + ROW_EPS)) for pj, qj in zip(p, q)))
    return sum(values) / max(1, len(values))


def naive_row_cosine(student, teacher):
    s, t = student.reshape(-1, student.shape[-1]).tolist(), teacher.reshape(-1, teacher.shape[-1]).tolist()
    values = []
    for srow, trow in zip(s, t):
        tn = math.sqrt(sum(v * v for v in trow))
        if tn <= ROW_EPS:
            continue
        sn = max(math.sqrt(sum(v * v for v in srow)), ROW_EPS)
        values.append(1.0 - sum(a * b for a, b in zip(srow, trow)) / (sn * tn))
    return sum(values) / max(1, len(values))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss,naive", [(row_kl, naive_row_kl), (row_cosine, naive_row_cosine)])
def test_row_losses_match_loops_on_blocks_and_causal_maps(seed, loss, naive):
    gen = torch.Generator().manual_seed(seed)
    size = 8
    is_vision = torch.rand(size, generator=gen) < 0.5
    is_vision[1] = True  # at least one vision column; text row 0 then sees no vision token (an empty row)
    student = causal_maps(size=size, generator=gen).requires_grad_(True)
    teacher = causal_maps(size=size, generator=gen)
    block = loss(tv_block(student, is_vision), tv_block(teacher, is_vision))
    assert block.dtype == torch.float32 and block.dim() == 0
    assert block.item() == pytest.approx(naive(tv_block(student, is_vision).detach(), tv_block(teacher, is_vision)),
                                         rel=1e-4, abs=1e-7)
    full_s = causal_maps(3, size=size, generator=gen).requires_grad_(True)
    full_t = causal_maps(3, size=size, generator=gen)
    full = loss(full_s, full_t)
    assert full.item() == pytest.approx(naive(full_s.detach(), full_t), rel=1e-4)
    (block + full).backward()
    assert torch.isfinite(student.grad).all() and full_s.grad.abs().sum() > 0
    assert loss(full_t, full_t).item() == pytest.approx(0.0, abs=1e-6)


def test_row_kl_hand_value_and_empty_rows():
    teacher = torch.tensor([[0.2, 0.2], [0.0, 0.0], [0.1, 0.3]])  # row 1: no mass, left out
    student = torch.tensor([[0.1, 0.3], [0.5, 0.5], [0.1, 0.3]])
    p, q = (0.5, 0.5), (0.25, 0.75)
    expected = (sum(a * math.log(a / b) for a, b in zip(p, q)) + 0.0) / 2  # row 2 matches exactly
    assert row_kl(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert row_kl(student, torch.zeros(3, 2)).item() == 0.0
    with pytest.raises(ValueError, match="rows, columns"):
        row_kl(torch.zeros(2, 3), torch.zeros(3, 2))


def test_row_cosine_hand_value():
    student = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [6.0, 8.0], [0.0, 0.0]])  # orthogonal, parallel, empty (left out)
    assert row_cosine(student, teacher).item() == pytest.approx((1.0 + 0.0) / 2)
    with pytest.raises(ValueError):
        row_cosine(torch.zeros(3), torch.zeros(3))


def test_attention_losses_by_kind():
    assert attention_losses("mse") == (masked_tv_mse, reasoning_mse)
    assert attention_losses("kl") == (row_kl, row_kl) and attention_losses("cosine") == (row_cosine, row_cosine)
    with pytest.raises(ValueError, match="choose from"):
        attention_losses("l1")


# ---- lower-triangle packing ---------------------------------------------------------------------


def test_tril_packing_hand_value_and_round_trip():
    dense = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [4.0, 5.0, 6.0]])
    assert dense_to_tril(dense).tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.equal(tril_to_dense(torch.arange(1.0, 7.0), 3), dense)
    gen = torch.Generator().manual_seed(0)
    maps = causal_maps(2, 4, size=7, generator=gen)
    packed = dense_to_tril(maps)
    assert packed.shape == (2, 4, 28)
    assert torch.equal(tril_to_dense(packed, 7), maps)
    rows = [maps[1, 2, i, j] for i in range(7) for j in range(i + 1)]
    assert torch.equal(packed[1, 2], torch.stack(rows))
    with pytest.raises(ValueError):
        tril_to_dense(torch.zeros(5), 3)


def test_tril_single_position():
    assert torch.equal(tril_to_dense(torch.tensor([0.5]), 1), torch.tensor([[0.5]]))


# ---- mixing -------------------------------------------------------------------------------------


def test_normalise_mix_rows_sum_to_one():
    mix = normalise_mix({"perception": (2, 1, 1), "reasoning": (0, 3, 0), "planning": (1, 1, 8)})
    assert mix["perception"] == pytest.approx((0.5, 0.25, 0.25))
    assert mix["reasoning"] == (0.0, 1.0, 0.0)
    for row in normalise_mix(REFERENCE_MIX).values():
        assert sum(row) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad_row,expected",
    [((0, 0, 0), "all zero"), ((1, -1, 1), "negative"), ((1, 1), "needs 3")],
)
def test_normalise_mix_errors_name_the_row(bad_row, expected):
    mix = dict(REFERENCE_MIX, reasoning=bad_row)
    with pytest.raises(ValueError, match=expected) as err:
        normalise_mix(mix)
    assert "reasoning" in str(err.value)


def test_normalise_mix_missing_and_unknown_rows():
    with pytest.raises(ValueError, match="planning"):
        normalise_mix({"perception": (1, 0, 0), "reasoning": (0, 1, 0)})
    with pytest.raises(ValueError, match="driving"):
        normalise_mix(dict(REFERENCE_MIX, driving=(1, 1, 1)))


def test_term_weights_defaults_and_omission():
    ones = lambdas(LossConfig())
    w = term_weights("reasoning", REFERENCE_MIX, lambdas(LossConfig(lam_r=2.0)))
    assert w == pytest.approx({"ce": 1.0, "p": 0.1, "r": 1.6, "d": 0.1})
    single = {"perception": (1, 0, 0), "reasoning": (0, 1, 0), "planning": (0, 0, 1)}
    assert term_weights("planning", single, ones) == {"ce": 1.0, "d": 1.0}
    assert term_weights("perception", REFERENCE_MIX, dict(ones, ce=0.0, d=0.0)) == pytest.approx(
        {"p": 0.8, "r": 0.1}
    )
    with pytest.raises(ValueError, match="unknown capability"):
        term_weights("driving", REFERENCE_MIX, ones)
    with pytest.raises(ValueError, match="lambdas"):
        term_weights("planning", REFERENCE_MIX, dict(ones, p=-1.0))
    with pytest.raises(ValueError, match=r"\['d'\] are missing"):
        term_weights("planning", REFERENCE_MIX, {"ce": 1.0, "p": 1.0, "r": 1.0})
