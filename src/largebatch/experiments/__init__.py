"""Runnable experiments, one module per ``largebatch`` sub-command.

- ``demo`` (``largebatch demo``): every optimizer trains the same BN-MLP on offline data through
  the training harness; prints a results table and writes the plots.
- ``explosion`` (``largebatch explosion``): gradient explosion of normalized networks at
  initialization (LALC paper), built on the theory and measurements of ``largebatch.analysis``.
- ``barlow_twins_mini`` (``largebatch barlow-twins-mini``): Barlow Twins on CPU with LARS, LAMB, TVLARS.
- ``reproduce`` (``largebatch reproduce``): every table and figure of the papers at paper, mini or smoke
  scale, on the engine of ``engine.py``; the artifacts are declared in ``artifacts/`` (one module per
  paper, plus ``fair.py``). ``tvlars_table1`` is the ``reproduce-tvlars-table1`` alias.
"""
