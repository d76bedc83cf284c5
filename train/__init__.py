"""Pretraining script for LLaMA with SPAM or a baseline optimizer: ``python -m train --help``."""

from train.config import Config, ConfigError, parse_args
from train.loop import RunResult, run


def main(argv: list[str] | None = None) -> RunResult:
  """Parses the command line and runs; raises ConfigError on bad input."""
  return run(parse_args(argv))


__all__ = ["Config", "ConfigError", "RunResult", "main", "parse_args", "run"]
