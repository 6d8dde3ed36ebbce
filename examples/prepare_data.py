"""`megatron-ext-prepare-data` from a checkout: the command lives in :mod:`megatron_ext.cli.prepare_data` (its docstring
and ``--help`` list the usage; installed, the same command is the console script)."""
from megatron_ext.cli.prepare_data import main

if __name__ == "__main__":
    raise SystemExit(main())
