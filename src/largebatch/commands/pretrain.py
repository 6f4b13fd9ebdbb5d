"""``largebatch pretrain``: Barlow Twins pre-training (``largebatch.train.pretrain``); flags are
generated from :class:`~largebatch.train.config.PretrainConfig`, as ``train``'s are."""

from __future__ import annotations

import argparse

from largebatch.train.cli import add_arguments as add_config_arguments
from largebatch.train.cli import execute
from largebatch.train.config import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from largebatch.train.pretrain import pretrain

    return execute(args, "pretrain", PretrainConfig, pretrain)
