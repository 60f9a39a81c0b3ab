"""Multi-teacher mixing (METHOD §4): per-sample weights of the ce / p / r / d loss terms.

The mixing matrix has one row per sample capability; column 0 weights the perception term ``p``,
column 1 the reasoning term ``r``, column 2 the planning term ``d``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from schemas.method import CAPABILITIES, LOSS_TERMS, TERMS


def normalise_mix(mix: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float, float]]:
    """Validate the 3x3 mixing matrix and scale each row to sum 1.

    Args:
        mix: one row of three non-negative weights per capability in ``CAPABILITIES``.

    Raises:
        ValueError: a missing or unknown capability, a row without exactly 3 entries, a negative
            entry, or an all-zero row; the message names the row.
    """
    problems = []
    unknown = sorted(set(mix) - set(CAPABILITIES))
    missing = [c for c in CAPABILITIES if c not in mix]
    if unknown:
        problems.append(f"unknown capability rows {unknown}; rows are {list(CAPABILITIES)}")
    if missing:
        problems.append(f"missing capability rows {missing}")
    out = {}
    for cap in CAPABILITIES:
        if cap not in mix:
            continue
        row = tuple(float(w) for w in mix[cap])
        if len(row) != len(TERMS):
            problems.append(f"row {cap!r} has {len(row)} entries {row}, needs 3 (p, r, d)")
        elif any(w < 0 for w in row):
            problems.append(f"row {cap!r} = {row} has a negative weight; weights must be >= 0")
        elif sum(row) == 0:
            problems.append(f"row {cap!r} is all zero; give at least one term a positive weight")
        else:
            total = sum(row)
            out[cap] = (row[0] / total, row[1] / total, row[2] / total)
    if problems:
        raise ValueError("invalid mixing matrix: " + "; ".join(problems))
    return out


def term_weights(capability: str, mix: Mapping[str, Sequence[float]], lams: Mapping[str, float]) -> dict[str, float]:
    """Static weights of the loss terms of one sample of ``capability``.

    ``lams``: one lambda per term of LOSS_TERMS (``schemas.method.lambdas(loss_config)``).
    Returns ``{"ce": lam_ce, "p": w[0]*lam_p, "r": w[1]*lam_r, "d": w[2]*lam_d}`` with ``w`` the
    normalised mix row of the capability; terms whose weight is 0 are omitted.

    Raises:
        ValueError: unknown capability, an invalid mix (see ``normalise_mix``), a missing or negative lambda.
    """
    missing = [t for t in LOSS_TERMS if t not in lams]
    if missing:
        raise ValueError(f"lambdas for terms {missing} are missing; give one per term of {list(LOSS_TERMS)}")
    negative = {k: v for k, v in lams.items() if v < 0}
    if negative:
        raise ValueError(f"loss lambdas must be >= 0, got {negative}")
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; expected one of {list(CAPABILITIES)}")
    row = normalise_mix(mix)[capability]
    weights = {"ce": float(lams["ce"])}
    weights.update({t: w * float(lams[t]) for t, w in zip(TERMS, row)})
    return {k: v for k, v in weights.items() if v != 0}
