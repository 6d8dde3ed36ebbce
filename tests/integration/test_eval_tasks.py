"""The long-context eval tasks against independent references: position-resolved loss equals
transformers' per-token loss on the same windows, passkey answers equal transformers' greedy
generation for the same prompts, in CP/TP/DP layouts; a training checkpoint evaluates in another
layout without conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.evaluation.passkey import PasskeyBuilder
from megatron_ext.evaluation.position_loss import (PositionLoss, evaluate_position_loss,
                                                   position_buckets)
from megatron_ext.evaluation.retrieval import RetrievalSample, answer_samples, is_exact_match
from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology
from tests.helpers.hf_oracle import to_dtype
from tests.helpers.multirank import run_ranks

LAYOUTS = [
    dict(world=4, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=1),   # one sequence over 4 CP ranks
    dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),            # tp 2 x cp 2
    dict(world=4, attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=2),   # cp 2 x attn_dp 2 (rows 2 + 1)
]
PASSKEY_LAYOUTS = (0, 2)     # cp 4, and cp 2 with rows split over attn_dp 2
WINDOW = 41
BUCKETS = 6
PASSKEY_LEN = 420
ANSWER_TOKENS = 6
EXACT = 1e-10    # any layout vs the single-process run, both float64
# single process vs transformers (float64 with float32 islands: RoPE tables, MoE router softmax),
# relative to each bucket's loss sum
HF_TOL = {"tiny-llama": 1e-7, "tiny-qwen3-moe": 2e-5}


def _config(preset: str) -> ModelConfig:
    return ModelConfig.preset(preset).replace(vocab_size=258)   # the byte tokenizer's vocabulary


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.helpers.byte_hf_tokenizer import save_byte_tokenizer
    from tests.helpers.hf_oracle import build_hf_model

    out = {}
    for preset in ("tiny-llama", "tiny-qwen3-moe"):
        path = str(tmp_path_factory.mktemp(preset))
        out[preset] = (build_hf_model(_config(preset), path), path)
        save_byte_tokenizer(path)
    return out


@pytest.fixture(scope="module")
def training_checkpoint(models, tmp_path_factory):
    """The llama's weights as a training checkpoint (saved by one process)."""
    from tests.helpers.training_checkpoint import save_as_training_checkpoint

    root = str(tmp_path_factory.mktemp("ckpt"))
    save_as_training_checkpoint(models["tiny-llama"][1], root)
    return root


def _windows() -> torch.Tensor:
    return torch.randint(0, 258, (3, WINDOW), generator=torch.Generator().manual_seed(5))


def _passkey_samples() -> list[RetrievalSample]:
    builder = PasskeyBuilder(ByteTokenizer(), digits=5)
    rng = np.random.default_rng(0)
    return [builder.sample(PASSKEY_LEN, d, rng) for d in (0.0, 0.5, 1.0)]


LL_REQUESTS = [("Question: is the sky blue?\nAnswer:", " yes"), ("Question: is the sky blue?\nAnswer:",
                " no, it is green"), ("The sky is ", "blue"), ("", "An empty context."),
               ("x" * 40, " long context, truncated on the left")]
ROLLING = ["A short text.", "A text longer than one window of the rolling evaluation: it is cut "
                            "into several windows."]
GEN = [("Once upon a time", {"until": ["\n"], "max_gen_toks": 5}),
       ("The pass key is 123", {"until": [".", "\n"], "max_gen_toks": 4, "do_sample": False}),
       ("Q", {"max_gen_toks": 3})]
LL_MAX, ROLLING_MAX = 48, 16


def _adapter_results(model, groups) -> dict:
    from megatron_ext.evaluation.lm_eval_adapter import ParallelLMScorer

    tok = ByteTokenizer()
    scorer = ParallelLMScorer(model, groups, tok, max_length=LL_MAX, batch_size=2)
    rolling = ParallelLMScorer(model, groups, tok, max_length=ROLLING_MAX, batch_size=3)
    return {"loglikelihood": scorer.loglikelihood(LL_REQUESTS),
            "rolling": rolling.loglikelihood_rolling([(t,) for t in ROLLING]),
            "generate": scorer.generate_until(GEN)}


def _eval_rank(rank, world, paths, ckpt, windows, samples):
    from megatron_ext.evaluation.model_source import open_model_source
    from megatron_ext.parallel.groups import build_groups

    edges = position_buckets(WINDOW, BUCKETS)
    out = []
    for li, sizes in enumerate(LAYOUTS):
        groups = build_groups(Topology(**sizes))
        for name, path in paths.items():
            model = open_model_source(path).load(groups, dtype=torch.float64)
            pl = evaluate_position_loss(model, groups, windows, edges, vocab_size=258)
            item = dict(layout=li, model=name, position_loss=pl)
            if name == "tiny-llama" and li in PASSKEY_LAYOUTS:
                item["answers"] = answer_samples(model, groups, ByteTokenizer(), samples,
                                                 ANSWER_TOKENS, batch_size=2)
                item["adapter"] = _adapter_results(model, groups)
            out.append(item)
        if li == 1:   # the training checkpoint, saved by one process, in a tp 2 x cp 2 layout
            model = open_model_source(ckpt).load(groups, dtype=torch.float64)
            out.append(dict(layout=li, model="training",
                            position_loss=evaluate_position_loss(model, groups, windows, edges,
                                                                 vocab_size=258)))
    return out


def _hf_position_loss(hf_model, windows: torch.Tensor, edges) -> PositionLoss:

    ref = to_dtype(hf_model, torch.float64)
    with torch.no_grad():
        logits = ref(input_ids=windows).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    sums, counts = [], []
    for a, b in zip(edges[:-1], edges[1:]):   # context length t predicts token t (index t-1)
        part = losses[:, a - 1:b - 1]
        sums.append(float(part.sum()))
        counts.append(part.numel())
    return PositionLoss(tuple(edges), tuple(sums), tuple(counts))


def _check_position_loss(got: PositionLoss, want: PositionLoss, tol: float) -> None:
    assert got.edges == want.edges and got.tokens == want.tokens
    for g, w in zip(got.loss_sum, want.loss_sum):
        assert abs(g - w) <= tol * abs(w), (got.loss_sum, want.loss_sum)


def test_position_loss_and_passkey_match_transformers(models, training_checkpoint):
    from megatron_ext.models.decoder import CausalLM

    windows, samples = _windows(), _passkey_samples()
    edges = position_buckets(WINDOW, BUCKETS)
    # one process vs transformers; every layout below vs the one process
    groups, want = ParallelGroups.single_process(), {}
    for name, (hf, path) in models.items():
        model = CausalLM.from_pretrained(path, groups, dtype=torch.float64)
        want[name] = evaluate_position_loss(model, groups, windows, edges, vocab_size=258)
        _check_position_loss(want[name], _hf_position_loss(hf, windows, edges), HF_TOL[name])
    want["training"] = want["tiny-llama"]
    # transformers' greedy answers to the same prompts
    hf = to_dtype(models["tiny-llama"][0], torch.float64)
    ids = torch.as_tensor(np.stack([s.prompt_ids for s in samples]))
    with torch.no_grad():
        ref_tokens = hf.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                 eos_token_id=ByteTokenizer.eos_id,
                                 pad_token_id=ByteTokenizer.pad_id)[:, PASSKEY_LEN:].tolist()
    ref_tokens = [row[:row.index(256)] if 256 in row else row for row in ref_tokens]

    adapter_want = _harness_reference(hf, models["tiny-llama"][1])

    paths = {name: path for name, (_, path) in models.items()}
    results = run_ranks(_eval_rank, 4, paths, training_checkpoint, windows, samples, timeout=240)
    seen = set()
    for per_rank in results:
        for item in per_rank:
            _check_position_loss(item["position_loss"], want[item["model"]], EXACT)
            seen.add((item["layout"], item["model"]))
            if "answers" in item:
                got = [a["generated_ids"] for a in item["answers"]]
                assert got == ref_tokens, (item["layout"], got, ref_tokens)
                for a, s, ref in zip(item["answers"], samples, ref_tokens):
                    assert a["correct"] == is_exact_match(ByteTokenizer().decode(ref), s.answer)
                _check_adapter(item["adapter"], adapter_want)
    assert len(seen) == len(LAYOUTS) * len(models) + 1


def _instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _harness_reference(hf, path: str) -> dict:
    """The harness's own HF backend on the float64 transformers model, and log-likelihoods
    computed by hand from transformers' logits (the same numbers without the harness)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    kw = dict(pretrained=hf, tokenizer=tok, batch_size=1, device="cpu", prefix_token_id=256)
    lm, lm_rolling = HFLM(max_length=LL_MAX, **kw), HFLM(max_length=ROLLING_MAX, **kw)
    want = {"loglikelihood": lm.loglikelihood(_instances("loglikelihood", LL_REQUESTS)),
            "rolling": lm_rolling.loglikelihood_rolling(
                _instances("loglikelihood_rolling", [(t,) for t in ROLLING])),
            "generate": lm.generate_until(_instances("generate_until", GEN))}
    by_hand = []
    for context, continuation in LL_REQUESTS:   # left-truncated to max_length + 1 tokens
        stripped = context.rstrip()                 # trailing spaces belong to the continuation
        context, continuation = stripped, context[len(stripped):] + continuation
        ctx_ids = list(tok.encode(context)) or [256]
        cont = list(tok.encode(context + continuation))[len(tok.encode(context)):]
        ids = torch.tensor([(ctx_ids + cont)[-(LL_MAX + 1):]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].double(), -1)
        n = ids.shape[1] - 1
        picked = logp[torch.arange(n - len(cont), n), torch.tensor(cont)]
        by_hand.append(float(picked.sum()))
    for (h, _), w in zip(want["loglikelihood"], by_hand):
        assert abs(h - w) < 1e-9, (h, w)   # the harness backend itself agrees with transformers
    return want


def _check_adapter(got: dict, want: dict) -> None:
    assert len(got["loglikelihood"]) == len(want["loglikelihood"])
    for (g, g_greedy), (w, w_greedy) in zip(got["loglikelihood"], want["loglikelihood"]):
        assert abs(g - w) <= 1e-7 * abs(w) and g_greedy == w_greedy, (got, want)
    for g, w in zip(got["rolling"], want["rolling"]):
        assert abs(g - w) <= 1e-7 * abs(w), (got["rolling"], want["rolling"])
    assert got["generate"] == want["generate"]


MC_DOCS = [{"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
           {"question": "How many legs has a cat?", "choices": ["two", "four"], "answer": 1},
           {"question": "Which is a fruit?", "choices": ["apple", "stone", "cloud"], "answer": 0}]
MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _run_mc_task(lm, include: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False)
    return simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, log_samples=True,
                           bootstrap_iters=0, verbosity="ERROR")


def test_rolling_windows_and_real_harness_class(models, tmp_path):
    """The windows equal the harness's own; the harness's LM subclass scores a local
    multiple-choice task file exactly as the harness's HF backend does (one process)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from megatron_ext.evaluation.lm_eval_adapter import (ParallelLMScorer, lm_eval_model,
                                                         rolling_windows)
    from megatron_ext.models.decoder import CausalLM

    for n in (1, 5, 16, 17, 40, 64):
        for max_len in (1, 4, 16):
            tokens = list(range(100, 100 + n))
            want = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, prefix_token=7, max_seq_len=max_len, context_len=1)]
            assert rolling_windows(tokens, 7, max_len) == [(list(a), list(b)) for a, b in want]
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(models["tiny-llama"][1], groups, dtype=torch.float64)
    scorer = ParallelLMScorer(model, groups, ByteTokenizer(), max_length=LL_MAX)
    lm = lm_eval_model(scorer)
    assert isinstance(lm, LM) and lm.max_length == LL_MAX
    requests = _instances("loglikelihood", LL_REQUESTS)
    assert lm.loglikelihood(requests) == scorer.loglikelihood(LL_REQUESTS)

    import json
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    ours = _run_mc_task(lm, str(tmp_path))
    hf = to_dtype(models["tiny-llama"][0], torch.float64)
    ref = _run_mc_task(HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(
        models["tiny-llama"][1]), batch_size=1, device="cpu", max_length=LL_MAX,
        prefix_token_id=256), str(tmp_path))
    got = [[r[0][0] for r in s["resps"]] for s in ours["samples"]["tiny_mc"]]
    want = [[r[0][0] for r in s["resps"]] for s in ref["samples"]["tiny_mc"]]
    assert len(got) == len(MC_DOCS) and [len(g) for g in got] == [3, 2, 3]
    for g, w in zip(sum(got, []), sum(want, [])):
        assert abs(g - w) <= 1e-7 * abs(w), (got, want)
    assert ours["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
