#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a lent GPU machine whose image lacks
# them, fetched here (that machine reaches no package index): Ray, for the CUDA tests of
# Ray actors (a GPU each, NCCL), less its Java jars and dashboard web client (34 MB that
# a device call cannot carry and nothing here uses), and the jsonschema packages Ray
# imports. For the machine's Python (3.12 unless given) on x86-64, into .carry/whl
# (ignored by git); name .carry in the device call's carry.
#
#     bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
out=.carry/whl
rm -rf "$out"
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$out" "ray>=2.40,<3" jsonschema jsonschema-specifications referencing rpds-py
python3 - "$out"/ray-*.whl <<'EOF'
import os
import sys
import zipfile

path = sys.argv[1]
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".part", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not item.filename.startswith(("ray/jars/", "ray/dashboard/client/")):
            dst.writestr(item, src.read(item.filename))
os.replace(path + ".part", path)
EOF
ls -l "$out"
du -sh "$out"
