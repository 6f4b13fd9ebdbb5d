"""Paper experiments as runnable grids of ``largebatch train`` runs (``largebatch reproduce``)."""
