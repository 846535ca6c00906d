// GPU tests skip, with the reason, where there is no usable CUDA device (any cudaGetDeviceCount
// failure counts as "no GPU": without a driver it reports cudaErrorInsufficientDriver).
#pragma once
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <string>

inline std::string gpu_unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaGetErrorString(err);
  }
  if (count == 0) return "cudaGetDeviceCount returned 0";
  return "";
}

#define SKIP_WITHOUT_GPU()                                                \
  do {                                                                    \
    const std::string why_ = gpu_unavailable_reason();                    \
    if (!why_.empty()) GTEST_SKIP() << "no CUDA GPU available: " << why_; \
  } while (0)

// Also skips where the machine has fewer than n GPUs (the multi-GPU tests).
#define SKIP_WITHOUT_GPUS(n)                                                                   \
  do {                                                                                         \
    SKIP_WITHOUT_GPU();                                                                        \
    int count_ = 0;                                                                            \
    (void)cudaGetDeviceCount(&count_);                                                         \
    if (count_ < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, this machine has " << count_; \
  } while (0)
