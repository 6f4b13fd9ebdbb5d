"""Runnable experiments, one module per ``largebatch`` sub-command.

- ``demo`` (``largebatch demo``): every optimizer trains the same BN-MLP on offline data through
  the training harness; prints a results table and writes the plots.
- ``explosion`` (``largebatch explosion``): gradient explosion of normalized networks at
  initialization (seed 003), built on the theory and measurements of ``largebatch.analysis``.
- ``tvlars_table1`` (``largebatch reproduce-tvlars-table1``): the classification grid of TVLARS's
  Table 1 as ``largebatch train`` runs: list, run or resume the missing ones, tabulate the results.
"""
