"""Command lines of the sub-commands whose implementation modules import torch at module level.

Each module defines ``add_arguments(parser)`` (torch-free, so that ``largebatch --help`` and the
sub-command's ``--help`` answer at once) and ``run(args)``, which imports the implementation.
The other sub-commands keep their command line beside their code (``largebatch/cli.py`` lists
them all).
"""
