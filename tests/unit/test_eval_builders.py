"""Retrieval prompt builders and scoring: exact lengths, the needle where the depth says, the key
in the prompt, exact-match rules; position buckets; generation batches for attention DP."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.evaluation.needle import NeedleBuilder
from megatron_ext.evaluation.passkey import FILLER, INTRO, QUESTION, PasskeyBuilder
from megatron_ext.evaluation.position_loss import position_buckets
from megatron_ext.evaluation.retrieval import (GridSettings, build_prompt, generation_batches,
                                               is_exact_match)

TOK = ByteTokenizer()


@pytest.mark.parametrize("length", [400, 513, 1000])
def test_passkey_prompt_places_the_key_at_the_depth(length):
    builder = PasskeyBuilder(TOK, digits=5)
    intro, question = TOK.encode(INTRO), TOK.encode(QUESTION)
    sentence = max(len(" " + s) for s in FILLER)
    rng = np.random.default_rng(1)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = builder.sample(length, depth, rng)
        text = TOK.decode(s.prompt_ids)
        assert s.length == length
        assert len(s.answer) == 5 and s.answer[0] != "0"
        needle = TOK.encode(f" The pass key is {s.answer}. Remember it. {s.answer} is the pass key.")
        assert np.array_equal(s.prompt_ids[s.needle_start:s.needle_start + needle.size], needle)
        assert text.count(s.answer) == 2        # only in the needle
        assert np.array_equal(s.prompt_ids[:intro.size], intro)
        assert np.array_equal(s.prompt_ids[-question.size:], question)
        room = length - intro.size - needle.size - question.size
        filler_before = s.needle_start - intro.size
        assert abs(filler_before - depth * room) <= sentence   # the closest sentence boundary
        assert s.depth == filler_before / room
        if depth == 0.0:
            assert s.needle_start == intro.size
        if depth == 1.0:
            assert s.needle_start + needle.size == length - question.size
        # the needle follows a whole sentence (or the intro), except at the end of the filler,
        # whose last sentence is cut to make the length exact
        before = TOK.decode(s.prompt_ids[:s.needle_start])
        at_end = s.needle_start + needle.size == length - question.size
        assert before.endswith(".") or before.endswith("\n") or at_end


def test_needle_prompt_in_real_text():
    text = " ".join(f"Sentence number {i} talks about the weather in town {i}." for i in range(50))
    builder = NeedleBuilder(TOK, text)
    s = builder.sample(600, 0.5, np.random.default_rng(3))
    prompt = TOK.decode(s.prompt_ids)
    assert s.length == 600 and len(s.answer) == 7
    assert f"special magic numbers for " in prompt and f"is: {s.answer}." in prompt
    word = prompt.split("special magic numbers for ")[1].split(" is:")[0]
    assert prompt.endswith(f"The special magic number for {word} mentioned in the provided text "
                           f"is")
    assert "weather in town" in prompt
    assert builder.fixed_tokens < 600


def test_build_prompt_rejects_no_room():
    with pytest.raises(ValueError, match="leaves no room for filler"):
        build_prompt(np.arange(5), [np.arange(3)], np.arange(4), np.arange(3), 12, 0.5)
    with pytest.raises(ValueError, match="depth=1.5 must be in"):
        build_prompt(np.arange(5), [np.arange(3)], np.arange(4), np.arange(3), 40, 1.5)


@pytest.mark.parametrize("generated, answer, want", [
    (" 12345. Remember", "12345", True), ("12345", "12345", True), (" 12345\n", "12345", True),
    (" 123456", "12345", False), (" 1234", "12345", False), (" the key is 12345", "12345", False),
    (" 12345a", "12345", False), ("", "12345", False), ("  eat a  sandwich.", "eat a sandwich",
                                                         True)])
def test_exact_match(generated, answer, want):
    assert is_exact_match(generated, answer) is want


def test_grid_settings_checks():
    grid = GridSettings((1024, 4096), (0.0, 1.0), samples_per_cell=2, answer_tokens=8)
    grid.check_fits(4104, 300, attn_dp=2)
    with pytest.raises(ValueError, match="need 4104 positions, beyond the model's "
                                         "max_position_embeddings=4096"):
        grid.check_fits(4096, 300, attn_dp=1)
    with pytest.raises(ValueError, match="--lengths=1024 leaves no room"):
        grid.check_fits(8192, 1024, attn_dp=1)
    with pytest.raises(ValueError, match="gives some of the attn_dp=4 ranks no prompt"):
        grid.check_fits(8192, 300, attn_dp=4)
    with pytest.raises(ValueError, match="--depths"):
        GridSettings((1024,), (0.5, 1.2))


def test_position_buckets_and_generation_batches():
    assert position_buckets(2, 4) == (1, 2)
    edges = position_buckets(8192, 13)
    assert edges[0] == 1 and edges[-1] == 8192 and list(edges) == sorted(set(edges))
    ratios = [b / a for a, b in zip(edges[1:-1], edges[2:])]
    assert max(ratios) / min(ratios) < 1.1            # log-spaced
    for n, bs, dp in ((5, 2, 2), (3, 2, 2), (7, 3, 1), (4, 1, 4), (6, 6, 3)):
        batches = generation_batches(list(range(n)), bs, dp)
        assert sum(batches, []) == list(range(n))
        assert all(len(b) >= dp for b in batches)
        assert all(len(b) <= max(bs, dp) for b in batches) or len(batches) == n // dp
    with pytest.raises(ValueError, match="every attention-DP group needs one"):
        generation_batches([1], 2, 2)


def test_results_store_resume_rules(tmp_path):
    from megatron_ext.evaluation.results import ResultsStore

    model = {"kind": "hf", "path": "/m", "architecture": "llama", "config": {"num_layers": 2}}
    store = ResultsStore(str(tmp_path), model, writer=True)
    store.task("passkey", {"lengths": [1024], "depths": [0.5]})
    store.begin({"attn_cp": 2}, "eval.py --task passkey")
    store.put_cell("passkey", "L=1024,d=0.5", {"accuracy": 1.0, "nan": float("nan")})
    text = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match="exists: pass --resume"):
        ResultsStore(str(tmp_path), model)
    resumed = ResultsStore(str(tmp_path), model, resume=True)
    assert resumed.task("passkey", {"lengths": [1024], "depths": [0.5]})["cells"] == {
        "L=1024,d=0.5": {"accuracy": 1.0, "nan": None}}
    with pytest.raises(ValueError, match="ran with other settings \\(lengths differ\\)"):
        resumed.task("passkey", {"lengths": [2048], "depths": [0.5]})
    with pytest.raises(ValueError, match="written for another model"):
        ResultsStore(str(tmp_path), dict(model, config={"num_layers": 3}), resume=True)
    assert (tmp_path / "results.json").read_text() == text    # refusals write nothing
