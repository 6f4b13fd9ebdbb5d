"""Training harness behind ``largebatch train`` / ``plot``: config, datasets, models, loop, DDP.

``largebatch.train.loop.train(config)`` is the programmatic entry point; see docs/training.md.
"""
