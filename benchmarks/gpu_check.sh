#!/usr/bin/env bash
# Everything a GPU machine must show for the GPU path, in one command from the
# repository root: the CUDA tests (the Triton kernels on the device, greedy equality with
# transformers, KV pooled over instances on one GPU, the Triton norm/rotary/activation; Ray's only where ray is installed),
# then benchmarks/gpu.py (copy bandwidth, the decode kernel's bandwidth, LAT, W1, a
# 128K-token prompt spread over 4 instances against all-local). Runs from the source
# tree under whatever python3 has torch, triton and transformers (no install); logs and
# gpu.json go to LOGDIR.
#
#     bash benchmarks/gpu_check.sh [LOGDIR]
set -uo pipefail
logs=${1:-/tmp/gpu-check}
mkdir -p "$logs"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$logs/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$logs/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_kernels.py tests/test_triton_elementwise.py 2>&1 | tee "$logs/pytest.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu.py --json "$logs/gpu.json" 2>&1 | tee "$logs/gpu.log"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, gpu.py exit $bench"
exit $(( tests || bench ))
