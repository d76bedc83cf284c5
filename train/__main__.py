"""``python -m train [flags]``: with no flags, a few minutes of SPAM on the tiny model."""

import sys

from train.checkpoint import CheckpointError
from train.config import ConfigError


def _main() -> int:
  from train import main
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
