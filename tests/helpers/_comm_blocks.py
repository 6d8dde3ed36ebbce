"""Stand-in blocks for the LayerCommunicator tests, and the single-process reference they match.

Every block holds its slice of global float64 weights (ParamSpec says which), produces the partial
sum the real block would (attention and dense MLP: over attn_tp; MoE: over moe_shard, routed +
shared added locally; "all_to_all" MoE stand-in: complete on SCATTERED tokens) and issues no
collective itself. The reference is plain torch on the global weights, written separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.communication.communicator import LayerCommunicator
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, Split, set_spec
from megatron_ext.communication.scatter_modes import LayerScatterModes
from megatron_ext.communication.token_layout import TokenLayout

DT = torch.float64
H, DIN, F_ATTN, I_DENSE, N_EXPERTS, I_EXPERT, I_SHARED, VOCAB, TOP_K = 8, 8, 8, 8, 8, 8, 8, 8, 2


@dataclass(frozen=True)
class StackSpec:
    num_layers: int
    sparse_layers: frozenset


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str,
                 rtol: float = 1e-10, atol: float = 1e-10) -> None:
    """``torch.allclose`` with a message (``torch.testing.assert_close`` imports sympy on first
    use: ~2 s per spawned rank on a loaded 2-core machine)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {diff:.3e} (rtol={rtol}, atol={atol})")


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Seeded on the CPU, then moved to the default device (CUDA in the NCCL script)."""
    return torch.randn(*shape, generator=gen, dtype=DT, device="cpu").to(
        torch.get_default_device())


def global_weights(seed: int, spec: StackSpec) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=0.4):
        return rand(g, *shape) * scale

    w = {"embed": rnd(H, DIN), "final_norm": 1 + rnd(H, scale=0.1), "lm_head": rnd(VOCAB, H)}
    for l in range(spec.num_layers):
        w.update({f"{l}.q": rnd(F_ATTN, H), f"{l}.o": rnd(H, F_ATTN),
                  f"{l}.in_norm": 1 + rnd(H, scale=0.1), f"{l}.post_norm": 1 + rnd(H, scale=0.1)})
        if l in spec.sparse_layers:
            w.update({f"{l}.router": rnd(N_EXPERTS, H, scale=1.0),
                      f"{l}.w1": rnd(N_EXPERTS, I_EXPERT, H),
                      f"{l}.w2": rnd(N_EXPERTS, H, I_EXPERT),
                      f"{l}.s1": rnd(I_SHARED, H), f"{l}.s2": rnd(H, I_SHARED),
                      f"{l}.sgate": rnd(1, H)})
        else:
            w.update({f"{l}.w1": rnd(I_DENSE, H), f"{l}.w2": rnd(H, I_DENSE)})
    return w


# ------------------------------------------------------------------------------------ math
def attn_math(x, q, o):
    """Token-mixing stand-in (causal running mean over the attention group's rows): checks that
    TP_ATTN_FULL really holds the group's rows in order. Shardable over features."""
    n = torch.arange(1, x.shape[0] + 1, dtype=x.dtype).unsqueeze(-1)
    return (torch.cumsum(torch.tanh(x @ q.T), 0) / n) @ o.T


def mlp_math(x, w1, w2):
    return F.silu(x @ w1.T) @ w2.T


def moe_math(x, router, w1, w2, s1, s2, sgate, first_expert: int):
    """Softmax top-k router, experts ``first_expert..`` (their local slices), shared expert slice
    with a sigmoid gate. With every local piece it is the whole MoE; with a shard's pieces, its
    partial sum."""
    probs = torch.softmax(x @ router.T, dim=-1)
    top_v, top_i = probs.topk(TOP_K, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_v)
    out = torch.sigmoid(x @ sgate.T) * mlp_math(x, s1, s2)
    for e in range(w1.shape[0]):
        out = out + weights[:, first_expert + e:first_expert + e + 1] * mlp_math(x, w1[e], w2[e])
    return out


def rms(x, w, eps=1e-6):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference(w: dict, spec: StackSpec, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Single-process logits for all tokens of the stage (attention groups in order)."""
    res = x @ w["embed"].T
    for l in range(spec.num_layers):
        a = rms(res, w[f"{l}.in_norm"])
        res = res + torch.cat([attn_math(c, w[f"{l}.q"], w[f"{l}.o"])
                               for c in torch.split(a, counts)])
        m = rms(res, w[f"{l}.post_norm"])
        if l in spec.sparse_layers:
            res = res + moe_math(m, w[f"{l}.router"], w[f"{l}.w1"], w[f"{l}.w2"], w[f"{l}.s1"],
                                 w[f"{l}.s2"], w[f"{l}.sgate"], 0)
        else:
            res = res + mlp_math(m, w[f"{l}.w1"], w[f"{l}.w2"])
    return rms(res, w["final_norm"]) @ w["lm_head"].T


# ------------------------------------------------------------------------------------ blocks
def local_param(w: dict, key: str, splits: tuple = (), grad_sync=("attn_dp_cp",),
                shard_axis: Optional[str] = None) -> nn.Parameter:
    """This rank's slice of global weight ``w[key]``; the spec's name is ``key``."""
    spec = ParamSpec(tuple(w[key].shape), tuple(splits), tuple(grad_sync), shard_axis, key)
    p = nn.Parameter(spec.take_local(w[key]).clone())
    set_spec(p, spec)
    return p


def tp_param(w: dict, key: str, dim: int, groups: ParallelGroups) -> nn.Parameter:
    A = groups.attn_tp
    if A.is_trivial:
        return local_param(w, key)
    return local_param(w, key, (Split(dim, A.size, A.rank),), shard_axis="attn_tp")


class Norm(nn.Module):
    def __init__(self, w: dict, key: str):
        super().__init__()
        self.weight = local_param(w, key)  # grad_sync set by the LayerCommunicator

    def forward(self, x):
        return rms(x, self.weight)


class Attention(nn.Module):
    def __init__(self, w, l, groups):
        super().__init__()
        self.q, self.o = tp_param(w, f"{l}.q", 0, groups), tp_param(w, f"{l}.o", 1, groups)

    def forward(self, x):
        return attn_math(x, self.q, self.o)


class DenseMLP(nn.Module):
    def __init__(self, w, l, groups):
        super().__init__()
        self.w1, self.w2 = tp_param(w, f"{l}.w1", 0, groups), tp_param(w, f"{l}.w2", 1, groups)

    def forward(self, x):
        return mlp_math(x, self.w1, self.w2)


class ShardMoE(nn.Module):
    """Experts split by moe_ep (whole experts) × moe_tp (intermediate); shared expert split over
    the whole shard; router and shared gate replicated (partial grads: synced over the stage)."""

    def __init__(self, w, l, groups: ParallelGroups):
        super().__init__()
        E, M, shard = groups.moe_ep, groups.moe_tp, groups.moe_shard
        self.first_expert = E.rank * (N_EXPERTS // E.size)

        def expert(name, tp_dim):
            return local_param(w, f"{l}.{name}", (Split(0, E.size, E.rank),
                                                  Split(tp_dim, M.size, M.rank)),
                               ("moe_dp",), "moe_shard")

        def shared(name, dim):
            return local_param(w, f"{l}.{name}", (Split(dim, shard.size, shard.rank),),
                               ("moe_dp",), "moe_shard")

        self.router = local_param(w, f"{l}.router", grad_sync=("stage",))
        self.sgate = local_param(w, f"{l}.sgate", grad_sync=("stage",))
        self.w1, self.w2 = expert("w1", 1), expert("w2", 2)
        self.s1, self.s2 = shared("s1", 0), shared("s2", 1)

    def forward(self, x):
        return moe_math(x, self.router, self.w1, self.w2, self.s1, self.s2, self.sgate,
                        self.first_expert)


class ScatteredMoE(nn.Module):
    """Stand-in for the all-to-all dispatcher's contract: complete output on SCATTERED rows
    (here: every expert's weights held locally, replicated; grads partial per rank → stage)."""

    def __init__(self, w, l, groups):
        super().__init__()
        for name in ("router", "w1", "w2", "s1", "s2", "sgate"):
            setattr(self, name, local_param(w, f"{l}.{name}", grad_sync=("stage",)))

    def forward(self, x):
        return moe_math(x, self.router, self.w1, self.w2, self.s1, self.s2, self.sgate, 0)


class Stack(nn.Module):
    """Embedding (input features split over attn_tp: a partial sum over attn_tp, like the
    vocab-parallel embedding) → layers → final norm → LM head
    shard; the only collectives are the communicators'."""

    def __init__(self, w, spec: StackSpec, groups: ParallelGroups, modes: list[LayerScatterModes],
                 dispatcher: str = "local", fused_reduce_add_norm=None):
        super().__init__()
        self.groups, self.spec, self.modes = groups, spec, modes
        self.embed = tp_param(w, "embed", 1, groups)
        self.lm_head = tp_param(w, "lm_head", 0, groups)
        self.final_norm = Norm(w, "final_norm")
        self.attn, self.mlp, self.comms = nn.ModuleList(), nn.ModuleList(), []
        self.in_norms, self.post_norms = nn.ModuleList(), nn.ModuleList()
        for l in range(spec.num_layers):
            self.attn.append(Attention(w, l, groups))
            sparse = l in spec.sparse_layers
            mlp_cls = (ShardMoE if dispatcher == "local" else ScatteredMoE) if sparse else DenseMLP
            self.mlp.append(mlp_cls(w, l, groups))
            self.in_norms.append(Norm(w, f"{l}.in_norm"))
            self.post_norms.append(Norm(w, f"{l}.post_norm"))
            self.comms.append(LayerCommunicator(modes[l], groups, self.in_norms[l],
                                                self.post_norms[l],
                                                fused_reduce_add_norm=fused_reduce_add_norm))

    def forward(self, x_cols: torch.Tensor, layout: TokenLayout,
                logs: Optional[dict] = None, probe: Optional[list] = None) -> torch.Tensor:
        """``x_cols``: this rank's TP_ATTN_FULL rows, its attn_tp slice of the input features.
        ``logs`` (optional) collects a CollectiveLog per ``(layer, step)``; ``probe`` collects
        the ``(hidden, residual)`` pairs returned by ``postprocess_layer``."""

        def counted(key, fn, *args):
            if logs is None:
                return fn(*args)
            with count_collectives() as log:
                out = fn(*args)
            logs[key] = log
            return out

        hidden = counted(("embed", "entry"), self.comms[0].embedding_output,
                         x_cols @ self.embed.T, layout)
        residual = None
        for l, comm in enumerate(self.comms):
            x, residual = counted((l, "prepare_attn"), comm.prepare_attn, hidden, residual, layout)
            a = self.attn[l](x)
            x, residual = counted((l, "prepare_mlp"), comm.prepare_mlp, a, residual, layout)
            m = self.mlp[l](x)
            hidden, residual = counted((l, "postprocess"), comm.postprocess_layer, m, residual,
                                       layout)
            if probe is not None:
                probe.append((hidden, residual))
        out = counted(("final", "finalize"), self.comms[-1].finalize, hidden, residual,
                      self.final_norm, layout)
        return out @ self.lm_head.T
