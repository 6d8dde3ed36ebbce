"""`megatron-ext-convert` from a checkout: the command lives in :mod:`megatron_ext.cli.convert` (its docstring
and ``--help`` list the usage; installed, the same command is the console script)."""
from megatron_ext.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
