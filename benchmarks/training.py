"""Training throughput: images/s of the pmap train step on 1 and N simulated CPU devices.

    .venv/bin/python benchmarks/training.py [--devices 1,8] [--features 2] [--image-size 512]

Each device count runs in its own process (the host device count is fixed when JAX starts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, jax, numpy as np, optax
from cheapnet_jax import CheapNet
from cheapnet_jax.bench import time_call
from cheapnet_jax.data import shard_batch
from cheapnet_jax.training import AXIS, create_state, parallel_train_step
devices, features, size, batch, runs = (int(v) for v in sys.argv[1:6])
model = CheapNet(features, bn_axis_name=AXIS)
optimizer = optax.adam(0.01)
state = create_state(model, optimizer, jax.random.key(0))
step = parallel_train_step(model, lambda: optimizer, jax.devices()[:devices])
rng = np.random.default_rng(0)
x = shard_batch(rng.standard_normal((batch, size, size, 1)).astype(np.float32), devices)
y = shard_batch(rng.random((batch, size, size, 1)) < 0.05, devices)
timing = time_call(lambda: step(state, x, y)[1]["loss"], warmup=2, runs=runs)
print(json.dumps({"devices": devices, "G": features, "image": size, "global batch": batch,
                  "img/s": batch / timing.median_s,
                  "img/s per device": batch / timing.median_s / devices,
                  "ms/step": 1e3 * timing.median_s}))
"""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,8")
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", default="out/training.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from cheapnet_jax.bench import format_table, write_json

    rows = []
    for devices in (int(d) for d in args.devices.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        command = [
            sys.executable,
            "-c",
            WORKER,
            str(devices),
            str(args.features),
            str(args.image_size),
            str(args.batch_size),
            str(args.runs),
        ]
        output = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(format_table(rows, list(rows[0])))
    write_json(args.json, rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
