"""A stand-in model for the training-infrastructure tests: parameters laid out like the real layers
(vocab-parallel embedding, attention-TP sharded linears, replicated norms, stage-synced router,
experts split over moe_ep x moe_tp), split over pipeline stages, built from global tensors drawn
from a seed, so every layout holds slices of the same global model. The vocabulary (13) is padded
in memory as the real layers pad it: the embedding to a multiple of 4·attn_tp, the LM head to
16·attn_tp (so with attn_tp 2 its second rank holds padding only); on disk it is 13 rows.
"""
from __future__ import annotations

import torch

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, Split, set_spec

H, V, E, M, LAYERS = 8, 13, 4, 8, 4


def global_param_specs(groups: ParallelGroups, tied: bool = False) -> dict[str, ParamSpec]:
    """Name -> spec of every parameter this rank holds (names are layout independent). ``tied``:
    the LM head is the embedding (one tensor; a copy on the last stage synced over
    ``embedding``)."""
    a, ep, mt = groups.attn_tp, groups.moe_ep, groups.moe_tp
    topo, stage = groups.topology, groups.coords.pp
    tp_axis = "attn_tp" if a.size > 1 else None
    shard_axis = "moe_shard" if ep.size * mt.size > 1 else None

    def tp_split(dim: int) -> tuple[Split, ...]:
        return (Split(dim, a.size, a.rank),) if a.size > 1 else ()

    def vocab_spec(multiple: int, grad_sync: tuple[str, ...]) -> ParamSpec:
        unit = multiple * a.size
        return ParamSpec((V, H), tp_split(0), grad_sync, tp_axis,
                         padded_shape=(-(-V // unit) * unit, H))

    expert_splits = tuple(s for s in (Split(0, ep.size, ep.rank), Split(2, mt.size, mt.rank))
                          if s.chunks > 1)
    specs: dict[str, ParamSpec] = {}
    per_stage = LAYERS // topo.pp
    embed_sync = ("attn_dp_cp", "embedding") if tied else ("attn_dp_cp",)
    if stage == 0:
        specs["embed.weight"] = vocab_spec(4, embed_sync)
    for layer in range(stage * per_stage, (stage + 1) * per_stage):
        p = f"layers.{layer}."
        specs[p + "norm.weight"] = ParamSpec((H,), (), ("attn_dp_cp",))
        specs[p + "scattered_norm.weight"] = ParamSpec((H,), (), ("attn_dp_cp", "attn_tp"))
        specs[p + "qkv.weight"] = ParamSpec((3 * H, H), tp_split(0), ("attn_dp_cp",), tp_axis)
        specs[p + "o_proj.weight"] = ParamSpec((H, 3 * H), tp_split(1), ("attn_dp_cp",), tp_axis)
        specs[p + "router.weight"] = ParamSpec((E, H), (), ("stage",))
        specs[p + "experts.w"] = ParamSpec((E, H, M), expert_splits, ("moe_dp",), shard_axis)
    if stage == topo.pp - 1:
        specs["final_norm.weight"] = ParamSpec((H,), (), ("attn_dp_cp",))
        if not tied:
            specs["lm_head.weight"] = vocab_spec(16, ("attn_dp_cp",))
        elif topo.pp > 1:
            specs["embed.weight"] = vocab_spec(4, embed_sync)
    return specs


def all_global_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter of the full model (what a one-process run holds)."""
    return {n: s.global_shape for n, s in
            global_param_specs(ParallelGroups.single_process()).items()}


def global_tensor(name: str, seed: int) -> torch.Tensor:
    """The global tensor ``name`` for ``seed`` (identical on every rank and in every layout)."""
    shape = all_global_shapes()[name]
    gen = torch.Generator().manual_seed(seed * 1000003 + sum(map(ord, name)) * 7919 + len(name))
    return torch.randn(shape, generator=gen, dtype=torch.float64).float()


def build_params(groups: ParallelGroups, seed: int, tied: bool = False
                 ) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters: slices of ``global_tensor(name, seed)`` with their specs."""
    out = []
    for name, spec in global_param_specs(groups, tied).items():
        p = torch.nn.Parameter(spec.take_local(global_tensor(name, seed)).clone())
        out.append((name, set_spec(p, spec)))
    return out
