#!/usr/bin/env bash
# What a session with a lent GPU runs (issue 9), in the order of what matters most, each stage fitting
# one 10-minute device command. On the GPU machine (../shared/GPU.md), from the repository root:
#
#     bash benchmarks/gpu_session.sh tests      # the suite compiled on the GPU        (~5-8 min)
#     bash benchmarks/gpu_session.sh headline   # issues 3, 4, 9: N=8192 D=4096 V=151936 bf16, judged
#     bash benchmarks/gpu_session.sh trainer    # --device cuda, a short --check-every 1 run
#     bash benchmarks/gpu_session.sh bench      # the whole gpu set (long: split it with BENCH_K="...")
#
# Files land in $OUT (the device tool brings them back): junit XML and logs of the tests, the
# benchmark JSON and its report (.md, .png). Commit them under benchmarks/results/ named with the
# date and the GPU. Peers: carry `.whl` holding liger-kernel 0.8.5 and cut-cross-entropy 25.1.1
# (downloaded here with `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
# cut-cross-entropy==25.1.1`); without them those peers are skipped, with the reason.
set -uo pipefail
stage="${1:?usage: gpu_session.sh tests|headline|trainer|bench}"
OUT="${OUT:-/tmp/lvrpo_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 - <<'EOF' | tee "$OUT/device.txt"
import subprocess, torch, triton
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                              text=True).stdout.strip())
EOF

case "$stage" in
tests)
    # Kernel tests first (they are what the GPU is for), then the rest; -x stops at the first failure
    # so the log stays readable. pytest-xdist is in the image: compilation of the constexpr variants
    # is the slow part and runs in parallel.
    python3 -m pytest -q -n 8 -p no:cacheprovider --junitxml="$OUT/tests-kernels.xml" \
        tests/test_logprobs.py tests/test_linear_grpo_loss.py tests/test_grpo_loss.py tests/test_advantages.py \
        tests/test_property.py tests/test_modules.py tests/test_sm90_compile.py 2>&1 | tee "$OUT/tests-kernels.log" | tail -30
    python3 -m pytest -q -n 8 -p no:cacheprovider --junitxml="$OUT/tests-rest.xml" tests \
        --ignore tests/test_logprobs.py --ignore tests/test_linear_grpo_loss.py \
        --ignore tests/test_grpo_loss.py --ignore tests/test_advantages.py --ignore tests/test_property.py \
        --ignore tests/test_modules.py --ignore tests/test_sm90_compile.py 2>&1 | tee "$OUT/tests-rest.log" | tail -30
    ;;
headline)
    json="$OUT/$(date +%F)-gpu-headline.json"
    LVRPO_BENCH_SHAPES=gpu python3 -m pytest benchmarks/ --benchmark-only -p no:cacheprovider -ra \
        -k "N8192-D4096-V151936" --benchmark-json="$json" 2>&1 | tee "$OUT/headline.log" | grep -v "^test_\|^---\|^Name\|^$" | tail -60
    python3 benchmarks/report.py "$json"
    ;;
trainer)
    python3 -m lvrpo_fast.train --device cuda --output-dir /tmp/gpu_check --warmup-steps 20 --steps 5 \
        --check-every 1 --no-progress 2>&1 | tee "$OUT/trainer-check.log" | tail -20
    python3 -m lvrpo_fast.train --device cuda --output-dir /tmp/gpu_default --no-progress 2>&1 \
        | tee "$OUT/trainer-default.log" | tail -20
    cp /tmp/gpu_default/summary.json "$OUT/trainer-default-summary.json" 2>/dev/null || true
    ;;
bench)
    json="$OUT/$(date +%F)-gpu.json"
    LVRPO_BENCH_SHAPES=gpu python3 -m pytest benchmarks/ --benchmark-only -p no:cacheprovider -ra \
        ${BENCH_K:+-k "$BENCH_K"} --benchmark-json="$json" 2>&1 | tee "$OUT/bench.log" | grep -v "^test_\|^---\|^Name\|^$" | tail -80
    python3 benchmarks/report.py "$json"
    ;;
*)
    echo "unknown stage $stage (tests|headline|trainer|bench)" >&2
    exit 2
    ;;
esac
