#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA GPU: the whole worker-side test suite (every test
# runs on the CPU and, where it takes a device, on CUDA too: the bf16 autocast tests on the real GPU
# beside the CPU emulation of it), then the GPU benchmarks (random weights: throughput only, never
# label quality). Each step's output goes to DIR/<step>.txt (default ./gpu-results); a failing step is
# reported and the next one still runs.
#
#   bench/gpu_checks.sh [DIR]    # PYTHON=... the worker interpreter (default python3);
#                                # PYTHON_SAM3=... the worker-sam3 one, to run the SAM 3 suite too
#
# The interpreters need the worker extras: pip install -e ".[worker,worker-test]" (and
# ".[worker-sam3,worker-test]" in another environment), the environments `pseudolabel workers install`
# builds. Longest first to go if time is short: the --compile chain run (one compilation per padded
# batch shape before its timed runs).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run it, keep its output, note a failure
  local name="$1"
  shift
  echo "== $name: $*"
  local started=$SECONDS
  if "$@" >"$out/$name.txt" 2>&1; then
    echo "   ok in $((SECONDS - started)) s"
  else
    echo "   FAILED (exit $?) in $((SECONDS - started)) s; tail of $out/$name.txt:"
    tail -n 15 "$out/$name.txt" | sed 's/^/     /'
    failed+=("$name")
  fi
}

step gpu nvidia-smi
step worker-tests "$python" -m pytest -c tests/worker/pytest.ini tests/worker -q
if [[ -n "${PYTHON_SAM3:-}" ]]; then
  step sam3-tests "$PYTHON_SAM3" -m pytest -c tests/worker_sam3/pytest.ini tests/worker_sam3 -q
else
  echo "== sam3-tests: not run (set PYTHON_SAM3 to the worker-sam3 interpreter)"
fi
step host-overhead "$python" bench/gpu_host_overhead.py --device cuda --images 4
step transformer-syncs "$python" bench/gpu_host_overhead.py --device cuda --stages transformer --batch-size 8
step jpeg-decode "$python" bench/jpeg_decode.py --device cuda
for batch in 1 4 8 16; do
  step "chain-batch-$batch" "$python" bench/gpu_chain.py --batch-size "$batch"
done
step chain-decode-on-device "$python" bench/gpu_chain.py --decode-on-device
step chain-compile "$python" bench/gpu_chain.py --compile

if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed; outputs in $out/"
