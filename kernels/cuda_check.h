// Checked CUDA and cuBLAS calls: a failure names the call, the file and the line, then aborts
// through ranktune's internal-error path (a failed CUDA call leaves the context unusable, so there
// is nothing to recover).
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "ranktune/error.h"

namespace ranktune::detail {

[[noreturn]] inline void cuda_fail(cudaError_t err, const char* call, const char* file, int line) {
  assert_fail(call, file, line,
              std::string("CUDA error ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

[[noreturn]] inline void cublas_fail(cublasStatus_t status, const char* call, const char* file,
                                     int line) {
  assert_fail(call, file, line, std::string("cuBLAS error: ") + cublasGetStatusString(status));
}

}  // namespace ranktune::detail

#define cudaCheck(call)                                                          \
  do {                                                                           \
    const cudaError_t cuda_check_err_ = (call);                                  \
    if (cuda_check_err_ != cudaSuccess)                                          \
      ::ranktune::detail::cuda_fail(cuda_check_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define cublasCheck(call)                                                               \
  do {                                                                                  \
    const cublasStatus_t cublas_check_status_ = (call);                                 \
    if (cublas_check_status_ != CUBLAS_STATUS_SUCCESS)                                  \
      ::ranktune::detail::cublas_fail(cublas_check_status_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: reports bad launch configurations at the launch site.
#define cudaCheckLaunch() cudaCheck(cudaGetLastError())
