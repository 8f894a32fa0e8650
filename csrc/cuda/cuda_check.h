// Turns a cudaError_t from the torch-free launchers into a torch error (torch side only).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

// Variadic so template arguments with commas can be passed unparenthesised.
#define LF_CUDA_CHECK(...)                                                                   \
  do {                                                                                       \
    const cudaError_t lf_err = (__VA_ARGS__);                                                \
    TORCH_CHECK(lf_err == cudaSuccess, "lazyfast CUDA error: ", cudaGetErrorString(lf_err)); \
  } while (0)
