#!/usr/bin/env bash
# The prepared accelerator check of issue 14: one command on the GPU machine, at most 8 minutes.
#
#   bash benchmarks/device_check.sh            # writes out/device_check.json
#   bash benchmarks/device_check.sh --quick --runs 2 --json out/dry_run.json   # a CPU dry run
#
# Uses the machine's own Python (jax with its CUDA plugin, flax, optax, orbax, torch, scipy,
# numpy, Pillow, tqdm); installs nothing (the GPU machine has no internet) and runs the
# checkout in place. Writes one JSON and prints its tables; arguments go to device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
missing=$("$python" - <<'PY'
import importlib.util
names = ["jax", "flax", "optax", "orbax.checkpoint", "torch", "scipy", "numpy", "PIL", "tqdm"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "error: device_check needs these Python packages, absent here: $missing" >&2
    exit 1
fi
"$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$python" benchmarks/device_check.py "$@"
