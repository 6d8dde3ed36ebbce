"""Load-balanced CP split: chunk ownership, inverse, padding rules, packed documents, batches."""
from __future__ import annotations

import pytest
import torch

from megatron_ext.data.cp_split import (IGNORE_INDEX, cp_layout, cp_padded_length,
                                            docs_from_position_ids,
                                            required_padded_length, shift_labels, split_for_cp,
                                            split_batch_for_cp, unsplit_from_cp, unsplit_index)
from megatron_ext.communication.local_batch import gather_from_cp
from megatron_ext.parallel.groups import AxisGroup, build_groups
from megatron_ext.parallel.topology import Topology
from tests.helpers.multirank import run_ranks


def _expected_zigzag(n: int, cp: int, r: int) -> list[int]:
    """Chunks r and 2cp-1-r of range(n), n a multiple of 2cp, written out by hand."""
    c = n // (2 * cp)
    return list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_divisible_split_is_zigzag_and_balanced(cp):
    n = 8 * cp
    held = []
    for r in range(cp):
        idx = split_for_cp(n, cp, r).tolist()
        assert idx == _expected_zigzag(n, cp, r)
        held += idx
        # causal work (sum of visible keys) is the same on every rank
        assert sum(i + 1 for i in idx) == sum(i + 1 for i in split_for_cp(n, cp, 0).tolist())
    assert sorted(held) == list(range(n))


@pytest.mark.parametrize("n,cp", [(13, 2), (7, 4), (9, 3), (16, 4), (1, 1)])
def test_inverse_round_trip_and_padding(n, cp):
    padded = cp_padded_length(n, cp)
    assert padded % (2 * cp) == 0 and n <= padded < n + 2 * cp
    local = [split_for_cp(n, cp, r) for r in range(cp)]
    assert all(len(x) == padded // cp for x in local)
    concat = torch.cat(local)
    assert (concat == -1).sum().item() == padded - n  # padding is marked, nothing truncated
    assert sorted(concat[concat >= 0].tolist()) == list(range(n))
    inv = unsplit_index(n, cp)
    assert concat[inv].tolist() == list(range(n))
    # the same through the tensor helpers: values travel with their positions
    x = torch.arange(100, 100 + n).view(1, n)
    b = [split_batch_for_cp(x, None, cp, r) for r in range(cp)]
    back = unsplit_from_cp(torch.cat([bb.input_ids for bb in b], 1), b[0].layouts)
    assert back.tolist() == x.tolist()


def test_padding_limit_errors():
    assert cp_padded_length(5, 4) == 8  # 3 padding <= 5 real tokens
    with pytest.raises(ValueError, match="cp_size=4 cannot split 3 tokens.*5 padding tokens > 3"):
        cp_padded_length(3, 4)
    with pytest.raises(ValueError, match="max_pad"):
        cp_padded_length(13, 2, max_pad=2)
    assert cp_padded_length(13, 2, max_pad=3) == 16
    with pytest.raises(ValueError, match="seq_len"):
        cp_padded_length(0, 2)
    with pytest.raises(ValueError, match="cp_size"):
        cp_padded_length(8, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        split_for_cp(8, 2, 2)
    # packed documents pad per document: four 1-token docs need 4 * 7 padding at cp 4
    with pytest.raises(ValueError, match="28 padding tokens > 4"):
        cp_layout(4, 4, [1, 1, 1, 1])
    assert cp_layout(4, 4, [1, 1, 1, 1], max_pad=28).padded_len == 32
    with pytest.raises(ValueError, match="sum to 9"):
        cp_layout(10, 2, [4, 5])
    with pytest.raises(ValueError, match="padded_len=10 must be a multiple"):
        cp_layout(8, 2, padded_len=10)


def test_packed_documents_are_balanced_per_document():
    docs, cp = [5, 11, 3], 2
    lay = cp_layout(19, cp, docs, max_pad=100)
    assert lay.padded_len == required_padded_length(19, cp, docs) == 8 + 12 + 4
    # every document's padded span is split zigzag on its own
    starts = [0, 8, 20]
    for r in range(cp):
        slots = lay.local_slots(r).tolist()
        want = []
        for start, span in zip(starts, (8, 12, 4)):
            want += [start + i for i in _expected_zigzag(span, cp, r)]
        assert slots == want
    # segments / positions follow the documents; padding is -1 / 0
    seg = lay.segment.tolist()
    assert seg[:8] == [0] * 5 + [-1] * 3 and seg[8:20] == [1] * 11 + [-1]
    assert seg[20:] == [2] * 3 + [-1]
    assert lay.doc_position[8:19].tolist() == list(range(11))
    inv = lay.inverse()
    concat = torch.cat([lay.source[lay.local_slots(r)] for r in range(cp)])
    assert concat[inv].tolist() == list(range(19))


def test_filler_keeps_rows_balanced():
    lay = cp_layout(8, 2, padded_len=16, max_pad=8)
    # the document keeps its own zigzag; the filler block is split the same way after it
    assert lay.local_slots(0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert lay.local_slots(1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    assert lay.source[8:].tolist() == [-1] * 8


def test_split_batch_fields():
    b, s, cp = 2, 13, 2
    ids = torch.arange(b * s).view(b, s) + 1000
    docs = [[5, 8], [13]]
    labels = shift_labels(ids, docs)
    pos_in = torch.stack([torch.cat([torch.arange(5), torch.arange(8)]), torch.arange(13)])
    parts = [split_batch_for_cp(ids, labels, cp, r, doc_lengths=docs) for r in range(cp)]
    assert parts[0].padded_len == 16  # row 0 needs 8 + 8, row 1 needs 14 -> one padded length
    for p in parts:
        assert p.input_ids.shape == (b, 8)
        pad = p.segment_ids < 0
        assert (p.labels[pad] == IGNORE_INDEX).all() and (p.input_ids[pad] == 0).all()
        assert (p.position_ids[pad] == 0).all()
    gather = lambda name: unsplit_from_cp(torch.cat([getattr(p, name) for p in parts], 1),
                                          parts[0].layouts)
    assert gather("input_ids").tolist() == ids.tolist()
    assert gather("labels").tolist() == labels.tolist()
    assert gather("position_ids").tolist() == pos_in.tolist()  # RoPE positions reset per doc
    assert gather("segment_ids").tolist() == [[0] * 5 + [1] * 8, [0] * 13]
    tok = gather("token_index")
    assert (tok[:, 1:] > tok[:, :-1]).all()  # causal order follows the sequence
    # documents can come from position ids restarting at 0 (HF flattening convention)
    from_pos = [split_batch_for_cp(ids, labels, cp, r, position_ids=pos_in) for r in range(cp)]
    for a, p in zip(from_pos, parts):
        assert torch.equal(a.token_index, p.token_index)
        assert torch.equal(a.segment_ids, p.segment_ids)
    with pytest.raises(ValueError, match="labels shape"):
        split_batch_for_cp(ids, labels[:, :5], cp, 0)
    with pytest.raises(ValueError, match="2 rows|rows for a batch"):
        split_batch_for_cp(ids, None, cp, 0, doc_lengths=[[13]])


def test_shift_labels_and_docs_from_positions():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert shift_labels(ids).tolist() == [[2, 3, 4, 5, 6, -100]]
    assert shift_labels(ids, [2, 4]).tolist() == [[2, -100, 4, 5, 6, -100]]
    assert docs_from_position_ids(torch.tensor([0, 1, 2, 0, 1, 0])) == [3, 2, 1]
    assert docs_from_position_ids(torch.tensor([7, 8, 0, 1])) == [2, 2]


def _gather_worker(rank, world):
    cp = build_groups(Topology(world=world, attn_cp=world)).attn_cp
    ids = torch.arange(26).view(2, 13)
    part = split_batch_for_cp(ids, None, world, cp.rank, doc_lengths=[[5, 8], [6, 7]],
                              max_pad=13)
    x = part.input_ids.to(torch.float64).unsqueeze(-1).repeat(1, 1, 3)
    return gather_from_cp(x, cp, part.layouts)[..., 0].tolist()


def test_gather_from_cp_restores_global_order():
    ids = torch.arange(26).view(2, 13).tolist()
    for got in run_ranks(_gather_worker, 2, timeout=60):
        assert got == ids
    single = split_batch_for_cp(torch.tensor(ids), None, 1, 0)
    assert gather_from_cp(single.input_ids, AxisGroup.single("attn_cp"),
                          single.layouts).tolist() == ids
