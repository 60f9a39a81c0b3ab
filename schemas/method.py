"""The method's vocabulary (METHOD sections 1, 3, 4), defined once for the whole project.

- capability: the label of a sample (``perception``, ``reasoning``, ``planning``); it is also the name
  of the teacher ROLE that serves it (a role is the teacher behind one term; the CLI writes
  ``perception,reasoning,planning=DIR``).
- term: a loss term; ``ce`` plus the three distillation terms ``p`` (perception), ``r`` (reasoning),
  ``d`` (planning, "decision"), in the order of the mixing matrix columns and of every metrics row.
- signal: the stored teacher attention a term reads: ``first_tv`` (layer 0, text-to-vision block),
  ``mid`` (the intermediate maps), ``penult_tv`` (layer L-2, text-to-vision block).
- layer plan: which decoder layers of a model of L layers those signals come from (``LayerPlan``).

On-disk names (signals, index columns, metrics keys ``ce``/``p``/``r``/``d``) keep their spelling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CAPABILITIES = ("perception", "reasoning", "planning")
TERMS = ("p", "r", "d")
"""The distillation terms, in mixing-matrix column order."""
LOSS_TERMS = ("ce", *TERMS)
"""Every loss term, in the order of device tensors and metrics rows."""
SIGNALS = ("first_tv", "penult_tv", "mid")
TERM_ROLE = dict(zip(TERMS, CAPABILITIES))
"""term -> the capability (teacher role) it distils."""
ROLE_TERM = {role: term for term, role in TERM_ROLE.items()}
ROLES = tuple(ROLE_TERM)
"""Teacher roles, one per distillation term, each named by the capability it serves."""
TERM_SIGNAL = {"p": "first_tv", "r": "mid", "d": "penult_tv"}
SIGNAL_TERM = {signal: term for term, signal in TERM_SIGNAL.items()}
SIGNAL_ROLE = {signal: TERM_ROLE[term] for signal, term in SIGNAL_TERM.items()}
ROLE_SIGNAL = {role: signal for signal, role in SIGNAL_ROLE.items()}

REFERENCE_MIX = {
    "perception": (0.8, 0.1, 0.1),
    "reasoning": (0.1, 0.8, 0.1),
    "planning": (0.1, 0.1, 0.8),
}
"""METHOD section 4's (ref) matrix: each sample's own capability's term at 0.8, the others at 0.1."""

UNIFORM_MIX = {capability: (1.0, 1.0, 1.0) for capability in CAPABILITIES}
"""Every term on every sample, a third each after normalisation (the study's recommended mix)."""


def lambdas(loss_config) -> dict[str, float]:
    """``{term: lambda}`` for all of LOSS_TERMS from a config with ``lam_ce``/``lam_p``/``lam_r``/``lam_d``."""
    return {term: float(getattr(loss_config, f"lam_{term}")) for term in LOSS_TERMS}


def resolve_layer_range(start: int, end: int, num_layers: int) -> list[int]:
    """Inclusive layer range ``start..end``; negative values count from ``num_layers``.

    The default intermediate range ``start=0, end=-2`` gives ``[0, ..., num_layers - 2]``.

    Raises:
        ValueError: ``num_layers < 1``, an index outside ``[0, num_layers)`` after resolution, or
            ``start`` resolving after ``end`` (empty range).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    resolved = []
    for name, spec in (("start", start), ("end", end)):
        idx = spec if spec >= 0 else num_layers + spec
        if not 0 <= idx < num_layers:
            raise ValueError(
                f"layer {name}={spec} resolves to {idx}, outside [0, {num_layers}) for a model "
                f"with {num_layers} layers; use a value in [{-num_layers}, {num_layers - 1}]"
            )
        resolved.append(idx)
    lo, hi = resolved
    if lo > hi:
        raise ValueError(
            f"empty layer range: start={start} resolves to {lo} > end={end} resolves to {hi} "
            f"(num_layers={num_layers}); the range is inclusive and needs start <= end"
        )
    return list(range(lo, hi + 1))


@dataclass(frozen=True)
class LayerPlan:
    """Decoder layers of one model (teacher or student, its own depth) that the terms read:
    p -> ``first`` (0), d -> ``penult`` (L-2), r -> ``mid`` (the intermediate range, resolved)."""

    num_layers: int
    mid: tuple[int, ...]
    first: int = 0

    @classmethod
    def for_model(cls, num_layers: int, mid_start: int = 0, mid_end: int = -2) -> LayerPlan:
        """Raises ValueError for a model under 2 layers or an empty/out-of-range intermediate range."""
        if num_layers < 2:
            raise ValueError(f"the model has {num_layers} decoder layer(s); the planning term (layer L-2) "
                             "needs at least 2")
        return cls(num_layers, tuple(resolve_layer_range(mid_start, mid_end, num_layers)))

    @property
    def penult(self) -> int:
        return self.num_layers - 2

    def term_layers(self, term: str) -> list[int]:
        """Layers one distillation term reads."""
        return {"p": [self.first], "d": [self.penult], "r": list(self.mid)}[term]

    def layers(self, terms: Iterable[str]) -> list[int]:
        """Sorted layers to capture for ``terms`` (subset of TERMS)."""
        return sorted({layer for term in terms for layer in self.term_layers(term)})
