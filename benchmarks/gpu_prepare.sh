#!/usr/bin/env bash
# Run HERE (the development machine) before benchmarks/gpu_check.sh runs on a lent GPU
# machine: that machine has PyTorch but not Flower and cannot reach a package registry,
# and ../shared/data does not travel with the working tree. This puts, in folders git
# ignores (.git/info/exclude), the wheels fedsim needs beyond that machine's image (.whl/,
# ~10 MB, Python 3.12) and the MNIST files (.gpudata/mnist, ~11 MB). Ray's wheel (74 MB)
# is over the device tool's 64 MiB transfer limit: the Flower-on-Ray rows cannot run there.
# Then call the device tool with carry [".whl", ".gpudata"] and the command
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.gpudata/; do grep -qxsF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .gpudata/mnist
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  flwr==1.41.0 flwr-datasets==0.6.1 "datasets>=4.0,<5" "dill<0.4.2" "multiprocess<0.70.20" "pycryptodome>=3.18,<4" \
  "cryptography>=50,<51" "iterators<0.0.3" tomli-w seaborn
cp ../shared/data/mnist/*.gz .gpudata/mnist/
du -sh .whl .gpudata
