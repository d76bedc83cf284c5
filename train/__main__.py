"""``python -m train [flags]``: with no flags, a few minutes of SPAM on the tiny model."""

import sys

from train.checkpoint import CheckpointError
from train.config import ConfigError


def _quiet_closed_event_loops() -> None:
  """Drops "Event loop is closed" noise that orbax's async I/O threads print after a failed read.

  Only that exact RuntimeError is filtered: every other unraisable exception is still printed.
  """
  default = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    default(unraisable)

  sys.unraisablehook = hook


def _main() -> int:
  from train import main
  _quiet_closed_event_loops()
  try:
    main(sys.argv[1:])
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume from the last checkpoint",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(_main())
