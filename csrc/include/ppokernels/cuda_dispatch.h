// Torch-side glue for the CUDA launchers: maps ATen dtypes to the CUDA storage types, and brings
// in what every glue section needs (dispatch macros, the op registry, the current stream).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

namespace ppokernels {
namespace cuda {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

// Typed raw pointer of a tensor, in the CUDA storage type of ATen's scalar_t.
template <typename scalar_t> auto* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Kernels with one block per row launch `rows` blocks along grid.x (at most 2^31 - 1).
inline void check_grid_rows(const char* op, int64_t rows) {
  TORCH_CHECK(rows < (int64_t(1) << 31), op, ": too many rows for one launch");
}

}  // namespace cuda
}  // namespace ppokernels
