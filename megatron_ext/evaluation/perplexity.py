"""Mean next-token loss and perplexity over dataset windows (one results cell per batch)."""
from __future__ import annotations

from megatron_ext.evaluation.loss import EvalResult, evaluate_loss
from megatron_ext.evaluation.windows import WindowSettings, batch_key, window_batch

TASK = "perplexity"


def run_perplexity(ctx, settings: WindowSettings, dataset) -> dict:
    """Every batch not already in the results file; returns (and writes) the summary."""
    cells = ctx.store.cells(TASK)
    device = next(ctx.model.parameters()).device
    todo = [r for r in settings.batches(ctx.groups.topology.attn_dp) if batch_key(r) not in cells]
    progress = ctx.progress(TASK, len(todo), sum(len(r) for r in todo) * settings.seq_len)
    for rows in todo:
        part = evaluate_loss(ctx.model, ctx.groups, window_batch(dataset, rows, settings.seq_len,
                                                                 device),
                             vocab_size=ctx.model.config.vocab_size)
        ctx.store.put_cell(TASK, batch_key(rows), {"loss_sum": part.loss_sum,
                                                  "tokens": part.tokens})
        progress.advance(len(rows) * settings.seq_len)
    total = EvalResult(sum(c["loss_sum"] for c in cells.values()),
                       sum(c["tokens"] for c in cells.values()))
    summary = {"loss": total.loss, "perplexity": total.perplexity, "tokens": total.tokens,
               "tokens_per_second": progress.tokens_per_second}
    ctx.store.put_summary(TASK, summary)
    return summary
