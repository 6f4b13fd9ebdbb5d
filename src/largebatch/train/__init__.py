"""Training harness behind ``largebatch train`` / ``plot``: config, datasets, models, loop, DDP.

``largebatch.train.loop.train(config)`` is the programmatic entry point; see docs/training.md.
Modules: ``config`` (TrainConfig), ``data``, ``models``, ``factory`` (optimizer, schedule, step
arithmetic), ``loop`` (the training loop), ``evaluate``, ``diagnostics`` (per-layer statistics),
``rundir`` (tables, checkpoints, failure record), ``distributed`` (DDP), ``cli``, ``plot``.
"""
