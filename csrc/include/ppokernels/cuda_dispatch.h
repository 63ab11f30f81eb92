// Torch-side glue for the CUDA launchers, through the LibTorch stable ABI (stable.h): maps torch's
// scalar types to the CUDA storage types, and gives every glue section the device guard, the
// current stream and the error check.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // the current stream (declared with USE_CUDA)
#include <torch/csrc/stable/accelerator.h>

#include "ppokernels/stable.h"

#ifndef USE_CUDA
#error "the CUDA glue needs -DUSE_CUDA (setup.py sets it for the _C_cuda module)"
#endif

// Throws (a Python RuntimeError) with CUDA's message when a launch or a runtime call fails.
#define PPK_CUDA_CHECK(expr)                                                           \
  do {                                                                                 \
    const cudaError_t ppk_err = (expr);                                                \
    if (ppk_err != cudaSuccess) ::ppokernels::fail("CUDA error: ", cudaGetErrorString(ppk_err)); \
  } while (0)

namespace ppokernels {
namespace cuda {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<Half> { using type = __half; };
template <> struct CudaType<BFloat16> { using type = __nv_bfloat16; };

// Typed raw pointer of a tensor, in the CUDA storage type of torch's scalar_t.
template <typename scalar_t> auto* ptr(const Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

// Makes the device of `t` current for the lifetime of the guard (torch's DeviceGuard through the
// stable ABI), so that allocations and the current stream are that device's.
class Guard {
 public:
  explicit Guard(const Tensor& t) : guard_(t.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// torch's current stream on the current device (the C shim: the stable ABI's only way to it).
inline cudaStream_t stream() {
  int device = 0;
  PPK_CUDA_CHECK(cudaGetDevice(&device));
  void* s = nullptr;
  PPK_SHIM_CHECK(aoti_torch_get_current_cuda_stream(device, &s));
  return static_cast<cudaStream_t>(s);
}

// Kernels with one block per row launch `rows` blocks along grid.x (at most 2^31 - 1).
inline void check_grid_rows(const char* op, int64_t rows) {
  PPK_CHECK(rows < (int64_t(1) << 31), op, ": too many rows for one launch");
}

}  // namespace cuda
}  // namespace ppokernels
