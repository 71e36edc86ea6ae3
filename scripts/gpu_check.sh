#!/usr/bin/env bash
# The CUDA checks on one NVIDIA GPU: every test marked `cuda` (pytest -m cuda), then a short benchmark
# on a 1B-shaped model (benchmarks/gpu_check.py), ending with one table of both. Under 8 minutes on
# one GPU once .venv exists. Exits non-zero if a test failed or no test ran.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]     # default runs/gpu_check: tests.xml, bench.json, table.md, logs
#
# torch: a CUDA build already in .venv is kept. Without a .venv, a CUDA torch installed for the
# system's python3 is used through a venv made with --system-site-packages. Otherwise a CUDA build is
# installed into .venv from $QLORA_KIT_TORCH_INDEX (default: PyTorch's CUDA 12.8 wheels). Setting
# QLORA_KIT_TORCH yourself skips all of this and goes to scripts/setup_env.sh as usual (empty: keep
# the torch .venv has).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-runs/gpu_check}"
TORCH_INDEX="${QLORA_KIT_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
TEST_LIMIT_S=270    # tests, then the benchmark: 270 + 200 s leaves the setup a little under 3 minutes
BENCH_LIMIT_S=200
started=$(date +%s)

say() { echo "gpu_check: $*"; }
die() { echo "gpu_check: $*" >&2; exit 2; }

cuda_torch() {  # does this python have a torch that sees a GPU?
    "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null
}

# Before touching any install: without a GPU there is nothing to check (and no reason to swap torch).
gpus="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
[ -n "$gpus" ] || die "no NVIDIA GPU found (nvidia-smi lists none). Run this on a GPU machine; elsewhere" \
    "the CUDA tests are collected and skipped (bash scripts/test.sh -m cuda)"
echo "$gpus" | sed 's/^/gpu_check: GPU /'

if [ -z "${QLORA_KIT_TORCH+set}" ]; then
    if [ -x .venv/bin/python ] && cuda_torch .venv/bin/python; then
        say "keeping the CUDA torch in .venv"
    elif [ ! -x .venv/bin/python ] && command -v python3 >/dev/null 2>&1 && cuda_torch python3; then
        say "using the system's CUDA torch through .venv (--system-site-packages)"
        python3 -m venv --system-site-packages .venv || die "could not create .venv"
    else
        [ -x .venv/bin/python ] || python3 -m venv .venv || die "could not create .venv"
        say "installing a CUDA build of torch into .venv from $TORCH_INDEX"
        .venv/bin/python -m pip uninstall -q -y torch >/dev/null 2>&1
        .venv/bin/python -m pip install -q --index-url "$TORCH_INDEX" torch \
            || die "could not install a CUDA torch from $TORCH_INDEX: install one into .venv yourself" \
                   "(.venv/bin/python -m pip install torch --index-url <your CUDA wheel index>) and rerun"
    fi
    export QLORA_KIT_TORCH=""   # setup_env.sh: keep this torch
fi
bash scripts/setup_env.sh || die "scripts/setup_env.sh failed (see above)"
cuda_torch .venv/bin/python || die "the torch in .venv sees no CUDA GPU: $(.venv/bin/python -c \
    'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1 | tail -1)"
say "setup took $(( $(date +%s) - started )) s"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"
rm -f "$RESULTS/tests.xml"

say "pytest -m cuda"
timeout "$TEST_LIMIT_S" .venv/bin/python -m pytest -m cuda -v -rfEs -p no:cacheprovider \
    -o junit_family=xunit1 --junitxml="$RESULTS/tests.xml"
tests_rc=$?
[ "$tests_rc" -eq 124 ] && say "the tests were stopped after $TEST_LIMIT_S s"

say "benchmark (log files in $RESULTS/bench-work)"
timeout "$BENCH_LIMIT_S" .venv/bin/python benchmarks/gpu_check.py --out "$RESULTS/bench.json" \
    --tests "$RESULTS/tests.xml" --table "$RESULTS/table.md" > "$RESULTS/bench.out"
bench_rc=$?
echo
if [ "$bench_rc" -eq 0 ] || [ -s "$RESULTS/bench.out" ]; then
    cat "$RESULTS/bench.out"
else
    [ "$bench_rc" -eq 124 ] && say "the benchmark was stopped after $BENCH_LIMIT_S s; the tests alone:"
    .venv/bin/python benchmarks/gpu_check.py --no-bench --tests "$RESULTS/tests.xml" | tee "$RESULTS/table.md"
fi

passed=0
if [ -f "$RESULTS/tests.xml" ]; then
    passed=$(.venv/bin/python -c 'import sys, xml.etree.ElementTree as E
cases = list(E.parse(sys.argv[1]).getroot().iter("testcase"))
print(sum(1 for c in cases if not any(c.find(k) is not None for k in ("failure", "error", "skipped"))))' \
        "$RESULTS/tests.xml")
fi
passed="${passed:-0}"
echo
say "tests: pytest exit $tests_rc, $passed passed; benchmark exit $bench_rc; $(( $(date +%s) - started )) s in all"
if [ "$tests_rc" -ne 0 ] || [ "$passed" -eq 0 ]; then
    exit 1
fi
[ "$bench_rc" -eq 0 ] || exit 1
