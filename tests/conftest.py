import os

# Single-threaded math keeps multi-rank CPU tests deterministic and avoids oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
