#!/usr/bin/env bash
# Everything that needs a GPU, in one go, on one CUDA GPU: the kernel and rollout tests (their GPU-only
# cases run instead of skipping, and the rest run on the GPU too), then both benchmarks. Each part has
# its own time limit, so a part that hangs or runs long does not cost the others.
#
#   bash bench/gpu_check.sh [DIR]     # results in DIR (default runs/gpu_check)
#
# DIR/env.txt (card, versions), DIR/tests.txt (pytest output), DIR/kernels.jsonl, DIR/rollout.jsonl
# (the benchmarks' JSON lines); *.err beside them. Limits in seconds: TESTS_S, KERNELS_S, ROLLOUT_S.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-runs/gpu_check}
mkdir -p "$dir"
python -c "import torch, triton, transformers; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)" > "$dir/env.txt" || exit 1
cat "$dir/env.txt"
status=0
part() {  # part NAME LIMIT COMMAND...: run with a time limit, say how it ended
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "[$name] exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$dir/env.txt"
    [ "$rc" -eq 0 ] || status=1
}
part tests "${TESTS_S:-240}" python -m pytest -q -rs tests/test_kernels.py tests/test_rollout_fast.py \
    > "$dir/tests.txt" 2>&1
tail -3 "$dir/tests.txt"
part kernels "${KERNELS_S:-300}" python bench/kernels_gpu.py > "$dir/kernels.jsonl" 2> "$dir/kernels.err"
part rollout "${ROLLOUT_S:-300}" python bench/rollout_gpu.py > "$dir/rollout.jsonl" 2> "$dir/rollout.err"
exit $status
