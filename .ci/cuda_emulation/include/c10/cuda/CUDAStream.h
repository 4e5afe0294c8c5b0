#pragma once
#include "emu_runtime.h"
namespace c10::cuda { struct CUDAStream { operator cudaStream_t() const { return nullptr; } }; inline CUDAStream getCurrentCUDAStream() { return {}; } }
