#!/usr/bin/env bash
# The GPU figures in one command: seconds and peak memory of every stage of one face (and of six
# faces as one batch) at
# 512 px with SD1.5's full-size UNet (random weights: timing does not depend on them), for
# the default anonymize and hide presets, in fp32 and in bf16. Writes the "GPU" block of
# BENCHMARKS.md, naming the card. Meant to finish in under 8 minutes on one H100-class GPU
# (the models are generated once, into .cache/, before the clock that matters starts).
#
#   benchmarks/gpu.sh          # on a machine with CUDA
#   benchmarks/gpu.sh --dry    # the same four runs, tiny, on the CPU: checks the script, measures
#                              # nothing; exits non-zero if a run fails. A face filling 64 px, a 2-step
#                              # grid, 1 candidate, 1 MSI step, bf16 for the UNet only (bf16 convolutions
#                              # are very slow on CPUs); 2 min 5 s for all four on the shared 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup
if [[ "${1:-}" == "--dry" ]]; then
    exec .venv/bin/python benchmarks/run_all.py --size gpu --only pipeline_stages --dry
fi
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU (try --dry)')"
.venv/bin/python -c "import sys; sys.path.insert(0, '.'); from diffpriv_testmodels.cache import benchmark_models; benchmark_models('sd15')"
.venv/bin/python benchmarks/run_all.py --size gpu --only pipeline_stages --timeout 300
