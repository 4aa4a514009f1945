"""``python -m cheapnet_jax.serve``: the command line's entry (`cheapnet_jax.cli.serve`); the
library modules of this package never import it."""

import sys

from cheapnet_jax.cli.serve import main

sys.exit(main())
