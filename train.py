"""Train CheapNet with the paper's recipe, data-parallel over N devices.

    python train.py --variant M --devices 8 --data synthetic --epochs 2 --workdir runs/m

Flags: ``python train.py --help``; the code is `cheapnet_jax.cli.train` (also installed as
``cheapnet-train``).
"""

import sys

from cheapnet_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
