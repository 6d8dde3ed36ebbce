"""`megatron-ext-eval` from a checkout: the command lives in :mod:`megatron_ext.cli.eval` (its docstring
and ``--help`` list the usage; installed, the same command is the console script)."""
from megatron_ext.cli.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
