"""Evaluate CheapNet on a DAGM folder: params, GFLOPs, mIoU, IoU per class, mAcc, pixel accuracy.

    python evaluate.py --checkpoint ../shared/torch-checkpoints/CheapNet_G32.pkl \
        --data ../shared/dagm-samples/Class6/Train --json out/g32.json
    python evaluate.py --jit-bench

Flags: ``python evaluate.py --help``; the code is `cheapnet_jax.cli.evaluate` (also installed
as ``cheapnet-evaluate``).
"""

import sys

from cheapnet_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
