#!/usr/bin/env bash
# Runs the CUDA kernels and their torch glue on the CPU, for machines without a GPU: every CUDA
# thread is a std::thread, blocks run one after another, __syncthreads is a barrier and the warp
# intrinsics are emulated (include/emu_runtime.h; fake cuda_runtime.h and c10/cuda headers).
# transform.py rewrites csrc's .cu files and glue into host C++ (<<<...>>> launches, __shared__,
# extern shared memory, a CPU-registered copy of the ops as torch.ops.smoe_emu.*), and drive*.py
# compare those ops with smoe_fast.reference. Not part of .ci/run (about 20 minutes); it checks the
# kernels' logic, not GPU timing, memory ordering between blocks or real warp scheduling.
#   bash .ci/cuda_emulation/run.sh [--asan]
# EMU_MAX_SHARED (opt-in shared memory per block; default sm_86's 101376) and EMU_SMS (default 3)
# pick the launch plan: activations in shared memory or in the global workspace, chunks per block.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d /tmp/smoe_fast_emu.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 "$here/transform.py" "$root/csrc" "$work/gen"
flags=()
preload=""
if [[ "${1:-}" == "--asan" ]]; then
    flags=(-fsanitize=address -fno-omit-frame-pointer)
    preload=$(gcc -print-file-name=libasan.so)
fi
"$PYTHON" "$here/build.py" "$work/gen" "$work/build" "${flags[@]}"
export SMOE_FAST_POISON_OUTPUTS=1 EMU_LIB="$work/build" ASAN_OPTIONS=detect_leaks=0
for config in "101376 3" "232448 1" "166912 132"; do
    read -r shared sms <<<"$config"
    echo "== EMU_MAX_SHARED=$shared EMU_SMS=$sms"
    EMU_MAX_SHARED=$shared EMU_SMS=$sms LD_PRELOAD="$preload" "$PYTHON" "$here/drive.py" all | tee "$work/log"
    grep -q "FAILURES: \[\]" "$work/log"
    EMU_MAX_SHARED=$shared EMU_SMS=$sms LD_PRELOAD="$preload" "$PYTHON" "$here/drive_edges.py"
done
