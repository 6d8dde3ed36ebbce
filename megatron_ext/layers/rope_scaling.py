"""RoPE scaling for context extension: ``linear``, ``dynamic`` (NTK), ``yarn`` and ``llama3``,
with the inverse frequencies and attention scaling ``transformers`` defines for each
(``ROPE_INIT_FUNCTIONS`` in ``modeling_rope_utils``).

The arithmetic follows ``transformers`` operation by operation in the same dtypes (float32
tensors, Python floats where it uses them) so the tables are bit-identical to its own: a float64
model then differs from ``transformers`` only by the network's own rounding, not by a RoPE table
a few ulps off, which a long context would amplify.

``dynamic`` is the one type whose frequencies depend on the input: ``transformers`` recomputes the
NTK base from ``seq_len = 1 + max(position_ids)`` of each forward when that exceeds
``max_position_embeddings`` (shorter inputs use the plain table). :func:`dynamic_ntk_inv_freq`
takes that length as a tensor, so a CUDA-graph decode step computes it without a host sync; the
caller decides what the length is (the whole sequence under CP, see
:func:`megatron_ext.layers.rope.rope_sequence_length`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

ROPE_TYPES: tuple[str, ...] = ("linear", "dynamic", "yarn", "llama3")
# the entries of HF's rope_parameters each type reads (besides rope_type / rope_theta)
TYPE_KEYS: dict[str, frozenset[str]] = {
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor",
                       "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "llama3": frozenset({"factor", "original_max_position_embeddings", "low_freq_factor",
                         "high_freq_factor"}),
}


@dataclass(frozen=True)
class RopeScaling:
    """One HF ``rope_parameters`` scaling entry (``rope_theta`` lives in the model config).

    ``factor`` may be ``None`` only for ``yarn`` (then ``max_position_embeddings /
    original_max_position_embeddings``, as ``transformers`` does). ``original_max_position_embeddings``
    (yarn, llama3): the pretraining length; ``None`` means the model's
    ``max_position_embeddings``, which is what ``transformers`` fills in.
    """

    rope_type: str
    factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    attention_factor: Optional[float] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)} (or no scaling)")
        if self.factor is None and self.rope_type != "yarn":
            raise ValueError(f"rope_type={self.rope_type!r} needs a factor")
        if self.factor is not None and not (isinstance(self.factor, (int, float))
                                            and not isinstance(self.factor, bool)
                                            and self.factor >= 1):
            raise ValueError(f"RoPE scaling factor={self.factor!r} must be a number >= 1")
        omp = self.original_max_position_embeddings
        if omp is not None and (isinstance(omp, bool) or not isinstance(omp, int) or omp < 1):
            raise ValueError(f"original_max_position_embeddings={omp!r} must be a positive "
                             f"integer")
        if self.rope_type == "llama3":
            if self.low_freq_factor is None or self.high_freq_factor is None:
                raise ValueError("rope_type='llama3' needs low_freq_factor and high_freq_factor")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(f"llama3 RoPE needs high_freq_factor={self.high_freq_factor} > "
                                 f"low_freq_factor={self.low_freq_factor} > 0")
        if self.attention_factor is not None and self.attention_factor < 0:
            raise ValueError(f"attention_factor={self.attention_factor} must be >= 0")
        unused = [k for k, v in self.to_hf().items()
                  if k not in TYPE_KEYS[self.rope_type] | {"rope_type"} and v is not None]
        if unused:
            raise ValueError(f"rope_type={self.rope_type!r} does not take {unused}")

    @classmethod
    def from_dict(cls, d: dict) -> "RopeScaling":
        """From a stored :meth:`to_dict` (training checkpoints, results files)."""
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf(self) -> dict:
        """The HF ``rope_parameters`` entries (without ``rope_theta``), unset ones left out."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if d.get("truncate") is True or self.rope_type != "yarn":
            d.pop("truncate", None)
        return d

    def original_length(self, max_position_embeddings: int) -> int:
        """The length the scaling stretches: yarn/llama3's pretraining length, else
        ``max_position_embeddings`` (linear and dynamic scale relative to it)."""
        if self.rope_type in ("yarn", "llama3") and self.original_max_position_embeddings:
            return self.original_max_position_embeddings
        return max_position_embeddings

    def position_limit(self, max_position_embeddings: int) -> int:
        """Positions a scaled model is meant for: ``factor`` × the stretched length, and never
        fewer than ``max_position_embeddings`` (Llama 3.1 already states 131072 there). This is
        the rule vLLM applies to derive its maximum model length."""
        factor = self.yarn_factor(max_position_embeddings) if self.rope_type == "yarn" \
            else self.factor
        return max(max_position_embeddings,
                   int(factor * self.original_length(max_position_embeddings)))

    def yarn_factor(self, max_position_embeddings: int) -> float:
        if self.factor is not None:
            return self.factor
        return max_position_embeddings / self.original_length(max_position_embeddings)


def _exponents(dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``2i/d`` in float32, made on ``device`` (no host-to-device copy: a CUDA-graph decode
    step recomputes dynamic NTK tables)."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float) / dim


def default_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """``1 / theta^(2i/d)`` in float32, as HF's ``compute_default_rope_parameters``."""
    if head_dim % 2:
        raise ValueError(f"RoPE head_dim={head_dim} must be even")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta={rope_theta} must be > 0")
    return 1.0 / (rope_theta ** _exponents(head_dim))


def dynamic_ntk_inv_freq(scaling: RopeScaling, head_dim: int, rope_theta: float,
                         max_position_embeddings: int,
                         seq_len: Union[int, torch.Tensor]) -> torch.Tensor:
    """Dynamic NTK: the base grows with ``seq_len`` beyond ``max_position_embeddings``
    (``base · (factor·L/max − (factor−1))^(d/(d−2))``). ``seq_len``: an int (Python-float
    arithmetic, as ``transformers`` uses at construction) or an int64 tensor (float32 tensor
    arithmetic, as it uses in the forward)."""
    factor, dim = scaling.factor, head_dim
    if isinstance(seq_len, torch.Tensor):   # clamp: the same integers, no host tensor
        seq_len = seq_len.clamp(min=max_position_embeddings)
    else:
        seq_len = max(seq_len, max_position_embeddings)
    base = rope_theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) \
        ** (dim / (dim - 2))
    device = base.device if isinstance(base, torch.Tensor) else None
    return 1.0 / (base ** _exponents(dim, device))


def _yarn(scaling: RopeScaling, dim: int, base: float,
          max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp between the dims
    that turn ``beta_slow`` / ``beta_fast`` times over the original length; scale attention."""
    original = scaling.original_length(max_position_embeddings)
    factor = scaling.yarn_factor(max_position_embeddings)

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = float(get_mscale(factor, scaling.mscale)
                                     / get_mscale(factor, scaling.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _llama3(scaling: RopeScaling, dim: int, base: float,
            max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by ``factor``, keep short ones, blend in between."""
    inv_freq = default_inv_freq(dim, base)
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_length(max_position_embeddings)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def scaled_inv_freq(scaling: Optional[RopeScaling], head_dim: int, rope_theta: float,
                    max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] float32, attention_scaling)`` of a model built with ``scaling``;
    for ``dynamic`` the table of inputs no longer than ``max_position_embeddings``."""
    if scaling is None:
        return default_inv_freq(head_dim, rope_theta), 1.0
    if scaling.rope_type == "linear":
        inv_freq = default_inv_freq(head_dim, rope_theta)
        inv_freq /= scaling.factor
        return inv_freq, 1.0
    if scaling.rope_type == "dynamic":
        return dynamic_ntk_inv_freq(scaling, head_dim, rope_theta, max_position_embeddings,
                                    max_position_embeddings), 1.0
    if scaling.rope_type == "yarn":
        return _yarn(scaling, head_dim, rope_theta, max_position_embeddings)
    return _llama3(scaling, head_dim, rope_theta, max_position_embeddings), 1.0
