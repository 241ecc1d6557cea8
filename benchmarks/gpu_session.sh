#!/usr/bin/env bash
# GPU validation on a lent machine whose image has torch and triton but no network.
#
# Here (with network):   make gpu-wheels        # liger-kernel and datasets as wheels in .whl/
# There, one call each (every call carries .whl; each stays inside a 10-minute limit):
#   bash benchmarks/gpu_session.sh tests                    # the suite, kernels compiled
#   bash benchmarks/gpu_session.sh demo                     # fastkd distill's demo, triton
#   bash benchmarks/gpu_session.sh bench vocab              # bench_kernels.py --only vocab
#   bash benchmarks/gpu_session.sh bench logits multi_teacher attention
# Logs and JSON go to $OUT (default benchmarks/results); plots come from the JSON afterwards
# (python benchmarks/plot_results.py FILE.json).
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
    >>"$out/gpu.txt"

stage=${1:?usage: gpu_session.sh tests | demo | bench SUITE...}
shift
case $stage in
tests)
    # test_packaging builds a wheel in an isolated build env, which needs PyPI; CI runs it.
    python3 -m pytest tests -q -ra --durations=15 --deselect tests/test_packaging.py \
        --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
    exit "${PIPESTATUS[0]}"
    ;;
demo)
    python3 -m fastkd.distill --output-dir /tmp/fastkd-demo 2>&1 | tee "$out/gpu-demo.log"
    exit "${PIPESTATUS[0]}"
    ;;
bench)
    device=$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
    only=()
    for suite in "$@"; do only+=(--only "$suite"); done
    python3 benchmarks/bench_kernels.py "${only[@]}" --no-plots \
        --out "$out/$device-$(date -u +%Y%m%d-%H%M%S)-${*// /-}.json" 2>&1 | tee "$out/bench.log"
    exit "${PIPESTATUS[0]}"
    ;;
*)
    echo "unknown stage $stage: expected tests, demo or bench" >&2
    exit 2
    ;;
esac
