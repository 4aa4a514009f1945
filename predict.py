"""Find defects in new images: per-image verdicts and defects as JSON/CSV, plus overlays.

    python predict.py --checkpoint runs/demo images/ more/*.png --out out/predictions

Flags: ``python predict.py --help``; the code is `cheapnet_jax.cli.predict` (also installed as
``cheapnet-predict``).
"""

import sys

from cheapnet_jax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
