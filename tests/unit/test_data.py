"""Tokenizers, the memory-mapped dataset and prepare_data CLI, sample order, and the DP/CP split of
a global batch (checked by rebuilding the global batch from every rank's pieces)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.cli import REPO, checkout_env
from megatron_ext.data.batching import inputs_and_labels, split_global_batch
from megatron_ext.data.dataset import (SampleOrder, TokenDataset, corpus_files, open_dataset,
                                       read_text_documents, write_token_dataset)
from megatron_ext.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from megatron_ext.data.cp_split import IGNORE_INDEX
from megatron_ext.parallel.topology import Topology



def test_byte_tokenizer_round_trip_any_text():
    tok = load_tokenizer("byte")
    text = "To be, or not to be — ça va? 日本語"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(list(ids) + [tok.eos_id, tok.pad_id]) == text
    assert tok.vocab_size == 258 and {tok.eos_id, tok.pad_id} == {256, 257}


def test_embedded_corpus_is_real_text_of_useful_size():
    files = corpus_files()
    ds = open_dataset(None, ByteTokenizer())
    assert ds.meta.num_documents == len(files) >= 2
    assert 200_000 < ds.meta.num_tokens < 600_000
    text = ByteTokenizer().decode(ds.tokens[:2000])
    assert "Citizen" in text  # Coriolanus, act 1


def test_prepare_data_cli_writes_dataset_equal_to_in_memory(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "2nd"}) + "\n")
    out = tmp_path / "ds" / "mine"
    proc = subprocess.run([sys.executable, f"{REPO}/examples/prepare_data.py", "--output",
                           str(out), str(txt), str(jsonl)], capture_output=True, text=True,
                          timeout=60, env=checkout_env())
    assert proc.returncode == 0, proc.stderr
    assert "3 documents" in proc.stdout
    ds = TokenDataset.open(str(out))
    tok = ByteTokenizer()
    want = np.concatenate([np.append(tok.encode(t), tok.eos_id)
                           for t in ("hello world\n", "first doc", "2nd")])
    assert np.array_equal(np.asarray(ds.tokens), want)
    assert ds.tokens.dtype == np.uint16
    mem = TokenDataset.from_documents(read_text_documents([str(txt), str(jsonl)], tok), tok, "m")
    assert np.array_equal(mem.tokens, ds.tokens)
    # samples: seq_len + 1 consecutive tokens, the label token shared with the next sample
    assert ds.num_samples(4) == (len(want) - 1) // 4
    assert np.array_equal(ds.sample(2, 4), want[8:13])


def test_dataset_errors_name_the_problem(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="does not exist"):
        TokenDataset.open(str(tmp_path / "missing"))
    prefix = str(tmp_path / "d")
    write_token_dataset(prefix, [tok.encode("abcdefgh")], tok)
    ds = TokenDataset.open(prefix + ".bin")
    with pytest.raises(ValueError, match="global batch needs 4"):
        ds.check_for(seq_len=4, global_batch_size=4, vocab_size=300, tokenizer_name="byte")
    with pytest.raises(ValueError, match="vocab_size=258 > the model's vocab_size=128"):
        ds.check_for(seq_len=2, global_batch_size=1, vocab_size=128, tokenizer_name="byte")
    with pytest.raises(ValueError, match="tokenized with 'byte'"):
        ds.check_for(seq_len=2, global_batch_size=1, vocab_size=300, tokenizer_name="hf:/x")
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="has 20 bytes but the description says 9 tokens"):
        TokenDataset.open(prefix)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object with a 'text'"):
        list(read_text_documents([str(bad)], tok))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin1}: not UTF-8 text \\(byte 3"):
        list(read_text_documents([str(latin1)], tok))
    (tmp_path / "broken.json").write_text('{"dtype": ')
    (tmp_path / "broken.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.json'} is not valid JSON"):
        TokenDataset.open(str(tmp_path / "broken"))
    for bad_input, named in ((tmp_path / "nope.txt", "nope.txt"), (latin1, "latin1.txt")):
        proc = subprocess.run([sys.executable, f"{REPO}/examples/prepare_data.py", "--output",
                               str(tmp_path / "o"), str(bad_input)], env=checkout_env(),
                              capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], proc.stderr


def test_sample_order_is_a_seeded_permutation_per_epoch():
    order = SampleOrder(num_samples=10, seed=3)
    first_epoch = order.indices(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert not np.array_equal(first_epoch, np.arange(10))
    second = order.indices(10, 10)
    assert sorted(second) == list(range(10)) and not np.array_equal(first_epoch, second)
    # any window reads the same stream (resume at any sample position)
    assert np.array_equal(SampleOrder(10, 3).indices(7, 6), np.concatenate([first_epoch[7:],
                                                                             second[:3]]))
    assert np.array_equal(SampleOrder(10, 4, shuffle=False).indices(8, 4), [8, 9, 0, 1])


@pytest.mark.parametrize("sizes,seq_len", [
    (dict(world=1), 16),
    (dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1), 13),   # seed layout, padded CP split
    (dict(world=8, attn_tp=2, attn_cp=2, attn_dp=2), 16),
    (dict(world=8, pp=2, attn_cp=4), 21),
])
def test_global_batch_split_over_dp_micro_batches_and_cp_rebuilds_the_batch(sizes, seq_len):
    topo = Topology(**sizes)
    rng = np.random.default_rng(0)
    g, mbs = 8, 2
    samples = rng.integers(0, 250, size=(g, seq_len + 1))
    want_inputs, want_labels = inputs_and_labels(samples)
    seen_inputs = torch.full_like(want_inputs, -1)
    seen_labels = torch.full_like(want_labels, -7)
    per_group: dict[tuple, list] = {}
    local_tokens = 0
    for rank in range(topo.world):
        c = topo.coords(rank)
        step = split_global_batch(samples, topo, c, mbs, pad_token_id=257)
        assert step.global_label_tokens == g * seq_len
        assert step.global_micro_batches == g // mbs
        assert len(step.micro_batches) == g // (mbs * topo.attn_dp)
        key = (c.pp, c.attn_dp, c.attn_cp)
        if key in per_group:  # every attention-TP rank (and stage) sees identical tensors
            for a, b in zip(per_group[key], step.micro_batches):
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            continue
        per_group[key] = step.micro_batches
        if c.pp:
            continue
        for i, mb in enumerate(step.micro_batches):
            assert mb.input_ids.shape[1] * topo.attn_cp >= seq_len
            assert mb.input_ids.shape[1] % 2 == 0 or topo.attn_cp == 1
            real = mb.segment_ids >= 0
            assert torch.all(mb.labels[~real] == IGNORE_INDEX)
            assert torch.all(mb.input_ids[~real] == 257)
            local_tokens += mb.num_label_tokens
            first_row = (i * topo.attn_dp + c.attn_dp) * mbs  # interleaved over DP
            for r in range(mbs):
                pos = mb.position_ids[r][real[r]]
                assert torch.all(seen_inputs[first_row + r, pos] == -1), "token seen twice"
                seen_inputs[first_row + r, pos] = mb.input_ids[r][real[r]]
                seen_labels[first_row + r, pos] = mb.labels[r][real[r]]
    assert torch.equal(seen_inputs, want_inputs) and torch.equal(seen_labels, want_labels)
    assert local_tokens == g * seq_len


def test_local_hf_tokenizer_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<eos>": 0, "[UNK]": 1, "to": 2, "be": 3, "or": 4, "not": 5}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>",
                                                unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer)
    assert list(tok.encode("to be or not to be")) == [2, 3, 4, 5, 2, 3]
    assert tok.eos_id == 0 and tok.pad_id == 0 and tok.vocab_size == 6
    with pytest.raises(ValueError, match="neither 'byte' nor a local directory"):
        load_tokenizer(str(tmp_path / "missing"))
