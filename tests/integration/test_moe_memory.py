"""What a MoE layer keeps for backward (saved-tensor hooks; code in tests/helpers/moe_saved_bytes.py):
exactly its router's and experts' saved tensors, the experts' input rows and row weights, and
the dispatch/combine index vectors — for the ``local`` dispatcher (one rank with every expert, and
moe_ep 2) and the ``all_to_all`` dispatcher (moe_ep 2, gloo), float32 and bf16, with and without
selective recompute. The experts' output rows ``[N, H]`` are not kept: the routing weights are
applied inside the experts' activation, so the combine is an unweighted slot sum."""
from __future__ import annotations

from tests.helpers import moe_saved_bytes
from tests.helpers.multirank import run_ranks


def test_moe_layer_keeps_no_expert_output_rows():
    results = run_ranks(moe_saved_bytes.run, 2)
    for per_rank in results:
        assert len(per_rank) == 12
        assert all(r["rows"] > 0 and r["saved"] > 0 for r in per_rank), per_rank
