#!/usr/bin/env bash
# Compile-only checks of the CUDA code in csrc/ (nothing can run it on a machine without a GPU):
#  1. every .cu file with nvcc for sm_80, sm_86, sm_89 and sm_90 (CUDA headers only, no torch), with
#     ptxas's resource report: a table per kernel (registers, spill bytes, static shared memory), and
#     a failure on any spill or on static shared memory over 48 KB (dynamic shared memory is sized at
#     run time to the device's opt-in limit, see plan_experts_launch);
#  2. the torch glue (experts_cuda_glue.cpp) syntax-checked with the C++ compiler against the
#     installed torch's CUDA headers, when that torch ships them (a CPU wheel may lack a generated
#     header, which is stubbed here; the glue's real build happens on first use on a CUDA machine).
# Fails on any error or nvcc warning.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-.venv/bin/python}
if ! command -v "$NVCC" >/dev/null; then
    echo "check_cuda_sources: nvcc not found (set NVCC or put the CUDA toolkit on PATH)" >&2
    exit 1
fi
out=$(mktemp -d /tmp/smoe_fast_nvcc.XXXXXX)
trap 'rm -rf "$out"' EXIT
status=0
# Two compilations at a time (nvcc is single-threaded); the reports follow in source and arch order.
archs=(sm_80 sm_86 sm_89 sm_90)
for src in csrc/*.cu; do
    for arch in "${archs[@]}"; do
        echo "$src $arch"
    done
done | xargs -P "${NVCC_JOBS:-2}" -n 2 sh -c '
    nvcc=$0 out=$1 src=$2 arch=$3 base=$1/$(basename "$2" .cu).$3
    "$nvcc" -c -std=c++17 -O3 -arch="$arch" -Werror all-warnings -Xptxas -v -Icsrc "$src" -o "$base.o" 2>"$base.log"
    echo $? >"$base.rc"' "$NVCC" "$out" || true
printf '%-6s %-72s %5s %12s %11s\n' arch kernel regs spill_bytes static_smem
for src in csrc/*.cu; do
    for arch in "${archs[@]}"; do
        log="$out/$(basename "$src" .cu).$arch.log"
        if [[ "$(cat "$out/$(basename "$src" .cu).$arch.rc" 2>/dev/null)" == 0 ]]; then
            # ptxas -v: "Compiling entry function 'NAME'", then "N bytes spill stores, M bytes spill loads",
            # then "Used R registers, ... S bytes smem".
            if ! awk -v arch="$arch" '
                /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
                /spill stores/ { spill = $5 + $9 }
                /Used [0-9]+ registers/ {
                    regs = $5; smem = 0
                    if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH) + 0
                    cmd = "c++filt " name; cmd | getline pretty; close(cmd)
                    sub(/^void /, "", pretty); gsub(/\(anonymous namespace\)::|smoe_fast::/, "", pretty); sub(/\(.*$/, "", pretty)
                    printf "%-6s %-72s %5d %12d %11d\n", arch, pretty, regs, spill, smem
                    if (spill > 0 || smem > 49152) bad = 1
                }
                END { exit bad }' "$log"; then
                echo "FAIL $src ($arch): register spills or static shared memory over 48 KB" >&2
                status=1
            fi
        else
            cat "$log" >&2
            echo "FAIL $src ($arch)" >&2
            status=1
        fi
    done
done

torch_include=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
if [[ -n "$torch_include" && -f "$torch_include/c10/cuda/CUDAGuard.h" ]]; then
    cuda_home=${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}
    [[ -f "$cuda_home/include/cuda_runtime.h" ]] || cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")
    cuda_include=$cuda_home/include
    python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    mkdir -p "$out/stub/c10/cuda/impl"
    [[ -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]] || echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    for src in csrc/*_cuda_glue.cpp; do
        if "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Werror -I"$out/stub" -isystem "$torch_include" \
               -isystem "$torch_include/torch/csrc/api/include" -isystem "$cuda_include" -isystem "$python_include" \
               -Icsrc "$src"; then
            echo "ok   $src (syntax, torch CUDA headers)"
        else
            echo "FAIL $src (syntax, torch CUDA headers)" >&2
            status=1
        fi
    done
else
    echo "skip csrc/*_cuda_glue.cpp: this torch ships no CUDA headers"
fi
exit $status
