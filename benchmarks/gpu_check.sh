#!/usr/bin/env bash
# The one prepared GPU check (issue #13), for a session that is lent a GPU machine:
# prepare here with benchmarks/gpu_prepare.sh, then run this THERE through the device
# tool (carry [".whl", ".gpudata"], timeout_s 540). Under 8 minutes. It writes to $OUT
# (the device tool's folder; benchmarks/ elsewhere):
#   gpu_check.json  GPU, versions, test counts, the run's device, client devices, s/round
#   pytest.log      the GPU tests and the device/codec tests
#   fv_mode2_*.csv/json  a 300-round signSGD-FV batch-mode-2 run on the GPU (rounds, summary)
# Copy gpu_check.json to benchmarks/gpu_check-<date>.json and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 MPLCONFIGDIR=/tmp/mpl
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_device.py tests/test_math.py \
  > "$out/pytest.log" 2>&1
pytest_rc=$?

rounds=${GPU_CHECK_ROUNDS:-300}  # fewer only to try the script on a CPU
run="/tmp/fv_mode2"
rm -rf "$run"
timeout 300 python3 -m fedsim.cli run experiments/fv_mnist.toml --set batch-mode=2 --set num-server-rounds="$rounds" \
  --set eval-every=100 --set data-dir="'.gpudata/mnist'" --results-dir "$run" > "$out/fv_mode2.log" 2>&1
run_rc=$?
cp "$run/rounds.csv" "$out/fv_mode2_rounds.csv" 2>/dev/null
cp "$run/summary.json" "$out/fv_mode2_summary.json" 2>/dev/null

python3 - "$out" "$pytest_rc" "$run_rc" <<'PY'
import csv, json, sys, pathlib
import torch
out, pytest_rc, run_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
report = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "pytest_exit_code": pytest_rc, "run_exit_code": run_rc,
    "pytest_tail": (out / "pytest.log").read_text(errors="replace").strip().splitlines()[-1:],
}
summary = out / "fv_mode2_summary.json"
if summary.exists():
    s = json.loads(summary.read_text())
    rows = list(csv.DictReader(open(out / "fv_mode2_rounds.csv")))
    sec = {int(r["round"]): float(r["seconds"]) for r in rows}
    report.update(
        device=s.get("device"), client_devices=s.get("client_devices"), final_test_accuracy=s.get("final_test_accuracy"),
        # rounds 101-200 and 201-300, each with one evaluation (eval-every 100): as the CPU figures in README "Speed"
        s_per_round_101_300=(sec[300] - sec[100]) / 200 if 300 in sec and 100 in sec else None,
    )
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PY
