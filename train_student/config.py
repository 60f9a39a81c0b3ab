"""Trainer configuration: one dataclass per concern, loaded from defaults < YAML file < command-line
flags < ``--set section.field=value``, validated at load with every problem reported in one error.

The resolved config (``resolve``) is saved as ``RUN_DIR/config.yaml`` and in every checkpoint; a
resume compares it field by field (``differences``).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from schemas.method import REFERENCE_MIX, ROLE_TERM, ROLES, UNIFORM_MIX, lambdas
from train_student.losses import LOSS_KINDS
from train_student.mixing import normalise_mix

PRECISIONS = ("auto", "bf16", "fp32")
BANK_DTYPES = ("fp32", "bf16")
SCALES = ("reference", "balanced")
PARALLEL_MODES = ("none", "ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
RUN_CONTROL = ("run.out", "run.device", "run.max_steps", "run.save_every", "run.keep_last", "run.progress",
               "run.backend", "run.timeout_s", "data.num_workers")
"""Fields a resumed run may change: they steer the run (or locate it), not what it computes."""


class ConfigError(ValueError):
    """Invalid training settings; the message lists every problem found."""


@dataclass
class DataConfig:
    shards: str = ""
    """WebDataset shard directory written by ``python -m pipeline.ingest`` (--data)."""
    caches: dict[str, str] = field(default_factory=dict)
    """teacher role (perception / reasoning / planning) -> teacher cache directory (--cache)."""
    skip_missing: bool = False
    """skip (and count) samples missing from a cache instead of stopping (--skip-missing)."""
    num_workers: int = 2
    """DataLoader worker processes decoding images and cached maps (0: in the training process)."""
    shuffle_shards: bool = True
    """visit the shards in a seeded random order per epoch (samples keep their order inside a shard)."""
    streams: int = 8
    """canonical streams the epoch's shards are dealt to (shard i of the epoch order to stream i mod streams);
    the sample order interleaves them round-robin and depends on this number, never on the world size or
    the worker count. Under ``run.parallel=ddp`` each rank reads whole streams, so the world size must divide
    it (train_student.data)."""


@dataclass
class ModelConfig:
    student: str = ""
    """student Hugging Face directory or known name (--student)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16 (autocast) or fp32; weights stay fp32."""
    freeze_vision: bool = False
    """freeze the vision tower (the projector and language model still train)."""
    gradient_checkpointing: bool = False
    """recompute activations in backward for the layers that are not captured (captured layers keep
    their maps, which checkpointing would detach)."""
    recompute_attention: bool = False
    """recompute the captured layers' attention probabilities in backward instead of storing them
    (~17x less activation memory per captured layer at S=1800, one more attention forward per backward)."""
    online_teacher: str | None = None
    """ABLATION/BENCHMARK ONLY: run this teacher inside the trainer (eager output_attentions), as the
    reference trainer does, instead of reading caches (--online-teacher)."""


@dataclass
class LossConfig:
    sft: bool = False
    """cross-entropy only: no distillation, no cache (--sft)."""
    signals: list[str] = field(default_factory=lambda: list(ROLES))
    """distillation terms to train: perception (L_p), reasoning (L_r), planning (L_d) (--signals)."""
    lam_ce: float = 1.0
    """lambda of the answer cross-entropy (the AGP anchor; must be > 0)."""
    lam_p: float = 1.0
    """lambda of the perception term."""
    lam_r: float = 1.0
    """lambda of the reasoning term."""
    lam_d: float = 1.0
    """lambda of the planning term."""
    mix: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in UNIFORM_MIX.items()})
    """mixing matrix: per sample capability, the weights of (p, r, d); rows are normalised to sum 1. Default:
    uniform (every term on every sample, a third each), the study's recommended mix; METHOD section 4's
    (ref) matrix 0.8 / 0.1 / 0.1 comes with --reference (schemas.method.REFERENCE_MIX)."""
    mid_start: int = 0
    """first intermediate student layer of the reasoning term (negative counts from the end)."""
    mid_end: int = -2
    """last intermediate student layer, inclusive."""
    kind: str = "kl"
    """attention loss of all three terms: kl (the default, chosen on the study's evidence: per query row,
    KL(teacher || student) of the rows renormalised over the text-to-vision block for p/d and over the
    causal row for r, MiniLM-style), mse (METHOD section 3, the reference: MSE over probabilities, its
    gradients ~1e-7 of CE's; --reference) or cosine (per-row cosine distance, the paper's ablation)."""
    scale: str = "balanced"
    """how the distillation lambdas are set: balanced (the default, chosen on the study's evidence: README,
    The study) or reference (lam_p/lam_r/lam_d as given, METHOD sections 4-6; its terms are inert;
    --reference sets it with loss.kind=mse and the (ref) mix: METHOD exactly). balanced: calibrated once on
    the first window of a fresh run, from each term's mean unweighted gradient norm, so that lam_t * |g_t| = balance_ratio[role] * lam_ce * |g_ce|; stored in every checkpoint and in the
    first metrics row; lam_p/lam_r/lam_d then only switch a term off with 0). With reweighting, the
    reweighter learns a factor on the calibrated lambdas, steering towards these ratios (train_student.scale)."""
    balance_ratio: dict[str, float] = field(default_factory=lambda: {r: 0.5 for r in ROLES})
    """scale=balanced: per role (perception / reasoning / planning), the term's lambda-weighted gradient norm
    as a fraction of CE's (> 0). 0.5: a sample's mix row sums to 1, so its three distillation gradients
    together weigh half the CE anchor: visible in the update, CE still the largest term."""


@dataclass
class MethodConfig:
    agp: bool = True
    """asymmetric gradient projection (METHOD section 5); off: plain weighted sum (--no-agp)."""
    bank_dtype: str = "fp32"
    """dtype of the per-term gradient rows: fp32 or bf16 (half the memory)."""
    reweight: bool | None = None
    """online loss reweighting (METHOD section 6); None follows ``agp`` (--no-reweight). It needs one
    gradient per term, so with agp off it costs one backward per term."""
    reweight_alpha: float = 0.0
    """exponent of the loss-ratio correction of the reweighting targets."""
    reweight_lr: float = 3e-4
    """AdamW learning rate of the reweighting parameters."""
    ce_floor: float = 0.6
    """lower bound of the reweighted CE weight."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_accum: int = 4
    """micro-steps (one sample each) per optimizer step; each loss is scaled by 1/grad_accum."""
    warmup_steps: int = 0
    """linear warm-up optimizer steps."""
    lr_floor: float = 0.01
    """the cosine schedule never goes below lr_floor * lr."""
    epochs: int = 1
    """passes over the data."""
    max_grad_norm: float | None = None
    """clip the gradient norm before each optimizer step (None: no clipping, as the reference)."""


@dataclass
class RunConfig:
    out: str = ""
    """run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoint-STEP/, latest (--out)."""
    seed: int = 42
    """seed of the model-side RNGs, the AGP order generator and the shard order."""
    max_steps: int | None = None
    """stop after this many optimizer steps in total (the schedule still spans the epochs) (--max-steps)."""
    save_every: int = 200
    """checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """checkpoints to keep (0: all)."""
    device: str = "auto"
    """auto (cuda if available), cuda, cuda:N or cpu."""
    progress: bool = True
    """show the progress bar."""
    parallel: str = "none"
    """none (one process), ddp (data parallel: every rank a replica training on its streams; the window
    gradient all-reduced once per optimizer step) or fsdp (FSDP2: weights, gradient bank and optimizer state
    sharded per decoder layer; every rank runs every sample). ddp and fsdp need torchrun
    (train_student.distributed)."""
    backend: str = "auto"
    """torch.distributed backend under torchrun: auto (nccl on GPUs, gloo on CPU), nccl or gloo."""
    timeout_s: int = 600
    """seconds a rank waits for the others in a collective before it stops with an error (a dead rank)."""


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def terms(self) -> list[str]:
        """Distillation terms trained (p, r, d order); empty in SFT."""
        return [] if self.loss.sft else [ROLE_TERM[r] for r in ROLES if r in self.loss.signals]


SECTIONS = {f.name: f.type for f in fields(TrainConfig)}
_SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "method": MethodConfig,
                    "optim": OptimConfig, "run": RunConfig}


# ---------------------------------------------------------------- typed construction from plain data
def _coerce(value, hint, name: str, problems: list[str]):
    """``value`` as type ``hint`` (YAML/CLI spellings accepted), or a problem noted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name, problems)
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            problems.append(f"{name}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{name}[{i}]", problems) for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping, got {value!r}")
            return value
        return {str(k): _coerce(v, args[1], f"{name}.{k}", problems) for k, v in value.items()}
    return _scalar(value, hint, name, problems)


def _scalar(value, hint, name: str, problems: list[str]):
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


def _section(cls, data, name: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{name}: expected a mapping of fields, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        problems.append(f"{name}: unknown field(s) {unknown}; fields are {sorted(hints)}")
    defaults = cls()
    values = {}
    for key, value in data.items():
        if key in hints:
            if typing.get_origin(hints[key]) is dict and isinstance(value, dict):
                value = {**getattr(defaults, key), **value}  # a mapping field is updated key by key
            values[key] = _coerce(value, hints[key], f"{name}.{key}", problems)
    return cls(**values)


def from_dict(data: dict) -> TrainConfig:
    """Build and validate a TrainConfig from nested plain data (missing fields take defaults)."""
    problems: list[str] = []
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        problems.append(f"unknown section(s) {unknown}; sections are {sorted(SECTIONS)}")
    config = TrainConfig(**{name: _section(cls, data.get(name, {}) or {}, name, problems)
                            for name, cls in _SECTION_CLASSES.items()})
    if not problems:
        problems = validate(config)
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    return config


# ---------------------------------------------------------------- validation and resolution
def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def validate(c: TrainConfig) -> list[str]:
    """Every problem of a typed config (empty list when valid)."""
    p: list[str] = []
    _check(p, bool(c.data.shards), "data.shards is empty: pass --data SHARDS_DIR (written by pipeline.ingest)")
    _check(p, bool(c.model.student), "model.student is empty: pass --student MODEL_DIR")
    _check(p, bool(c.run.out), "run.out is empty: pass --out RUN_DIR")
    _check(p, c.data.num_workers >= 0, f"data.num_workers={c.data.num_workers} must be >= 0")
    _check(p, c.model.precision in PRECISIONS, f"model.precision={c.model.precision!r}: choose from {PRECISIONS}")
    _check(p, c.method.bank_dtype in BANK_DTYPES, f"method.bank_dtype={c.method.bank_dtype!r}: choose from "
           f"{BANK_DTYPES}")
    p += _loss_problems(c)
    p += _optim_problems(c)
    _check(p, c.run.max_steps is None or c.run.max_steps >= 1, f"run.max_steps={c.run.max_steps} must be >= 1")
    _check(p, c.run.save_every >= 0, f"run.save_every={c.run.save_every} must be >= 0 (0: only at the end)")
    _check(p, c.run.keep_last >= 0, f"run.keep_last={c.run.keep_last} must be >= 0 (0: keep all)")
    p += _parallel_problems(c)
    m = c.method
    _check(p, math.isfinite(m.reweight_alpha), f"method.reweight_alpha={m.reweight_alpha} must be finite")
    _check(p, m.reweight_lr > 0, f"method.reweight_lr={m.reweight_lr} must be > 0")
    _check(p, m.ce_floor >= 0, f"method.ce_floor={m.ce_floor} must be >= 0")
    return p


def _loss_problems(c: TrainConfig) -> list[str]:
    p: list[str] = []
    loss, caches = c.loss, c.data.caches
    unknown = sorted(set(loss.signals) - set(ROLES))
    _check(p, not unknown, f"loss.signals has unknown role(s) {unknown}; choose from {list(ROLES)}")
    _check(p, loss.sft or bool(loss.signals), "loss.signals is empty: name at least one role, or train --sft")
    bad_roles = sorted(set(caches) - set(ROLES))
    _check(p, not bad_roles, f"data.caches has unknown role(s) {bad_roles}; roles are {list(ROLES)} "
           "(--cache perception=DIR, --cache perception,planning=DIR, or --cache DIR for all roles)")
    _check(p, not (loss.sft and c.model.online_teacher), "--sft and --online-teacher exclude each other")
    _check(p, not (caches and c.model.online_teacher), "--online-teacher reads no cache: drop --cache")
    if not loss.sft and not c.model.online_teacher and not unknown:
        missing = [r for r in loss.signals if r not in caches]
        _check(p, not missing, f"no cache for role(s) {missing}: pass --cache ROLE=DIR for each role in "
               f"loss.signals={loss.signals}, limit --signals, or train --sft")
    _check(p, loss.kind in LOSS_KINDS, f"loss.kind={loss.kind!r}: choose from {LOSS_KINDS}")
    _check(p, loss.scale in SCALES, f"loss.scale={loss.scale!r}: choose from {SCALES}")
    bad_ratio = {k: v for k, v in loss.balance_ratio.items() if k not in ROLES or not (math.isfinite(v) and v > 0)}
    _check(p, not bad_ratio, f"loss.balance_ratio has {bad_ratio}: keys are roles {list(ROLES)}, values finite "
           "and > 0 (e.g. --set loss.balance_ratio.reasoning=0.2)")
    bad = {f"lam_{t}": v for t, v in lambdas(loss).items() if not (math.isfinite(v) and v >= 0)}
    _check(p, not bad, f"loss lambdas must be finite and >= 0, got {bad}")
    _check(p, loss.lam_ce > 0, f"loss.lam_ce={loss.lam_ce} must be > 0: the CE gradient is the AGP anchor")
    try:
        normalise_mix(loss.mix)
    except ValueError as err:
        p.append(f"loss.mix: {err}")
    return p


def _optim_problems(c: TrainConfig) -> list[str]:
    p: list[str] = []
    o = c.optim
    _check(p, o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(p, o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(p, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two values in [0, 1)")
    _check(p, o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum} must be >= 1")
    _check(p, o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(p, 0 <= o.lr_floor <= 1, f"optim.lr_floor={o.lr_floor} must be in [0, 1]")
    _check(p, o.epochs >= 1, f"optim.epochs={o.epochs} must be >= 1")
    _check(p, o.max_grad_norm is None or o.max_grad_norm > 0, f"optim.max_grad_norm={o.max_grad_norm} must be > 0")
    return p


def _parallel_problems(c: TrainConfig) -> list[str]:
    p: list[str] = []
    r = c.run
    _check(p, r.parallel in PARALLEL_MODES, f"run.parallel={r.parallel!r}: choose from {PARALLEL_MODES}")
    _check(p, r.backend in BACKENDS, f"run.backend={r.backend!r}: choose from {BACKENDS}")
    _check(p, r.timeout_s >= 1, f"run.timeout_s={r.timeout_s} must be >= 1")
    _check(p, c.data.streams >= 1, f"data.streams={c.data.streams} must be >= 1")
    _check(p, not (c.model.online_teacher and r.parallel != "none"),
           f"model.online_teacher (ablation) runs in one process: use run.parallel=none, not {r.parallel!r}")
    return p


def resolve(config: TrainConfig) -> TrainConfig:
    """Settings implied by others, made explicit: SFT has no AGP and no reweighting (one term);
    ``method.reweight=None`` follows ``method.agp``; unused caches are dropped."""
    if config.loss.sft:
        config.method.agp, config.method.reweight = False, False
        config.data.caches = {}
    elif config.method.reweight is None:
        config.method.reweight = config.method.agp
    config.data.caches = {r: d for r, d in config.data.caches.items() if r in config.loss.signals}
    return config


ADDED_FIELDS = {"data.streams": 1, "run.parallel": "none"}
"""Fields added after checkpoints were first written -> the value in effect before they existed (one
process reading the shards one after another), which a saved config without them is compared as."""


def differences(saved: dict, current: dict, *, ignore=RUN_CONTROL) -> list[str]:
    """Dotted names of the fields whose values differ between two ``to_dict()`` configs (a field missing
    from ``saved`` counts as its ``ADDED_FIELDS`` value)."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for name in sorted(set(a) | set(b)):
            dotted = f"{section}.{name}"
            old = a.get(name, ADDED_FIELDS.get(dotted))
            if dotted not in ignore and old != b.get(name):
                diffs.append(f"{dotted} ({old!r} -> {b.get(name)!r})")
    return diffs


def save(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def read_yaml(path: str) -> dict:
    """A YAML config file as nested plain data (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections {sorted(SECTIONS)}, got "
                          f"{type(data).__name__}")
    return data


def set_dotted(data: dict, dotted: str, value) -> None:
    """``data[a][b]... = value`` for ``dotted = "a.b..."``, creating mappings on the way."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    node[last] = value


# ---------------------------------------------------------------- command line
def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m train_student",
        description="Drive-KD student trainer: streams WebDataset shards joined with offline teacher-attention "
                    "caches (no teacher is loaded), trains CE + perception / reasoning / planning attention terms "
                    "with AGP and online reweighting. Resumes from RUN_DIR/latest when it exists.",
        epilog="Precedence: defaults < --config YAML < flags < --set. Examples:\n"
               "  python -m train_student --student models/demo-student --data data/shards \\\n"
               "      --cache caches/demo-teacher --out runs/drive-kd\n"
               "  python -m train_student --student S --data D --cache perception=C1 --cache reasoning,planning=C2 "
               "--out R --set optim.lr=1e-4 --set run.save_every=50\n"
               "  python -m train_student --student S --data D --out runs/sft --sft",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="student model directory or known name (model.student)")
    parser.add_argument("--data", help="WebDataset shard directory from pipeline.data.ingest (data.shards)")
    parser.add_argument("--cache", action="append", default=[], metavar="[ROLE[,ROLE]=]DIR",
                        help="teacher cache for roles perception/reasoning/planning; a bare DIR serves every role")
    parser.add_argument("--out", help="run directory (run.out)")
    parser.add_argument("--config", help="YAML file with sections data/model/loss/method/optim/run")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps in total (run.max_steps)")
    parser.add_argument("--no-agp", action="store_true",
                        help="plain weighted sum of the terms in one backward (method.agp=false; reweighting "
                             "follows unless method.reweight=true)")
    parser.add_argument("--no-reweight", action="store_true", help="static loss weights (method.reweight=false)")
    parser.add_argument("--signals", nargs="+", choices=ROLES, metavar="ROLE",
                        help="distillation terms to train: perception reasoning planning (loss.signals)")
    parser.add_argument("--sft", action="store_true", help="cross-entropy only, no cache needed (loss.sft=true)")
    parser.add_argument("--reference", action="store_true",
                        help="METHOD sections 3-6 exactly: loss.scale=reference, loss.kind=mse and the (ref) mix "
                             "0.8/0.1/0.1 (the defaults are the study's recommended settings: balanced, kl, uniform "
                             "mix); --set still overrides single fields")
    parser.add_argument("--skip-missing", action="store_true",
                        help="skip and count samples missing from a cache (data.skip_missing=true)")
    parser.add_argument("--online-teacher", metavar="TEACHER",
                        help="ABLATION/BENCHMARK ONLY: run TEACHER inside the trainer (eager attention) instead of "
                             "reading caches, as the reference trainer does (model.online_teacher)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="resume from CHECKPOINT (default: RUN_DIR/latest; that one is also used without "
                             "this flag when it exists)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set optim.lr=1e-4 --set data.num_workers=0")
    return parser


def parse_caches(specs: list[str]) -> dict[str, str]:
    """``--cache`` values -> {role: dir}."""
    caches: dict[str, str] = {}
    for spec in specs:
        roles_text, sep, directory = spec.partition("=")
        roles = roles_text.split(",") if sep else list(ROLES)
        directory = directory if sep else spec
        bad = [r for r in roles if r not in ROLES]
        if bad or not directory:
            raise ConfigError(f"--cache {spec!r}: expected ROLE=DIR, ROLE,ROLE=DIR or DIR with roles among "
                              f"{list(ROLES)}")
        for role in roles:
            if role in caches and caches[role] != directory:
                raise ConfigError(f"--cache gives role {role} two caches: {caches[role]} and {directory}")
            caches[role] = directory
    return caches


REFERENCE_FLAGS = {"loss.scale": "reference", "loss.kind": "mse",
                   "loss.mix": {k: list(v) for k, v in REFERENCE_MIX.items()}}
"""What --reference sets: METHOD's reference loss semantics (sections 3-6)."""


def config_from_args(args) -> TrainConfig:
    """Defaults < YAML (--config) < flags < --set, validated and resolved."""
    data = read_yaml(args.config) if args.config else {}
    flags = {"model.student": args.student, "data.shards": args.data, "run.out": args.out,
             "run.max_steps": args.max_steps, "loss.signals": args.signals,
             "model.online_teacher": args.online_teacher,
             "data.caches": parse_caches(args.cache) or None,
             "method.agp": False if args.no_agp else None, "method.reweight": False if args.no_reweight else None,
             "loss.sft": True if args.sft else None, "data.skip_missing": True if args.skip_missing else None}
    if args.reference:
        flags |= REFERENCE_FLAGS
    for dotted, value in flags.items():
        if value is not None:
            set_dotted(data, dotted, value)
    for item in args.set:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. --set optim.lr=1e-4")
        set_dotted(data, dotted.strip(), yaml.safe_load(text) if text.strip() else None)
    return resolve(from_dict(data))
