#!/usr/bin/env bash
# Compile-only checks of the CUDA code in csrc/ (nothing can run it on a machine without a GPU):
#  1. every .cu file with nvcc for sm_80 and sm_90 (they include CUDA headers only, no torch);
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
for src in csrc/*.cu; do
    for arch in sm_80 sm_90; do
        if "$NVCC" -c -std=c++17 -O3 -arch="$arch" -Werror all-warnings -Icsrc "$src" -o "$out/$(basename "$src" .cu).$arch.o"; then
            echo "ok   $src ($arch)"
        else
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
