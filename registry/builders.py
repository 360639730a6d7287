"""Builders: the run config's choices -> core objects, each a name -> builder table.

``compose.build_run`` calls these; nothing here reads a file or a dataset. Tables, not
if-chains: a new objective or time distribution is one entry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from selfflow.core.model import PRESETS, FlowTransformer, ModelConfig
from selfflow.core.objectives import ExternalAlignment, FlowMatching, SelfFlow
from selfflow.core.timesteps import (
    DualTimestepScheduler,
    GapTeacher,
    LogitNormalTime,
    MinTeacher,
    ShiftedTime,
    TeacherRule,
    TimeSampler,
    UniformTime,
    check_mask_ratio,
)
from selfflow.core.types import Segment, TokenBatch
from selfflow.plugins.protocols import FeatureNetwork, Tokenizer
from selfflow.registry.config import (
    OBJECTIVE_NAMES,
    TEACHER_RULE_NAMES,
    TIME_NAMES,
    ConfigError,
    ObjectiveSection,
    RunConfig,
)
from selfflow.registry.registry import closest

# ----------------------------------------------------------------------------- tables

TIME_SAMPLERS: dict[str, Callable[[ObjectiveSection], TimeSampler]] = {
    "logit-normal": lambda o: LogitNormalTime(mean=o.time_mean, std=o.time_std),
    "uniform": lambda o: UniformTime(),
}

TEACHER_RULES: dict[str, Callable[[ObjectiveSection], TeacherRule]] = {
    "min": lambda o: MinTeacher(),
    "gap": lambda o: GapTeacher(gap=o.teacher_gap),
}


def choose(table: Mapping[str, Any], key: str, value: str) -> Any:
    """``table[value]``, or a ConfigError naming ``key``, the choices and the closest one."""
    if value in table:
        return table[value]
    near = closest(value, list(table))
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"config key '{key}': expected one of {list(table)}, got {value!r}{hint}")


def time_sampler(o: ObjectiveSection) -> TimeSampler:
    base = choose(TIME_SAMPLERS, "objective.time", o.time)(o)
    return ShiftedTime(base=base, shift=o.time_shift) if o.time_shift != 1.0 else base


# ----------------------------------------------------------------------------- model


def model_config(cfg: RunConfig, channels: dict[str, int], num_classes: int) -> ModelConfig:
    m = cfg.model
    if m.preset is not None:
        choose(PRESETS, "model.preset", m.preset)
    width, depth, heads = PRESETS[m.preset] if m.preset else (None, None, None)
    width, depth, heads = m.width or width, m.depth or depth, m.heads or heads
    if width is None or depth is None or heads is None:
        raise ConfigError("config table 'model': give a preset or all of width, depth and heads")
    try:
        return ModelConfig(
            channels=channels,
            width=width,
            depth=depth,
            heads=heads,
            num_classes=num_classes if m.class_conditional else 0,
            **m.core_options(),
        )
    except ValueError as err:
        raise ConfigError(f"config table 'model': {err}") from err


def mask_ratios(cfg: RunConfig, tokenizers: Mapping[str, Tokenizer]) -> dict[str, float]:
    """Each modality's Self-Flow mask ratio: the run's ``mask_ratio``, else its tokenizer's
    default (the paper's per-modality values); validated here, once."""
    out = {}
    for name, mc in cfg.modalities.items():
        ratio = mc.mask_ratio if mc.mask_ratio is not None else getattr(tokenizers[name], "mask_ratio", None)
        if ratio is None:
            raise ConfigError(
                f"config key 'modalities.{name}.mask_ratio': the tokenizer {mc.tokenizer!r} gives no "
                "default mask ratio; set one (the paper uses image 0.25, video 0.10, audio 0.50)"
            )
        try:
            out[name] = check_mask_ratio(name, float(ratio))
        except ValueError as err:
            raise ConfigError(f"config key 'modalities.{name}.mask_ratio': {err}") from err
    return out


# ----------------------------------------------------------------------------- objectives

Encoder = tuple[Callable[[TokenBatch], torch.Tensor], int]


def _flow_matching(
    cfg: RunConfig, model: FlowTransformer, ratios: Mapping[str, float], encoder: Encoder | None
) -> torch.nn.Module:
    o = cfg.objective
    return FlowMatching(time=time_sampler(o), label_dropout=o.label_dropout, loss_weights=_weights(cfg))


def _self_flow(
    cfg: RunConfig, model: FlowTransformer, ratios: Mapping[str, float], encoder: Encoder | None
) -> torch.nn.Module:
    o = cfg.objective
    scheduler = DualTimestepScheduler(
        time=time_sampler(o),
        mask_ratio=dict(ratios),
        mask_unit={name: mc.mask_unit for name, mc in cfg.modalities.items()},
        teacher_rule=choose(TEACHER_RULES, "objective.teacher_rule", o.teacher_rule)(o),
        dual=o.dual_timesteps,
        min_gap=o.min_gap,
        max_gap=o.max_gap,
    )
    try:
        return SelfFlow.for_model(model, scheduler=scheduler, config=o.self_flow(), loss_weights=_weights(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _external_alignment(
    cfg: RunConfig, model: FlowTransformer, ratios: Mapping[str, float], encoder: Encoder | None
) -> torch.nn.Module:
    o = cfg.objective
    if encoder is None:
        raise ConfigError("objective.name = 'external-alignment' needs each generated modality's reference network")
    fn, dim = encoder
    return ExternalAlignment(
        width=model.width,
        depth=model.depth,
        encoder=fn,
        encoder_dim=dim,
        gamma=o.gamma,
        student_layer=o.student_layer,
        time=time_sampler(o),
        label_dropout=o.label_dropout,
        loss_weights=_weights(cfg),
    )


OBJECTIVES: dict[str, Callable[..., torch.nn.Module]] = {
    "flow-matching": _flow_matching,
    "self-flow": _self_flow,
    "external-alignment": _external_alignment,
}
NEEDS_ENCODER = frozenset({"external-alignment"})

# the config validates names against its lists; these tables must build exactly those
for _table, _names in ((OBJECTIVES, OBJECTIVE_NAMES), (TIME_SAMPLERS, TIME_NAMES), (TEACHER_RULES, TEACHER_RULE_NAMES)):
    assert set(_table) == set(_names), (sorted(_table), sorted(_names))


def _weights(cfg: RunConfig) -> dict[str, float]:
    return {name: mod.loss_weight for name, mod in cfg.modalities.items()}


def build_objective(
    cfg: RunConfig, model: FlowTransformer, ratios: Mapping[str, float], encoder: Encoder | None = None
) -> torch.nn.Module:
    """The objective ``objective.name`` names; ``encoder = (fn, dim)`` is REPA's frozen encoder."""
    return choose(OBJECTIVES, "objective.name", cfg.objective.name)(cfg, model, ratios, encoder)


class TokenFeatureCache:
    """REPA's targets per item, kept by a digest of the item's clean tokens, positions and
    valid mask, least recently used first out past ``max_bytes``.

    The training data is encoded once (the latent cache), so after the first epoch every
    batch holds items whose targets were already computed: decoding them again (the VAE
    decoder for video, Griffin-Lim for mel audio) and running the reference network made
    REPA 6.9x slower than flow matching per audio step (benchmarks/RESULTS.md). A decoder
    with randomness (Griffin-Lim's seeded initial phase) keeps its first draw per item.

    Items are computed one at a time, so an item's target does not depend on which batch it
    first came in (Griffin-Lim's phases and a convolution's floating-point sums would): a
    resumed run, whose cache starts empty, recomputes exactly the targets the uninterrupted
    run kept. The first epoch pays for batch-1 calls; every later one skips them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _digest(seg: Segment, i: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(seg.modality.encode())
        h.update(str(tuple(seg.tokens.shape[1:])).encode())
        for t in (seg.tokens[i], seg.positions[i], None if seg.valid is None else seg.valid[i]):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def features(self, seg: Segment, compute: Callable[[Segment], torch.Tensor]) -> torch.Tensor:
        """``compute(sub_segment) -> (b, N, E)`` runs only on the items not kept."""
        if self.max_bytes <= 0:
            return compute(seg)
        keys = [self._digest(seg, i) for i in range(seg.batch_size)]
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += seg.batch_size - len(miss)
        self.misses += len(miss)
        rows: dict[int, torch.Tensor] = {}
        for i, k in enumerate(keys):  # hits first: a miss stored below may evict them
            if k in self.store:
                self.store.move_to_end(k)
                rows[i] = self.store[k]
        for i in miss:  # one item at a time: a target is a function of its item alone (see the class)
            sub = Segment(
                modality=seg.modality,
                tokens=seg.tokens[i : i + 1],
                positions=seg.positions[i : i + 1],
                role=seg.role,
                valid=None if seg.valid is None else seg.valid[i : i + 1],
            )
            rows[i] = compute(sub)[0]
            self._put(keys[i], rows[i])
        return torch.stack([rows[i] for i in range(len(keys))])

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        value = value.detach().clone()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self.store[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def alignment_encoder(
    references: Mapping[str, FeatureNetwork], tokenizers: Mapping[str, Tokenizer], *, cache_mb: float = 512
) -> Encoder:
    """REPA's frozen encoder: each generated segment's reference network (trained on the
    run's data, since no pretrained encoder can be downloaded), one feature vector per
    token, from the *decoded* clean tokens; segments in batch order. Targets are kept per
    item (``TokenFeatureCache``, ``cache_mb`` of them; 0: recompute every step)."""
    dims = {m: int(ref.token_feature_dim) for m, ref in references.items()}
    if len(set(dims.values())) > 1:
        raise ConfigError(
            f"objective.name = 'external-alignment': the reference networks' token features differ in "
            f"width ({dims}); one projector aligns them all, so they must agree"
        )
    cache = TokenFeatureCache(int(cache_mb * 2**20))

    def targets(seg: Segment) -> torch.Tensor:
        media = tokenizers[seg.modality].decode(seg)
        return references[seg.modality].token_features(media, seg).to(seg.tokens.device)

    def encode(batch: TokenBatch) -> torch.Tensor:
        parts = [cache.features(seg, targets) for seg in batch.segments if seg.generated]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    encode.cache = cache  # type: ignore[attr-defined]  # hits and misses, read by the tests
    return encode, next(iter(dims.values()))


# ----------------------------------------------------------------------------- optimiser


def build_optimizer(
    cfg: RunConfig, params: list[torch.nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    from selfflow.core.loop import warmup_schedule

    o = cfg.optimizer
    optimizer = torch.optim.AdamW(
        params,
        lr=o.lr,
        betas=o.betas,
        weight_decay=o.weight_decay,
        eps=o.eps,
        **({"fused": True} if o.fused else {"foreach": True}),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_schedule(o.warmup_steps, cfg.run.steps, o.schedule, o.final_lr_fraction)
    )
    return optimizer, schedule
