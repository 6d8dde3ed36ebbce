"""Qwen3-MoE, Qwen2-MoE (mixed dense/sparse layers) and Llama against ``transformers``, in every
layout of issue 5, plus HF checkpoint round trips and the one-reduction-per-MoE-layer rule.

The oracle is ``transformers`` on tiny random models it builds and saves (``tests/helpers/hf_oracle.py``).
It runs in float64 except for its own float32 islands (RMSNorm statistics, router and attention
softmax), so megatron_ext (float64 throughout) is compared with it at float32-level tolerance,
and every parallel layout is *also* compared with megatron_ext's single-process run at float64
tolerance — the parallelism itself must be exact. Gradients: the loss (token cross-entropy over
all tokens + 0.1 × load-balancing loss) w.r.t. every parameter, summed over its ``grad_sync``
axes, equals the reference gradient's slice (through the checkpoint's ParamSpec / HF source).

Spawns: one 4-rank world runs the 4-rank layouts for all three models, the collective counts and
a round trip; one 8-rank world runs ``attn_cp 4 + moe_dp 2`` (k = 2) and another round trip.
"""
from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from megatron_ext.checkpoint.hf import load_hf_checkpoint
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.decoder import CausalLM
from tests.helpers.multirank import run_ranks

MODELS = ("tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-llama")
# vocabularies that divide by no attn_tp > 1 (padded in memory, real size on disk)
PADDED = {
    "qwen3-moe-v263": lambda: ModelConfig.preset("tiny-qwen3-moe").replace(vocab_size=263),
    "qwen2-moe-v311": lambda: ModelConfig.preset("tiny-qwen2-moe").replace(vocab_size=311),
    # attn_tp 5 (heads 10, KV heads 5), tied LM head
    "llama-v311-tied": lambda: ModelConfig.preset("tiny-llama").replace(
        vocab_size=311, hidden_size=40, num_heads=10, num_kv_heads=5, intermediate_size=80,
        tie_word_embeddings=True),
}
AUX_COEF = 0.1
B, S = 4, 10          # S not divisible by 2*cp for cp 2 and 4: CP padding is exercised
HF_ATOL = 2e-5        # megatron_ext (float64) vs transformers (float64 with float32 islands)
EXACT_ATOL = 1e-10    # any layout vs megatron_ext single process (both float64)
GRAD_RTOL = 2e-5      # relative to the largest reference gradient of the tensor


# ----------------------------------------------------------------------------- reference data
@dataclass
class ModelCase:
    name: str
    path: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    hf_logits: torch.Tensor                 # [B, S, V]
    hf_grads: dict                          # HF key -> gradient
    hf_aux: Optional[float]
    sp_logits: torch.Tensor                 # megatron_ext single process
    sp_grads: dict                          # HF key -> gradient
    sp_aux: Optional[float]
    doc_lengths: list = field(default_factory=list)
    hf_doc_logits: Optional[torch.Tensor] = None   # each packed document run alone


def _hf_side(hf, cfg: ModelConfig, ids, labels, doc_lengths):
    from tests.helpers.hf_oracle import per_hf_tensor, to_dtype

    ref = to_dtype(hf, torch.float64)
    out = ref(input_ids=ids, output_router_logits=any(cfg.sparse_layers))
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(),
                                           reduction="sum") / labels.numel()
    aux = getattr(out, "aux_loss", None)
    loss = ce + (AUX_COEF * aux if aux is not None else 0.0)
    loss.backward()
    grads = per_hf_tensor(ref, {n: p.grad for n, p in ref.named_parameters()})
    with torch.no_grad():
        docs = []
        for row in ids:
            pieces, start = [], 0
            for n in doc_lengths:
                pieces.append(ref(input_ids=row[start:start + n].view(1, -1)).logits[0])
                start += n
            docs.append(torch.cat(pieces))
    return out.logits.detach(), grads, None if aux is None else float(aux), torch.stack(docs)


def _single_process(path: str, ids, labels):
    model = CausalLM.from_pretrained(path, ParallelGroups.single_process(), dtype=torch.float64)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    out = model(ids, position_ids=pos, labels=labels, gather_logits=True)
    loss = out.loss.sum() / labels.numel()
    if out.aux_loss is not None:
        loss = loss + AUX_COEF * out.aux_loss
    loss.backward()
    sources = model.hf_sources()
    grads = {}
    for name, p in model.named_parameters():
        grads.update(sources[name].split(get_spec(p).real_part(p.grad.detach())))
    aux = None if out.aux_loss is None else float(out.aux_loss)
    return out.logits.detach(), grads, aux


@pytest.fixture(scope="module")
def cases_file(cases, tmp_path_factory) -> str:
    """The cases in a file: ranks load them (tensors passed to spawned processes as arguments
    would each hold a shared-memory file descriptor)."""
    path = str(tmp_path_factory.mktemp("cases") / "cases.pt")
    torch.save(cases, path)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, ModelCase]:
    from tests.helpers.hf_oracle import build_hf_model

    out = {}
    for i, name in enumerate(MODELS + tuple(PADDED)):
        cfg = PADDED[name]() if name in PADDED else ModelConfig.preset(name)
        path = str(tmp_path_factory.mktemp(name))
        # qwen2: sharded files (index.json) to exercise the sharded reader
        hf = build_hf_model(cfg, path, seed=i, max_shard_size="40KB" if "qwen2" in name else None)
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        docs = [4, 6]
        hf_logits, hf_grads, hf_aux, hf_docs = _hf_side(hf, cfg, ids, labels, docs)
        sp_logits, sp_grads, sp_aux = _single_process(path, ids, labels)
        out[name] = ModelCase(name, path, ids, labels, hf_logits, hf_grads, hf_aux, sp_logits,
                              sp_grads, sp_aux, docs, hf_docs)
    return out


def test_hf_fixture_is_sharded(cases):
    assert os.path.isfile(os.path.join(cases["tiny-qwen2-moe"].path,
                                       "model.safetensors.index.json"))


# ----------------------------------------------------------------------------- single process
def check_single_process(c: ModelCase) -> None:
    """The single-process run's logits, aux loss and gradients equal transformers'."""
    torch.testing.assert_close(c.sp_logits, c.hf_logits, atol=HF_ATOL, rtol=0,
                               msg=lambda m: f"{c.name}: {m}")
    assert (c.sp_aux is None) == (c.hf_aux is None)
    if c.hf_aux is not None:
        assert abs(c.sp_aux - c.hf_aux) < HF_ATOL
    assert set(c.sp_grads) == set(c.hf_grads)
    for key, ref in c.hf_grads.items():
        scale = float(ref.abs().max()) or 1.0
        torch.testing.assert_close(c.sp_grads[key], ref, atol=GRAD_RTOL * scale, rtol=0,
                                   msg=lambda m: f"{c.name} grad {key}: {m}")


@pytest.mark.parametrize("name", MODELS + tuple(PADDED))
def test_single_process_matches_transformers(cases, name):
    check_single_process(cases[name])


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """One run: topology sizes + model options + what to check."""

    label: str
    sizes: dict
    models: tuple = MODELS
    rows_per_dp: Optional[tuple] = None      # uneven attention-DP batch (forward only)
    grads: bool = True
    packed: bool = False                     # packed documents (segment ids)
    options: dict = field(default_factory=dict)


LAYOUTS_4 = [
    Layout("attn_tp2", dict(attn_tp=2, attn_dp=2, moe_tp=2, moe_ep=1, moe_dp=2),
           models=MODELS + ("qwen3-moe-v263", "qwen2-moe-v311")),
    Layout("attn_tp4, padded vocabulary", dict(attn_tp=4, moe_tp=4, moe_ep=1, moe_dp=1),
           models=("qwen3-moe-v263", "qwen2-moe-v311")),
    Layout("seed: attn_tp2 attn_cp2 moe_dp1 (moe_tp4)",
           dict(attn_tp=2, attn_cp=2, moe_tp=4, moe_ep=1, moe_dp=1)),
    Layout("seed + reduce-scatter + p2p CP", dict(attn_tp=2, attn_cp=2, moe_tp=4, moe_ep=1,
                                                  moe_dp=1),
           models=("tiny-qwen2-moe",),
           options=dict(allow_reduce_scatter=True, cp_strategy="p2p")),
    Layout("seed, packed documents", dict(attn_tp=2, attn_cp=2, moe_tp=4, moe_ep=1, moe_dp=1),
           models=("tiny-qwen2-moe",), packed=True, grads=False),
    Layout("attn_cp2 + moe_dp2", dict(attn_tp=2, attn_cp=2, moe_tp=1, moe_ep=2, moe_dp=2)),
    Layout("moe_ep2 x moe_tp2", dict(attn_tp=2, attn_dp=2, moe_tp=2, moe_ep=2, moe_dp=1)),
    Layout("moe_ep2 x moe_tp2, all-to-all dispatcher", dict(attn_tp=2, attn_dp=2, moe_tp=2,
                                                            moe_ep=2, moe_dp=1),
           models=("tiny-qwen3-moe",), options=dict(moe_dispatcher="all_to_all")),
    Layout("attn_dp2 uneven batch (3+1 rows)", dict(attn_tp=2, attn_dp=2, moe_tp=2, moe_ep=2,
                                                    moe_dp=1),
           rows_per_dp=(3, 1), grads=False),
]
LAYOUTS_8 = [
    Layout("attn_cp4 + moe_dp2 (k=2)", dict(attn_tp=2, attn_cp=4, moe_tp=2, moe_ep=2, moe_dp=2)),
]


def _run_layout(groups: ParallelGroups, layout: Layout, case: ModelCase) -> dict:
    """Load ``case`` into ``layout``, run forward (+ backward), return the worst errors."""
    from megatron_ext.communication.local_batch import gather_to_global, split_batch
    from tests.helpers.parallel_check import synced_grad

    model = CausalLM.from_pretrained(case.path, groups, dtype=torch.float64, **layout.options)
    docs = case.doc_lengths if layout.packed else None
    batch = split_batch(groups, case.input_ids, case.labels, rows_per_dp=layout.rows_per_dp,
                        doc_lengths=docs)
    out = model(**batch.model_kwargs(), gather_logits=True)
    logits = gather_to_global(out.logits.detach(), batch, groups)
    ref_hf = case.hf_doc_logits if layout.packed else case.hf_logits
    errors = {"logits_vs_hf": float((logits - ref_hf).abs().max())}
    if not layout.packed:
        errors["logits_vs_sp"] = float((logits - case.sp_logits).abs().max())
    if not layout.grads:
        return errors
    loss = out.loss.sum() / case.labels.numel()
    if out.aux_loss is not None:
        loss = loss + AUX_COEF * out.aux_loss
        aux = out.aux_loss.detach().clone()
        torch.distributed.all_reduce(aux, group=groups.stage.group)
        errors["aux_vs_hf"] = abs(float(aux) - case.hf_aux)
        errors["aux_vs_sp"] = abs(float(aux) - case.sp_aux)
    loss.backward()
    sources = model.hf_sources()
    worst_hf = worst_sp = 0.0
    for name, p in model.named_parameters():
        spec, full = get_spec(p), synced_grad(p, groups)
        got, sl = spec.real_part(full), spec.global_slices()
        padding = full.clone()
        spec.real_part(padding).zero_()
        errors["padding_grad"] = max(errors.get("padding_grad", 0.0),
                                     float(padding.abs().max()))
        for ref_grads, tag in ((case.hf_grads, "hf"), (case.sp_grads, "sp")):
            ref = sources[name].read(lambda k, s: ref_grads[k][s], sl)
            scale = max(float(torch.stack([ref_grads[k].abs().max()
                                           for k in sources[name].keys()]).max()), 1e-30)
            err = float((got - ref).abs().max()) if got.numel() else 0.0  # all padding
            if tag == "hf":
                worst_hf = max(worst_hf, err / scale)
            else:
                worst_sp = max(worst_sp, err)
    errors["grad_rel_vs_hf"], errors["grad_vs_sp"] = worst_hf, worst_sp
    return errors


def _check_errors(results: list, layouts: list) -> None:
    failures = []
    for rank, per_rank in enumerate(results):
        for (label, model), errs in per_rank["errors"].items():
            limits = {"padding_grad": 0.0, "logits_vs_hf": HF_ATOL, "logits_vs_sp": EXACT_ATOL,
                      "aux_vs_hf": HF_ATOL, "aux_vs_sp": EXACT_ATOL, "grad_rel_vs_hf": GRAD_RTOL,
                      "grad_vs_sp": EXACT_ATOL}
            for key, value in errs.items():
                if not value <= limits[key]:
                    failures.append(f"rank {rank} [{label}] {model}: {key}={value:.3g} > "
                                    f"{limits[key]:.0e}")
    expected = {(lay.label, m) for lay in layouts for m in lay.models}
    assert set(results[0]["errors"]) == expected
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- round trips
def _roundtrip(layouts: list, case: ModelCase, out_dir: str) -> None:
    """Load the original in layout X, save; load that in layout Y, save; ... (the parent
    compares the last directory with the original). Layouts with pp > 1 save from every stage."""
    source = case.path
    for i, groups in enumerate(layouts):
        model = CausalLM.from_pretrained(source, groups,
                                         dtype=torch.float64 if i % 2 else torch.float32)
        source = os.path.join(out_dir, f"step{i}")
        model.save_pretrained(source, shard_like=case.path, copy_files_from=case.path)


def _assert_same_files(original: str, copy: str) -> None:
    """Byte-identical files; the copy also has the manifest of its save, which must verify."""
    from megatron_ext.checkpoint.manifest import MANIFEST_FILE, verify_directory

    def names(path: str) -> list[str]:
        return sorted(n for n in os.listdir(path) if not n.startswith(".") and n != MANIFEST_FILE)

    assert names(copy) == names(original)
    assert verify_directory(copy)
    for name in names(original):
        assert filecmp.cmp(os.path.join(original, name), os.path.join(copy, name),
                           shallow=False), f"{name} differs after the round trip"


# ----------------------------------------------------------------------------- rank programs
def _groups(sizes: dict, world: int) -> ParallelGroups:
    from megatron_ext.parallel.groups import build_groups
    from megatron_ext.parallel.topology import Topology

    return build_groups(Topology(world=world, **sizes), timeout_s=60)


def _world_program(rank: int, world: int, cases_file: str, layouts: list, roundtrip: tuple,
                   count_case: Optional[str]) -> dict:
    torch.manual_seed(0)
    cases = torch.load(cases_file, weights_only=False)
    errors = {}
    built = {}
    for layout in layouts:
        key = tuple(sorted(layout.sizes.items()))
        if key not in built:
            built[key] = _groups(layout.sizes, world)
        for name in layout.models:
            errors[(layout.label, name)] = _run_layout(built[key], layout, cases[name])
    sizes_chain, rt_case, out_dir = roundtrip
    chain = [built.get(tuple(sorted(s.items()))) or _groups(s, world) for s in sizes_chain]
    _roundtrip(chain, cases[rt_case], out_dir)
    for tag, g in (("init_x", chain[0]), ("init_y", chain[-1])):
        model = CausalLM.for_stage(ModelConfig.from_hf_dir(cases[rt_case].path), g)
        model.init_weights(seed=3)
        model.save_pretrained(os.path.join(out_dir, tag))
    result = {"errors": errors}
    if count_case is not None:
        seed = built[tuple(sorted(LAYOUTS_4[2].sizes.items()))]
        result["counts"] = _collective_counts(seed, cases[count_case])
    return result


def test_four_rank_layouts(cases, cases_file, tmp_path):
    pp2 = dict(pp=2, attn_tp=2, moe_tp=1, moe_ep=2, moe_dp=1)
    chain = [LAYOUTS_4[2].sizes, pp2, LAYOUTS_4[6].sizes]
    roundtrip = (chain, "tiny-qwen2-moe", str(tmp_path))
    results = run_ranks(_world_program, 4, cases_file, LAYOUTS_4, roundtrip, "tiny-qwen2-moe",
                        timeout=240)
    _check_errors(results, LAYOUTS_4)
    _assert_same_files(cases["tiny-qwen2-moe"].path, str(tmp_path / "step2"))
    _assert_same_files(str(tmp_path / "init_x"), str(tmp_path / "init_y"))
    _check_counts(results)


def test_eight_rank_layouts(cases, cases_file, tmp_path):
    x = dict(attn_tp=2, attn_cp=4, moe_tp=2, moe_ep=2, moe_dp=2)
    y = dict(attn_tp=1, attn_dp=8, moe_tp=1, moe_ep=4, moe_dp=2)
    roundtrip = ([x, y], "tiny-qwen3-moe", str(tmp_path))
    results = run_ranks(_world_program, 8, cases_file, LAYOUTS_8, roundtrip, None, timeout=240)
    _check_errors(results, LAYOUTS_8)
    _assert_same_files(cases["tiny-qwen3-moe"].path, str(tmp_path / "step1"))
    _assert_same_files(str(tmp_path / "init_x"), str(tmp_path / "init_y"))


LAYOUTS_5 = [
    Layout("attn_tp5, padded vocabulary, tied head", dict(attn_tp=5), models=("llama-v311-tied",)),
]


def test_five_rank_padded_vocabulary(cases, cases_file, tmp_path):
    """Vocabulary 311 over attention TP 5 (padded to 640: the last rank holds 55 real rows of 128)
    vs transformers; HF round trip attn_tp 5 -> attn_dp 5 byte-identical, init identical."""
    roundtrip = ([dict(attn_tp=5), dict(attn_tp=1)], "llama-v311-tied", str(tmp_path))
    results = run_ranks(_world_program, 5, cases_file, LAYOUTS_5, roundtrip, None, timeout=240)
    _check_errors(results, LAYOUTS_5)
    _assert_same_files(cases["llama-v311-tied"].path, str(tmp_path / "step1"))
    _assert_same_files(str(tmp_path / "init_x"), str(tmp_path / "init_y"))


# ----------------------------------------------------------------------------- collective counts
def _collective_counts(groups: ParallelGroups, case: ModelCase) -> dict:
    """Forward collectives of the seed layout, per layer, for the real model and for a variant
    whose shared expert reduces its own output (numerically the same, two reductions)."""
    from megatron_ext.parallel.comm_counter import count_collectives
    from megatron_ext.communication.local_batch import split_batch

    out = {}
    for variant in ("model", "double_reduction"):
        model = CausalLM.from_pretrained(case.path, groups, dtype=torch.float64)
        if variant == "double_reduction":
            for layer in model.layers:
                if layer.is_sparse:
                    _reduce_shared_expert_separately(layer.mlp.shared_expert, groups)
        batch = split_batch(groups, case.input_ids)
        per_layer = []
        with torch.no_grad(), count_collectives() as log:
            hooks = [layer.register_forward_hook(
                lambda *_a, n=len(model.layers): per_layer.append(len(log.records)))
                for layer in model.layers]
            res = model(**batch.model_kwargs(), compute_aux_loss=False)
            for h in hooks:
                h.remove()
        bounds = [0] + per_layer
        out[variant] = {
            "layers": [[(r.kind, r.axis) for r in log.records[a:b]]
                       for a, b in zip(bounds[:-1], bounds[1:])],
            "tail": [(r.kind, r.axis) for r in log.records[bounds[-1]:]],
            "logits": res.logits.detach(),
        }
    return out


def _reduce_shared_expert_separately(shared, groups: ParallelGroups) -> None:
    """Seed 001's bug shape: the shared expert all-reduces its own partial over the shard (and
    scales it by 1/shard so the later sum stays right) instead of riding the layer's reduction."""
    from megatron_ext.communication.collectives import all_reduce

    inner = shared.forward

    def forward(x):
        return all_reduce(inner(x), groups.moe_shard) / groups.moe_shard.size
    shared.forward = forward


REDUCTIONS = ("all_reduce", "reduce_scatter")


def moe_layer_reductions(layer_records: list) -> int:
    """Reductions over the MoE shard in a layer's span of forward collectives."""
    return sum(1 for kind, axis in layer_records if kind in REDUCTIONS and axis == "moe_shard")


def assert_one_reduction_per_moe_layer(counts: dict, sparse: list) -> None:
    """Each MoE layer's output is reduced once over the shard. A deferred reduction is issued in
    the next layer's ``prepare_attn`` (or the final norm), so the count is over the whole run:
    as many shard reductions as sparse layers, and none in any dense-only span."""
    spans = counts["layers"] + [counts["tail"]]
    total = sum(moe_layer_reductions(s) for s in spans)
    assert total == sum(sparse), f"{total} reductions over moe_shard for {sum(sparse)} MoE layers"
    for i, span in enumerate(spans[:-1]):
        prev_sparse = i > 0 and sparse[i - 1]
        assert moe_layer_reductions(span) <= int(sparse[i]) + int(prev_sparse), \
            f"layer {i}: {moe_layer_reductions(span)} shard reductions in its span"


def _check_counts(results: list) -> None:
    cfg = ModelConfig.preset("tiny-qwen2-moe")
    sparse = list(cfg.sparse_layers)
    for rank, res in enumerate(results):
        counts = res["counts"]
        assert_one_reduction_per_moe_layer(counts["model"], sparse)
        # every attention output and dense MLP output: exactly one attn_tp reduction each, plus
        # the embedding's; CP attention adds only all-gathers
        spans = counts["model"]["layers"] + [counts["model"]["tail"]]
        attn_tp_reductions = sum(1 for s in spans for kind, axis in s
                                 if kind in REDUCTIONS and axis == "attn_tp")
        assert attn_tp_reductions == 1 + len(sparse) + (len(sparse) - sum(sparse)), spans
        with pytest.raises(AssertionError, match="reductions over moe_shard"):
            assert_one_reduction_per_moe_layer(counts["double_reduction"], sparse)
        torch.testing.assert_close(counts["double_reduction"]["logits"],
                                   counts["model"]["logits"], atol=EXACT_ATOL,
                                   rtol=0)


# ----------------------------------------------------------------------------- checkpoint errors
def test_checkpoint_errors_name_the_tensor(cases, tmp_path):
    from safetensors.torch import load_file, save_file

    c = cases["tiny-qwen3-moe"]
    tensors = load_file(os.path.join(c.path, "model.safetensors"))
    config = open(os.path.join(c.path, "config.json")).read()
    model = CausalLM(ModelConfig.from_hf_dir(c.path), ParallelGroups.single_process())

    def write(mutate) -> str:
        d = tmp_path / f"ckpt{len(os.listdir(tmp_path))}"
        d.mkdir()
        (d / "config.json").write_text(config)
        t = dict(tensors)
        mutate(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        return str(d)

    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    missing = write(lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"missing tensors: {key}"):
        load_hf_checkpoint(model, missing)
    shape = tuple(tensors[key].shape)
    bad = write(lambda t: t.__setitem__(key, torch.zeros(shape[0] + 1, shape[1])))
    with pytest.raises(ValueError, match=rf"tensor {key}: checkpoint shape \({shape[0] + 1}, "
                                         rf"{shape[1]}\) but the model expects \({shape[0]}, "
                                         rf"{shape[1]}\)"):
        load_hf_checkpoint(model, bad)
    extra = write(lambda t: t.__setitem__("model.layers.0.mlp.mystery.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="no place for: model.layers.0.mlp.mystery.weight"):
        load_hf_checkpoint(model, extra)
    load_hf_checkpoint(model, extra, strict=False)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_checkpoint(model, str(tmp_path))
    arch = tmp_path / "mixtral"
    arch.mkdir()
    (arch / "config.json").write_text('{"model_type": "mixtral"}')
    with pytest.raises(ValueError, match="unsupported architecture: model_type='mixtral'"):
        CausalLM.from_pretrained(str(arch), ParallelGroups.single_process())


def test_single_process_roundtrip_is_byte_identical(cases, tmp_path):
    """Single file, one process: saving reproduces transformers' files byte for byte."""
    c = cases["tiny-llama"]
    model = CausalLM.from_pretrained(c.path, ParallelGroups.single_process())
    model.save_pretrained(str(tmp_path / "out"), copy_files_from=c.path)
    _assert_same_files(c.path, str(tmp_path / "out"))


def test_tied_embeddings_and_pipeline_stages(tmp_path):
    """A tied-embedding model split into two pipeline stages (``layer_range`` stages, as the
    pretraining loop builds them): each stage loads only its tensors (the last stage's LM head
    from ``model.embed_tokens.weight``), and stage 0 -> stage 1 equals the unsplit model (which
    equals transformers), forward and backward of the token loss."""
    from megatron_ext.checkpoint.hf import load_hf_checkpoint
    from megatron_ext.parallel.stages import stage_layer_range
    from tests.helpers.hf_oracle import build_hf_model, to_dtype

    cfg = ModelConfig.preset("tiny-qwen2-moe").replace(tie_word_embeddings=True)
    hf = build_hf_model(cfg, str(tmp_path), seed=7)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    pos = torch.arange(S).expand_as(ids)
    with torch.no_grad():
        ref = to_dtype(hf, torch.float64)(input_ids=ids).logits
    single = ParallelGroups.single_process()
    full = CausalLM.from_pretrained(str(tmp_path), single, dtype=torch.float64)
    assert full.lm_head.weight is None and full.lm_head.tied
    out = full(ids, position_ids=pos, labels=labels, compute_aux_loss=False)
    torch.testing.assert_close(out.logits, ref, atol=HF_ATOL, rtol=0)
    out.loss.sum().backward()

    stages = []
    for stage in range(2):
        model = CausalLM(cfg, single, pre_process=stage == 0, post_process=stage == 1,
                         layer_range=stage_layer_range(cfg.num_layers, 2, stage),
                         dtype=torch.float64)
        load_hf_checkpoint(model, str(tmp_path))
        stages.append(model)
    assert [m.layer_range for m in stages] == [(0, 2), (2, 3)]
    assert "lm_head.weight" in dict(stages[1].named_parameters())
    first = stages[0](ids, position_ids=pos)
    sent = first.hidden_states.detach().requires_grad_(True)
    last = stages[1](position_ids=pos, hidden_states=sent, labels=labels, compute_aux_loss=False)
    torch.testing.assert_close(last.logits, out.logits, atol=EXACT_ATOL, rtol=0)
    last.loss.sum().backward()
    first.hidden_states.backward(sent.grad)
    grads = {n: p.grad for m in stages for n, p in m.named_parameters()}
    reference = {n: p.grad for n, p in full.named_parameters()}
    assert set(grads) == set(reference) | {"lm_head.weight"}
    # the tied table's gradient is the sum of the embedding's and the LM head's
    torch.testing.assert_close(grads["model.embed_tokens.weight"] + grads["lm_head.weight"],
                               reference["model.embed_tokens.weight"], atol=1e-12, rtol=0)
    for name, want in reference.items():
        if name != "model.embed_tokens.weight":
            torch.testing.assert_close(grads[name], want, atol=1e-12, rtol=0,
                                       msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="layer_range=\\(2, 2\\) must be a non-empty range"):
        CausalLM(cfg, single, layer_range=(2, 2))
