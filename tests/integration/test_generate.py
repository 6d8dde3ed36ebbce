"""Generation (CP prefill + decode with one owner per token against a KV cache spread over CP
ranks) equals transformers' ``generate(do_sample=False)`` in every layout, with ~1/cp of the KV
per CP rank; sampled tokens are the same in every layout; requests with their own
max_new_tokens leave the batch when finished; per-step collectives are pinned."""
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
    dict(world=4, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=1),   # k=4 = cp: rows replicated
    dict(world=4, attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=2),   # attn_dp 2 x cp 2, k=2
    dict(world=4, attn_tp=2, attn_cp=2, moe_ep=2, moe_tp=2, moe_dp=1),  # moe_ep x moe_tp, k=2
]
# other model options on the Qwen2-MoE (shared expert): SCATTERED residual + all-to-all MoE with
# decode rows spread over attn_tp (3 rows over attn_tp 4: one rank holds none), p2p CP prefill
VARIANTS = [
    (dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),
     dict(cp_strategy="p2p", moe_dispatcher="all_to_all", allow_reduce_scatter=True)),
    (dict(world=4, attn_tp=4, moe_ep=2, moe_tp=2, moe_dp=1), dict(moe_dispatcher="all_to_all")),
    # MoE shards smaller than an attention-TP group (issue 15): two shards of moe_ep 2 per
    # attention-TP group of 4 (3 decode rows: the second shard's slices are 1 and 0 rows), and
    # one-rank shards under CP decode with one owner per token
    (dict(world=4, attn_tp=4, moe_ep=2, moe_tp=1), {}),
    (dict(world=4, attn_tp=2, attn_cp=2, moe_ep=1, moe_tp=1), dict(cp_strategy="p2p")),
]
SEED = 1
EOS_LAYOUT = 3
COUNTED = (1, 2, 3, 4)    # layouts whose per-step collectives are pinned
REPLICATED = (2, 3)   # attn_tp 1, token group = CP group: decode rows replicated ("auto")
OWNER = 3             # ... also run with one owner per token (decode_rows="owner")
VARIED_LAYOUTS = (2, 3)  # layouts that also run requests with their own max_new_tokens
VARIED = (6, 2, 4)       # max_new_tokens per request (row 1 leaves the batch after 2 steps)
LENGTHS = (11, 6, 9)   # left-padded to 11
NEW = 6
HF_ATOL = 2e-5       # float64 vs transformers' float64 with float32 islands (router softmax)
EXACT_ATOL = 1e-10   # any layout vs the single-process run, both float64


def _sampled():
    from megatron_ext.serving import SamplingParams

    return [SamplingParams(NEW, temperature=0.8, top_p=0.9, seed=11),
            SamplingParams(NEW, temperature=1.3, top_k=5, seed=7),
            SamplingParams(NEW, temperature=0.7, top_p=0.5, seed=2 ** 40 + 3)]


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
    from megatron_ext.serving import Engine, SamplingParams, generate_batch, greedy_generate
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
            if mi == 0:
                item["sampled"] = generate_batch(model, groups, ids, _sampled(),
                                                 attention_mask=mask).tokens
            if mi == 0 and li in VARIED_LAYOUTS:
                v = greedy_generate(model, groups, ids, list(VARIED), attention_mask=mask,
                                    pad_token_id=0, check_every=1)
                item["varied"] = (v.tokens, v.last_logits, v.rows_per_step)
            if mi == 0 and li in COUNTED:
                for key, rows in (("step_collectives", "auto"), ("owner_collectives", "owner")):
                    if rows == "owner" and li != OWNER:
                        continue
                    counts = []
                    for n in (2, 3):   # three decode steps minus two = one decode step
                        with count_collectives() as log:
                            greedy_generate(model, groups, ids, n, attention_mask=mask,
                                            decode_rows=rows)
                        counts.append(log.records)
                    item[key] = _difference(*counts)
            if li == OWNER:
                r = greedy_generate(model, groups, ids, NEW, attention_mask=mask,
                                    decode_rows="owner")
                item["owner"] = (r.tokens, r.last_logits)
            if li == SEED and mi == 0:
                # bad input: the same ValueError on every rank, before any collective
                item["bad_input"] = [_error(lambda: greedy_generate(model, groups, ids + 128, 2,
                                                                    attention_mask=mask)),
                                     _error(lambda: Engine(model, groups).generate([[1, 2], []])),
                                     _error(lambda: generate_batch(
                                         model, groups, ids, SamplingParams(10 ** 6),
                                         attention_mask=mask)),
                                     _error(lambda: SamplingParams(4, temperature=-1.0)),
                                     _error(lambda: SamplingParams(4, top_p=0.0))]
            out.append(item)
    for vi, (sizes, kwargs) in enumerate(VARIANTS):
        groups = build_groups(Topology(**sizes))
        model = CausalLM.from_pretrained(paths[1], groups, dtype=torch.float64, **kwargs)
        r = greedy_generate(model, groups, ids, NEW, attention_mask=mask)
        out.append(dict(variant=vi, tokens=r.tokens, logits=r.last_logits))
    return out


def _error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def _difference(small, large) -> dict:
    """``{(kind, axis): (count, bytes)}`` of the records in ``large`` beyond ``small`` (kinds
    whose count is unchanged are left out: the final check's gather is wider by one column)."""
    from collections import Counter

    count, nbytes = Counter(), Counter()
    for sign, records in ((-1, small), (1, large)):
        for r in records:
            count[(r.kind, str(r.axis))] += sign
            nbytes[(r.kind, str(r.axis))] += sign * r.nbytes
    return {k: (count[k], nbytes[k]) for k in count if count[k]}


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
        rows, last, varied = [], [], []
        for i, n in enumerate(LENGTHS):
            prompt = ids[i:i + 1, S - n:]
            gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
            rows.append(torch.cat([ids[i, :S - n], gen[0]]))
            with torch.no_grad():
                last.append(hf(gen[:, :-1]).logits[0, -1])
                if name == MODELS[0]:   # request i stops after VARIED[i] tokens
                    varied.append(hf(gen[:, :n + VARIED[i] - 1]).logits[0, -1])
        want.append(torch.stack(rows))
        logits.append(torch.stack(last))
        if varied:
            varied_logits = torch.stack(varied)
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
    varied_tokens = want[0].clone()
    for i, m in enumerate(VARIED):
        varied_tokens[i, S + m:] = 0
    return dict(paths=paths, ids=ids, mask=mask, tokens=want, logits=logits, eos=eos,
                eos_tokens=want_eos, varied_tokens=varied_tokens, varied_logits=varied_logits)


@pytest.fixture(scope="module")
def single_process(reference):
    """megatron_ext on one process (no torch.distributed), float64."""
    from megatron_ext.serving import generate_batch, greedy_generate
    from megatron_ext.models.decoder import CausalLM

    groups = ParallelGroups.single_process()
    outs = []
    for mi, path in enumerate(reference["paths"]):
        model = CausalLM.from_pretrained(path, groups, dtype=torch.float64)
        outs.append(greedy_generate(model, groups, reference["ids"], NEW,
                                    attention_mask=reference["mask"]))
        if mi == 0:
            sampled = generate_batch(model, groups, reference["ids"], _sampled(),
                                     attention_mask=reference["mask"]).tokens
    return dict(greedy=outs, sampled=sampled)


def test_single_process_matches_transformers(reference, single_process):
    for mi, out in enumerate(single_process["greedy"]):
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


def test_engine_requests_of_different_lengths(reference):
    """The offline API on token lists: each request its own max_new_tokens; a request leaves the
    batch at the first check after it finished (rows 3 → 2 → 1), and the results are
    transformers' greedy tokens cut at each request's length, or at its EOS."""
    from megatron_ext.serving import Engine, SamplingParams
    from megatron_ext.models.decoder import CausalLM

    ref = reference
    S = ref["ids"].shape[1]
    prompts = [ref["ids"][i, S - n:].tolist() for i, n in enumerate(LENGTHS)]
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(ref["paths"][0], groups, dtype=torch.float64)
    engine = Engine(model, groups, check_every=2)
    done = engine.generate(prompts, [SamplingParams(m) for m in VARIED])
    for i, m in enumerate(VARIED):
        assert done[i].token_ids == ref["tokens"][0][i, S:S + m].tolist()
        assert done[i].finish_reason == "length"
    assert engine.last_output.rows_per_step == (3, 3, 2, 2, 1, 1)
    eos = ref["eos"][0]   # request 0 emits it as its 3rd token
    done = Engine(model, groups, eos_token_id=eos, check_every=1).generate(
        prompts[:1], SamplingParams(NEW))
    assert done[0].token_ids == ref["tokens"][0][0, S:S + 3].tolist()
    assert done[0].finish_reason == "eos"


def test_cli_prompts_file_and_sampling_flags(reference, tmp_path):
    """``examples/generate.py --prompts-file`` (one process): per-request settings, JSONL out in
    input order with the Engine's tokens for the same requests, tokens/s printed; a bad line
    exits 2 with one line naming the file, the line and the rule, and writes nothing."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from megatron_ext.serving import Engine, SamplingParams
    from megatron_ext.models.decoder import CausalLM
    from tests.helpers.cli import REPO, checkout_env

    path = reference["paths"][0]
    reqs, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    reqs.write_text(json.dumps({"prompt": "To be", "max_new_tokens": 4}) + "\n\n"
                    + json.dumps({"prompt": "or not", "temperature": 0.8, "top_k": 5,
                                  "seed": 3}) + "\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, os.path.join(REPO, "examples", "generate.py"), "--model", path,
           "--prompts-file", str(reqs), "--output", str(out), "--max-new-tokens", "6",
           "--dtype", "float64"]
    run = subprocess.run(cmd, env=checkout_env(MASTER_PORT=port), capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(path, groups, dtype=torch.float64)
    want = Engine(model, groups).generate(
        [list(b"To be"), list(b"or not")],
        [SamplingParams(4), SamplingParams(6, temperature=0.8, top_k=5, seed=3)])
    assert [r["prompt"] for r in rows] == ["To be", "or not"]
    assert [r["token_ids"] for r in rows] == [c.token_ids for c in want]
    assert [r["finish_reason"] for r in rows] == ["length", "length"]
    reqs.write_text('{"prompt": "x", "top_p": 0}\n')
    out.unlink()
    run = subprocess.run(cmd, env=checkout_env(MASTER_PORT=port), capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"generate.py: invalid generation: --prompts-file {reqs} line 1: top_p=0 must be in "
        f"(0, 1] (1 = no nucleus filter)"], run.stderr
    assert not out.exists()


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
                torch.testing.assert_close(it["logits"], single_process["greedy"][mi].last_logits,
                                           atol=EXACT_ATOL, rtol=0)
                assert it["steps"] == NEW
                if "eos_tokens" in it:
                    assert torch.equal(it["eos_tokens"], ref["eos_tokens"][mi])
                if "owner" in it:   # one owner per token: the same tokens and logits
                    assert torch.equal(it["owner"][0], ref["tokens"][mi])
                    torch.testing.assert_close(it["owner"][1],
                                               single_process["greedy"][mi].last_logits,
                                               atol=EXACT_ATOL, rtol=0)
            _check_cache_balance(items, topo, S)
    for vi in range(len(VARIANTS)):
        for per_rank in results:
            it = next(it for it in per_rank if it.get("variant") == vi)
            assert torch.equal(it["tokens"], ref["tokens"][1]), VARIANTS[vi]
            torch.testing.assert_close(it["logits"], single_process["greedy"][1].last_logits,
                                       atol=EXACT_ATOL, rtol=0)
    _check_sampling(results, ref, single_process["sampled"])
    _check_varied(results, ref)
    seeds = [next(it for it in per_rank if it.get("layout") == SEED and it.get("model") == 0)
             for per_rank in results]
    for it in seeds:   # every rank names the same problem
        assert it["bad_input"] == seeds[0]["bad_input"]
    msgs = seeds[0]["bad_input"]
    assert "outside the model's vocabulary" in msgs[0]
    assert "prompt 1 is empty" in msgs[1]
    assert "beyond the model's max_position_embeddings" in msgs[2]
    assert "temperature=-1.0 must be a finite number >= 0" in msgs[3]
    assert "top_p=0.0 must be in (0, 1]" in msgs[4]
    _check_step_collectives(results)


def _check_step_collectives(results) -> None:
    """One later decode step with rows replicated over CP (layout ``REPLICATED``): per layer the
    CP partials all-gathered (every rank merges every row) and the MoE sum all-reduced over the
    shard, nothing else (no gather of the attention input or of the MoE rows); per step the
    sampled tokens all-gathered over CP (each row's LM head and sampling on one rank). With one
    owner per token: per layer the attention input gathered
    over attn_cp, the attention sum over attn_tp, the partial (out, lse) all-to-all over attn_cp
    (each owner receives its rows' partials; shapes were agreed at the first step), the MOE_FULL
    gather over moe_cp of *owned* rows (each token once: the bytes are the DP group's rows,
    padded to the largest owner's share, not cp copies of them) and the one MoE reduction over the shard; the embedding's sum and the
    logits gather over attn_tp. Nothing over attn_dp_cp: tokens stay on their owners between
    checks."""
    from megatron_ext.communication.token_layout import split_rows

    cfg = ModelConfig.preset(MODELS[0])
    L, H, f64 = cfg.num_layers, cfg.hidden_size, 8
    for li in COUNTED:
        topo = Topology(**LAYOUTS[li])
        tp, cp = topo.attn_tp, topo.attn_cp
        for per_rank in results:
            it = next(it for it in per_rank if it.get("layout") == li and it.get("model") == 0)
            rows = split_rows(len(LENGTHS), topo.attn_dp)[it["dp_rank"]]
            if li in REPLICATED:   # every CP rank runs every row: two collectives per layer
                # and the sampled tokens (each row sampled on one CP rank) gathered once
                want = {("all_gather", "attn_cp"): (L + 1, L * cp * rows * cfg.num_heads
                                                    * (cfg.head_dim + 1) * f64
                                                    + cp * max(split_rows(rows, cp)) * 8),
                        ("all_reduce", "moe_shard"): (L, L * rows * H * f64)}
                assert it["step_collectives"] == want, (LAYOUTS[li], it["step_collectives"])
                if li != OWNER:
                    continue
            row_bytes = cp * max(split_rows(rows, cp)) * H * f64   # one gather over cp owners
            want = {("all_gather", "attn_cp"): (L, L * row_bytes),
                    ("all_to_all", "attn_cp"): (L, L * rows * (cfg.num_heads // tp)
                                                * (cfg.head_dim + 1) * f64),
                    ("all_gather", "moe_cp"): (L, L * row_bytes),
                    ("all_reduce", "moe_shard"): (L, None)}
            if tp > 1:
                want[("all_reduce", "attn_tp")] = (1 + L, None)
                want[("all_gather", "attn_tp")] = (1, None)
            got = it["owner_collectives" if li == OWNER else "step_collectives"]
            assert set(got) == set(want), (LAYOUTS[li], got)
            for key, (n, nbytes) in want.items():
                assert got[key][0] == n, (LAYOUTS[li], key, got)
                if nbytes is not None:
                    assert got[key][1] == nbytes, (LAYOUTS[li], key, got)


def _check_sampling(results, ref, single_sampled) -> None:
    """Sampled tokens (temperature, top-k, top-p, a seed per request): the same on every rank of
    every layout as in the single-process run, and not the greedy tokens."""
    for per_rank in results:
        for it in per_rank:
            if "sampled" in it:
                assert torch.equal(it["sampled"], single_sampled), LAYOUTS[it["layout"]]
    S = ref["ids"].shape[1]
    assert not torch.equal(single_sampled[:, S:], ref["tokens"][0][:, S:])


def _check_varied(results, ref) -> None:
    """Requests with their own max_new_tokens (6, 2, 4), checked every step: each row stops at
    its own length (pad after), its last logits are those of its last step, and a finished
    request leaves its DP group's batch at the next check."""
    for per_rank in results:
        for it in per_rank:
            if "varied" not in it:
                continue
            tokens, logits, rows = it["varied"]
            assert torch.equal(tokens, ref["varied_tokens"]), LAYOUTS[it["layout"]]
            torch.testing.assert_close(logits, ref["varied_logits"], atol=HF_ATOL, rtol=0)
            topo = Topology(**LAYOUTS[it["layout"]])
            if topo.attn_dp == 1:     # requests 0, 1, 2: 3 rows, 1 after request 1 and 2 end
                assert rows == (3, 3, 2, 2, 1, 1), rows
            elif it["dp_rank"] == 0:  # requests 0, 1
                assert rows == (2, 2, 1, 1, 1, 1), rows


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
