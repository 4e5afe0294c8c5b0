#pragma once
#include <c10/util/Exception.h>
#include "emu_runtime.h"
#define C10_CUDA_CHECK(x) TORCH_CHECK((x) == cudaSuccess, "emulated CUDA call failed")
