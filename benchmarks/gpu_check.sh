#!/usr/bin/env bash
# Everything a GPU machine must show for the GPU path, in one command from the
# repository root: the CUDA tests (the Triton kernels on the device, greedy equality with
# transformers, KV pooled over instances on one GPU, the Triton norm/rotary/activation,
# decode steps from CUDA graphs, compiled or not), then benchmarks/gpu.py (copy
# bandwidth, the decode kernel's bandwidth, LAT, W1, a 128K-token prompt spread over 4
# instances against all-local), then the CUDA tests of Ray actors where Ray is there.
# Runs from the source tree under whatever python3 has torch, triton and transformers
# (no install); wheels in .carry/whl (benchmarks/gpu_wheels.sh: Ray for that image) are
# installed first. Logs and gpu.json go to LOGDIR, each written as it runs.
#
#     bash benchmarks/gpu_check.sh [LOGDIR]
set -uo pipefail
logs=${1:-/tmp/gpu-check}
mkdir -p "$logs"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".carry/whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site .carry/whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/gpu-check-site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$logs/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$logs/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_kernels.py tests/test_triton_elementwise.py 2>&1 | tee "$logs/pytest.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu.py --json "$logs/gpu.json" 2>&1 | tee "$logs/gpu.log"
bench=${PIPESTATUS[0]}
ray_tests=0
if python3 -c "import ray" 2>/dev/null; then
    python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_ray.py 2>&1 | tee "$logs/pytest-ray.log"
    ray_tests=${PIPESTATUS[0]}
else
    echo "ray is not installed: the CUDA tests of Ray actors did not run (bash benchmarks/gpu_wheels.sh here, then carry .carry)" | tee "$logs/pytest-ray.log"
fi
echo "pytest exit $tests, gpu.py exit $bench, Ray's CUDA tests exit $ray_tests"
exit $(( tests || bench || ray_tests ))
