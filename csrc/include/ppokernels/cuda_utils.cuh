// Helpers shared by the CUDA kernels. Kernels and raw-pointer launchers need only the CUDA
// toolkit, so `nvcc -DPPK_KERNELS_ONLY -c csrc/cuda/<stem>.cu` compiles them without torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ppokernels/common.h"

namespace ppokernels {
namespace cuda {

// Accumulation type of a storage type: fp32 for half types and fp32, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename A, typename T> __device__ __forceinline__ A load_as(const T* p, int64_t i) {
  return static_cast<A>(p[i]);
}
template <typename A> __device__ __forceinline__ A load_as(const __nv_bfloat16* p, int64_t i) {
  return static_cast<A>(__bfloat162float(p[i]));
}
template <typename A> __device__ __forceinline__ A load_as(const __half* p, int64_t i) {
  return static_cast<A>(__half2float(p[i]));
}

template <typename T, typename A> __device__ __forceinline__ void store_as(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}
template <typename A> __device__ __forceinline__ void store_as(__nv_bfloat16* p, int64_t i, A v) {
  p[i] = __float2bfloat16(static_cast<float>(v));
}
template <typename A> __device__ __forceinline__ void store_as(__half* p, int64_t i, A v) {
  p[i] = __float2half(static_cast<float>(v));
}

// Grid for a grid-stride loop over n elements.
inline unsigned elementwise_blocks(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace cuda
}  // namespace ppokernels
