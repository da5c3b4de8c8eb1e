#!/usr/bin/env bash
# GPU first light (issue 18): one device command of at most ~9 minutes, results written as it goes.
#
# The device call (the `run` tool), from the repository root, with the commit written in by hand:
#
#     command:   LVRPO_COMMIT=<output of `git rev-parse HEAD` here> bash benchmarks/gpu_session.sh
#     carry:     [".whl"]
#     timeout_s: 600        (the script's own budget, LVRPO_BUDGET_S, is 540 s; the rest is slack)
#
# .whl/ must hold the pinned peers, fetched on the development machine, from the repository root:
#
#     echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
#
# (both are pure Python; at run time they need torch, triton, packaging and transformers, which the
# GPU machine has). Without them a GPU run refuses to start: it could not judge the Liger target.
#
# What it does, in order (benchmarks/first_light.py has the details): installs the carried wheels
# (--target /tmp/site, on PYTHONPATH) and the project (editable, no deps, no index); records the
# device, versions and commit; measures torch.mm's rate at the LM head's layout; the headline fused
# GRPO loss (ours, eager, Liger; no padding, then padded); the log-prob rows; the compiled kernel
# tests of the core ops; torch.compile of the reference if time is left. Each stage checks the time
# left before it starts. At most 8 files land in $OUT:
#     00-device.json 01-ceiling.jsonl 02-headline.jsonl 03-logprobs.jsonl 04-tests.json
#     05-compiled.jsonl report.md logs.tar.gz
# Commit them under benchmarks/results/ named with the date and the GPU.
#
# CPU dry run (tiny shapes, Triton interpreted, the same stages and files; benchmarks/test_first_light.py
# runs it in CI):   LVRPO_FIRST_LIGHT=dry OUT=/tmp/fl bash benchmarks/gpu_session.sh
# Environment: LVRPO_FIRST_LIGHT (gpu | dry), LVRPO_BUDGET_S (540), OUT (/tmp/lvrpo_out), LVRPO_COMMIT,
# LVRPO_WHEELS (.whl), PYTHON (python3). Exit: 0 ran (the results say what passed), 1 the project did
# not install, 2 a usage error or no CUDA device in a GPU run, 3 refused for want of the wheels.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -gt 0 ]; then
    echo "usage: [LVRPO_FIRST_LIGHT=gpu|dry] bash benchmarks/gpu_session.sh  (no arguments: one command runs every stage)" >&2
    exit 2
fi
MODE="${LVRPO_FIRST_LIGHT:-gpu}"
case "$MODE" in
gpu | dry) ;;
*) echo "LVRPO_FIRST_LIGHT must be gpu or dry, got '$MODE'" >&2; exit 2 ;;
esac
BUDGET="${LVRPO_BUDGET_S:-540}"
STARTED=$(date +%s)
PYTHON="${PYTHON:-python3}"
WHEELS="${LVRPO_WHEELS:-.whl}"
OUT="${OUT:-/tmp/lvrpo_out}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
# 15 s of the budget stay for the report and the log bundle after the last stage.
export OUT LVRPO_FIRST_LIGHT="$MODE" LVRPO_STARTED="$STARTED" LVRPO_DEADLINE=$((STARTED + BUDGET - 15)) \
    LVRPO_LOGS="$LOGS" PYTHONUNBUFFERED=1

PINNED=(liger_kernel-0.8.5 cut_cross_entropy-25.1.1)
missing=()
for wheel in "${PINNED[@]}"; do
    compgen -G "$WHEELS/$wheel-*.whl" >/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ] && [ "$MODE" = gpu ]; then
    cat >&2 <<EOF
gpu_session.sh: refusing to start a GPU run: $WHEELS/ lacks ${missing[*]}, so the Liger and CCE
targets could not be judged. On the development machine, from the repository root:
    echo /.whl/ >> "\$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
then call the device again with carry [".whl"].
EOF
    exit 3
fi

if [ "$MODE" = gpu ]; then
    unset TRITON_INTERPRET
    SITE=/tmp/site
else
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    SITE="$(mktemp -d)"
fi

install=""
if [ ${#missing[@]} -eq 0 ]; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$LOGS/install.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        install="wheels $(cd "$WHEELS" && echo *.whl) -> $SITE;"
    else
        install="wheels FAILED to install (install.log);"
    fi
else
    install="no wheels in $WHEELS/ (dry run: the peers as installed here);"
fi
if [ "$MODE" = gpu ]; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOGS/install.log" 2>&1; then
        install="$install project installed (editable)"
    elif "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . \
        >>"$LOGS/install.log" 2>&1; then  # a read-only environment: a plain install beside the wheels
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        install="$install project installed into $SITE (the editable install failed: install.log)"
    else
        cat "$LOGS/install.log" >&2
        echo "gpu_session.sh: the project did not install; nothing can run" >&2
        tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
        exit 1
    fi
else
    install="$install dry run: the project as installed here"
fi
export LVRPO_INSTALL="$install ($(($(date +%s) - STARTED)) s)"
echo "[install] $LVRPO_INSTALL"

# The stages, in one process; a process that ends early (a broken CUDA context, a crash) is started
# again and resumes after the last row it finished, while time is left. Exit 2: nothing to retry.
rc=0
for attempt in 1 2 3; do
    left=$((LVRPO_DEADLINE - $(date +%s)))
    [ "$left" -gt 5 ] || break
    timeout -k 10 "$left" "$PYTHON" benchmarks/first_light.py run 2>&1 | tee -a "$LOGS/first_light.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ] && break
    echo "[gpu_session] first_light.py exited with $rc (attempt $attempt)" | tee -a "$LOGS/first_light.log"
done
"$PYTHON" benchmarks/first_light.py report 2>&1 | tee -a "$LOGS/first_light.log"
echo "[gpu_session] done in $(($(date +%s) - STARTED)) s; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/report.md"
[ "$rc" -eq 2 ] && exit 2  # the stages could not run here (no CUDA device)
exit 0
