"""What every evaluation task runs with: the model in its layout, the tokenizer, the results
file and rank 0's progress output."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.evaluation.progress import Progress
from megatron_ext.evaluation.results import ResultsStore
from megatron_ext.parallel.groups import ParallelGroups


@dataclass
class EvalContext:
    model: object
    groups: ParallelGroups
    tokenizer: object
    store: ResultsStore
    batch_size: int = 1
    show_progress: bool = True

    @property
    def is_writer(self) -> bool:
        return self.groups.global_rank == 0

    def progress(self, label: str, cells: int, tokens: int, unit: str = "tokens") -> Progress:
        return Progress(label, cells, tokens, enabled=self.show_progress and self.is_writer,
                        unit=unit)
