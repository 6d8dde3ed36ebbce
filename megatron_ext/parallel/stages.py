"""Which decoder layers each pipeline stage holds (pure: no process group)."""
from __future__ import annotations

from typing import Optional, Sequence


def stage_layer_range(num_layers: int, pp: int, stage: int,
                      layers_per_stage: Optional[Sequence[int]] = None) -> tuple[int, int]:
    """``(start, stop)`` of pipeline stage ``stage``'s layers: ``layers_per_stage`` if given,
    else as even as possible with the earlier stages one layer longer."""
    if not 0 <= stage < pp:
        raise ValueError(f"stage={stage} out of range for pp={pp}")
    if layers_per_stage is None:
        if num_layers < pp:
            raise ValueError(f"num_layers={num_layers} < pp={pp}: every stage needs a layer")
        base, extra = divmod(num_layers, pp)
        layers_per_stage = [base + (1 if i < extra else 0) for i in range(pp)]
    counts = list(layers_per_stage)
    if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"layers_per_stage={counts} must have pp={pp} positive entries summing "
                         f"to num_layers={num_layers}")
    start = sum(counts[:stage])
    return start, start + counts[stage]
