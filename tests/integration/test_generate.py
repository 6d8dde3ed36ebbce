"""Greedy generation (CP prefill + CP decode against a KV cache spread over CP ranks) equals
transformers' ``generate(do_sample=False)`` in every layout, with ~1/cp of the KV per CP rank."""
from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel.groups import AxisGroup, ParallelGroups
from megatron_ext.parallel.topology import GROUP_AXES, Topology
from megatron_ext.models.config import ModelConfig
from tests.helpers.multirank import run_ranks

MODELS = ("tiny-qwen3-moe", "tiny-qwen2-moe")
LAYOUTS = [
    dict(world=4, attn_tp=2),                                 # attn_dp 2 (rows 2 + 1), moe_tp 2
    dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),            # seed: MOE_FULL k=2, moe_tp 4
    dict(world=4, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=1),   # k=4, 1/4 of the KV per rank
    dict(world=4, attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=2),   # attn_dp 2 x cp 2, k=2
]
# other model options on the Qwen2-MoE (shared expert): SCATTERED residual + all-to-all MoE with
# decode rows spread over attn_tp (3 rows over attn_tp 4: one rank holds none), p2p CP prefill
VARIANTS = [
    (dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),
     dict(cp_strategy="p2p", moe_dispatcher="all_to_all", allow_reduce_scatter=True)),
    (dict(world=4, attn_tp=4, moe_ep=2, moe_tp=2, moe_dp=1), dict(moe_dispatcher="all_to_all")),
]
SEED = 1
EOS_LAYOUT = 3
LENGTHS = (11, 6, 9)   # left-padded to 11
NEW = 6
HF_ATOL = 2e-5       # float64 vs transformers' float64 with float32 islands (router softmax)
EXACT_ATOL = 1e-10   # any layout vs the single-process run, both float64


def _prompts():
    g = torch.Generator().manual_seed(3)
    S = max(LENGTHS)
    ids = torch.randint(1, 128, (len(LENGTHS), S), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, S - n:] = 1
        ids[i, :S - n] = 0
    return ids, mask


def _generate_rank(rank, world, paths, ids, mask, eos):
    from megatron_ext.parallel.comm_counter import count_collectives
    from megatron_ext.parallel.groups import build_groups
    from megatron_ext.serving import greedy_generate
    from megatron_ext.models.decoder import CausalLM

    out = []
    for li, sizes in enumerate(LAYOUTS):
        groups = build_groups(Topology(**sizes))
        for mi, path in enumerate(paths):
            model = CausalLM.from_pretrained(path, groups, dtype=torch.float64)
            r = greedy_generate(model, groups, ids, NEW, attention_mask=mask)
            item = dict(layout=li, model=mi, tokens=r.tokens, logits=r.last_logits,
                        steps=r.steps, slots=r.cache_slots, cached=r.cache_tokens,
                        cp_rank=groups.coords.attn_cp, dp_rank=groups.coords.attn_dp)
            if li == EOS_LAYOUT:
                item["eos_tokens"] = greedy_generate(model, groups, ids, NEW, eos[mi],
                                                     attention_mask=mask, pad_token_id=0).tokens
            if li == SEED and mi == 0:
                counts = []
                for n in (1, 2):   # two decode steps minus one = one decode step
                    with count_collectives() as log:
                        greedy_generate(model, groups, ids, n, attention_mask=mask)
                    counts.append(log.by_kind_axis())
                item["step_collectives"] = dict(counts[1] - counts[0])
                try:   # bad input: the same ValueError on every rank, before any collective
                    greedy_generate(model, groups, ids + 128, 2, attention_mask=mask)
                except ValueError as err:
                    item["bad_input"] = str(err)
            out.append(item)
    for vi, (sizes, kwargs) in enumerate(VARIANTS):
        groups = build_groups(Topology(**sizes))
        model = CausalLM.from_pretrained(paths[1], groups, dtype=torch.float64, **kwargs)
        r = greedy_generate(model, groups, ids, NEW, attention_mask=mask)
        out.append(dict(variant=vi, tokens=r.tokens, logits=r.last_logits))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """HF models and their float64 greedy generations (each prompt alone, unpadded) and the
    last-step logits (a float64 forward of the generated sequence)."""
    from tests.helpers.hf_oracle import build_hf_model, to_dtype

    ids, mask = _prompts()
    S = ids.shape[1]
    paths, want, logits, eos, want_eos = [], [], [], [], []
    for name in MODELS:
        path = str(tmp_path_factory.mktemp(name))
        hf = to_dtype(build_hf_model(ModelConfig.preset(name), path), torch.float64)
        paths.append(path)
        rows, last = [], []
        for i, n in enumerate(LENGTHS):
            prompt = ids[i:i + 1, S - n:]
            gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
            rows.append(torch.cat([ids[i, :S - n], gen[0]]))
            with torch.no_grad():
                last.append(hf(gen[:, :-1]).logits[0, -1])
        want.append(torch.stack(rows))
        logits.append(torch.stack(last))
        # EOS: the token row 0 produces at its 3rd step; rows stop there, the rest is padding
        eos_id = int(want[-1][0, S + 2])
        eos.append(eos_id)
        rows = []
        for i, n in enumerate(LENGTHS):
            prompt = ids[i:i + 1, S - n:]
            gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW, eos_token_id=eos_id, pad_token_id=0)[0]
            full = torch.zeros(S + NEW, dtype=torch.long)
            full[S - n:S - n + gen.numel()] = gen
            rows.append(full)
        want_eos.append(torch.stack(rows))
    return dict(paths=paths, ids=ids, mask=mask, tokens=want, logits=logits, eos=eos,
                eos_tokens=want_eos)


@pytest.fixture(scope="module")
def single_process(reference):
    """megatron_ext on one process (no torch.distributed), float64."""
    from megatron_ext.serving import greedy_generate
    from megatron_ext.models.decoder import CausalLM

    groups = ParallelGroups.single_process()
    outs = []
    for path in reference["paths"]:
        model = CausalLM.from_pretrained(path, groups, dtype=torch.float64)
        outs.append(greedy_generate(model, groups, reference["ids"], NEW,
                                    attention_mask=reference["mask"]))
    return outs


def test_single_process_matches_transformers(reference, single_process):
    for mi, out in enumerate(single_process):
        assert torch.equal(out.tokens, reference["tokens"][mi])
        torch.testing.assert_close(out.last_logits, reference["logits"][mi], atol=HF_ATOL,
                                   rtol=0)
        # one rank caches every token but the last one generated
        assert out.cache_tokens.tolist() == [n - 1 + NEW for n in LENGTHS]
        assert out.steps == NEW


def test_eos_stops_early_and_pads(reference):
    """One prompt whose 3rd generated token is the EOS: generation stops after 3 steps and the
    output keeps its full length, padded after the EOS (transformers stops there too)."""
    from megatron_ext.serving import greedy_generate
    from megatron_ext.models.decoder import CausalLM

    ref = reference
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(ref["paths"][0], groups, dtype=torch.float64)
    out = greedy_generate(model, groups, ref["ids"][:1], NEW, ref["eos"][0], pad_token_id=0)
    assert out.steps == 3
    assert torch.equal(out.tokens, ref["eos_tokens"][0][:1])
    assert out.tokens[0, -(NEW - 3):].eq(0).all()


def test_transformers_left_padding_convention(reference):
    """Our left-padding convention is transformers' own: its batched, padded float32 generate
    gives the same tokens as each prompt alone."""
    from transformers import AutoModelForCausalLM

    ref = reference
    hf = AutoModelForCausalLM.from_pretrained(ref["paths"][0], dtype=torch.float32)
    got = hf.generate(ref["ids"], attention_mask=ref["mask"], do_sample=False,
                      max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, ref["tokens"][0])


def test_generation_matches_transformers_in_every_layout(reference, single_process):
    ref = reference
    results = run_ranks(_generate_rank, 4, ref["paths"], ref["ids"], ref["mask"], ref["eos"],
                        timeout=240)
    S = ref["ids"].shape[1]
    for li, sizes in enumerate(LAYOUTS):
        topo = Topology(**sizes)
        for mi in range(len(MODELS)):
            items = [next(it for it in per_rank
                          if it.get("layout") == li and it.get("model") == mi)
                     for per_rank in results]
            for it in items:   # identical on every rank, equal to transformers
                assert torch.equal(it["tokens"], ref["tokens"][mi]), (sizes, MODELS[mi])
                torch.testing.assert_close(it["logits"], ref["logits"][mi], atol=HF_ATOL,
                                           rtol=0)
                torch.testing.assert_close(it["logits"], single_process[mi].last_logits,
                                           atol=EXACT_ATOL, rtol=0)
                assert it["steps"] == NEW
                if "eos_tokens" in it:
                    assert torch.equal(it["eos_tokens"], ref["eos_tokens"][mi])
            _check_cache_balance(items, topo, S)
    for vi in range(len(VARIANTS)):
        for per_rank in results:
            it = next(it for it in per_rank if it.get("variant") == vi)
            assert torch.equal(it["tokens"], ref["tokens"][1]), VARIANTS[vi]
            torch.testing.assert_close(it["logits"], single_process[1].last_logits,
                                       atol=EXACT_ATOL, rtol=0)
    seeds = [next(it for it in per_rank if it.get("layout") == SEED and it.get("model") == 0)
             for per_rank in results]
    assert all("outside the model's vocabulary" in it["bad_input"] for it in seeds)
    seed = seeds[0]
    # one later decode step of the seed layout (2 layers, both MoE on MOE_FULL): per layer the
    # attention sum over attn_tp, the partial (out, lse) gather of cp_decode over attn_cp (shapes
    # were agreed at the first step), the MOE_FULL gather over moe_cp and the one MoE reduction
    # over the shard; then the logits gather over attn_tp and the token agreement over attn_dp_cp
    layers = ModelConfig.preset(MODELS[0]).num_layers
    assert seed["step_collectives"] == {
        ("all_reduce", "attn_tp"): 1 + layers,            # embedding + attention o_proj sums
        ("all_gather", "attn_cp"): layers,                # cp_decode: (out, lse)
        ("all_gather", "moe_cp"): layers,                 # TP_ATTN_FULL -> MOE_FULL
        ("all_reduce", "moe_shard"): layers,              # the MoE's one reduction
        ("all_gather", "attn_tp"): 1,                     # full-vocabulary logits
        ("all_gather", "attn_dp_cp"): 1,                  # the step's tokens
    }, seed["step_collectives"]


def _check_cache_balance(items, topo: Topology, S: int) -> None:
    """Every row's cached tokens are spread over its CP ranks: together they hold every token but
    the last generated one, and each rank holds its prefill share plus every cp-th decode
    token (slot counts within one of each other)."""
    from megatron_ext.data.cp_split import required_padded_length
    from megatron_ext.serving import decode_slots
    from megatron_ext.communication.token_layout import split_rows

    cp = topo.attn_cp
    rows = split_rows(len(LENGTHS), topo.attn_dp)
    padded = max(required_padded_length(n - 1, cp) for n in LENGTHS)
    for d in range(topo.attn_dp):
        start = sum(rows[:d])
        mine = [it for it in items if it["dp_rank"] == d]
        by_cp = {it["cp_rank"]: it for it in mine}
        for c, it in by_cp.items():
            assert it["slots"] == padded // cp + decode_slots(c, cp, NEW)
        assert max(it["slots"] for it in mine) - min(it["slots"] for it in mine) <= 1
        total = sum(by_cp[c]["cached"] for c in range(cp))
        assert total.tolist() == [LENGTHS[start + i] - 1 + NEW for i in range(rows[d])]
        if cp > 1:   # KV memory per rank shrinks with cp
            assert max(it["slots"] for it in mine) <= -(-(padded + NEW) // cp)


def test_bad_input_is_a_clear_error(reference):
    from megatron_ext.serving import generate
    from megatron_ext.models.decoder import CausalLM

    ref = reference
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(ref["paths"][0], groups)
    vocab, max_pos = model.config.vocab_size, model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the model's vocabulary"):
        generate(model, groups, torch.tensor([[1, 2, vocab]]), 2)
    with pytest.raises(ValueError, match=f"longer than the model's max_position_embeddings="
                                         f"{max_pos}"):
        generate(model, groups, torch.ones(1, max_pos + 1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="beyond the model's max_position_embeddings"):
        generate(model, groups, torch.ones(1, max_pos - 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="is not left padding"):
        generate(model, groups, torch.ones(2, 4, dtype=torch.long), 2,
                 attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]]))
    with pytest.raises(ValueError, match="max_new_tokens=0 must be a positive int"):
        generate(model, groups, torch.ones(1, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=f"eos_token_id={vocab} is outside"):
        generate(model, groups, torch.ones(1, 4, dtype=torch.long), 2, eos_token_id=vocab)
    # pp > 1 is refused before anything else (these groups would need torch.distributed)
    pp_groups = ParallelGroups(Topology(world=2, pp=2), 0,
                               **{a: AxisGroup.single(a) for a in GROUP_AXES})
    with pytest.raises(ValueError, match="one pipeline stage \\(pp=1\\); got pp=2"):
        generate(model, pp_groups, torch.ones(1, 4, dtype=torch.long), 2)
