"""What the command-line tools share: a user's mistake is one line on stderr, not a traceback.

    sys.exit(cli.run(main, sys.argv[1:]))

Bad data (`DataError`), a checkpoint that does not fit (`CheckpointError`), a diverged run
(`TrainingDivergedError`), a missing file and a bad setting (``ValueError``) print
``error: <message>`` (the message names the file or flag) and exit with status 1. Set
``CHEAPNET_TRACEBACK=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported only once an error is raised: train.py must configure JAX before importing it.
    from cheapnet_jax.torch_import import CheckpointError
    from cheapnet_jax.training import TrainingDivergedError

    return (CheckpointError, TrainingDivergedError, FileNotFoundError, ValueError)


def run(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """``main(argv)``'s exit status; 1, with the message on stderr, for a user error."""
    try:
        return main(argv)
    except _user_errors() as err:
        if os.environ.get("CHEAPNET_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
