// Block reduction shared by the CUDA kernels of the advantages family (advantages.cu,
// advantages_group.cu). Plain CUDA: compiles without torch headers.
#pragma once
#include "ppokernels/cuda_utils.cuh"

namespace ppokernels {
namespace cuda {

constexpr int kAdvThreads = 256;  // threads per block of every advantages kernel

// Sum of v[k] over the block, for every k; the result is valid in thread 0. Fixed tree order.
template <typename A, int N>
__device__ __forceinline__ void adv_block_sum(A (&v)[N]) {
  __shared__ A smem[N][kAdvThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int off = 16; off > 0; off /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    if (lane == 0) smem[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A s = smem[k][0];
      for (int w = 1; w < kAdvThreads / 32; ++w) s += smem[k][w];
      v[k] = s;
    }
  }
  __syncthreads();  // smem may be reused by a following call
}

}  // namespace cuda
}  // namespace ppokernels
