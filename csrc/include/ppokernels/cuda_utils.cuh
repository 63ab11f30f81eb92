// Helpers shared by the CUDA kernels. Kernels and raw-pointer launchers need only the CUDA
// toolkit, so `nvcc -DPPK_KERNELS_ONLY -c csrc/cuda/<stem>.cu` compiles them without torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "ppokernels/common.h"

namespace ppokernels {
namespace cuda {

// Accumulation type of a storage type (common.h's acc_type).
template <typename T> using acc_t = acc_type<T>;

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

// ---------------------------------------------------------------- warp and block reductions
// Written once for every kernel (the shape of Dao-AILab/quack, quack/reduce.py: a warp reduction
// by shuffles, then one warp over the warp results), generic over the value type V and the
// combine op. The order is fixed by the block shape alone, so a row reduces to the same bits
// wherever it sits in the batch: deterministic, no atomics.

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// __shfl_down_sync (kUp = false) / __shfl_up_sync (kUp = true) of any trivially copyable V (a
// scalar, SoftmaxStats, an Affine map, a Sums<A, N>), moved 32 bits at a time: bit for bit what
// the scalar overloads do.
template <bool kUp, typename V>
__device__ __forceinline__ V shfl(const V& v, int delta) {
  static_assert(sizeof(V) % 4 == 0, "shuffled values are made of 32-bit words");
  unsigned w[sizeof(V) / 4];
  memcpy(w, &v, sizeof(V));
#pragma unroll
  for (int k = 0; k < int(sizeof(V) / 4); ++k) {
    w[k] = kUp ? __shfl_up_sync(kFullMask, w[k], delta) : __shfl_down_sync(kFullMask, w[k], delta);
  }
  V out;
  memcpy(&out, w, sizeof(V));
  return out;
}
template <typename V>
__device__ __forceinline__ V shfl_down(const V& v, int delta) { return shfl<false>(v, delta); }
template <typename V>
__device__ __forceinline__ V shfl_up(const V& v, int delta) { return shfl<true>(v, delta); }

// Tree reduction over the 32 lanes of a warp, lane i combining with lane i + 16, 8, 4, 2, 1;
// the result is in lane 0.
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = op(v, shfl_down(v, off));
  return v;
}

// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024): each warp reduces,
// then warp 0 reduces the warp results, padded with `identity`. The result is in thread 0.
// Every thread of the block must call it (it synchronises); calls may follow each other.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V identity) {
  __shared__ V warp_vals[kWarpSize];
  v = warp_reduce(v, op);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  if (warps == 1) return v;
  __syncthreads();  // a previous call has finished reading warp_vals
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_reduce(lane < warps ? warp_vals[lane] : identity, op);
  return v;
}

// N running sums reduced together (one shuffle tree for all of them).
template <typename A, int N>
struct Sums {
  A v[N];
};
struct SumsAdd {
  template <typename A, int N>
  __device__ __forceinline__ Sums<A, N> operator()(Sums<A, N> a, const Sums<A, N>& b) const {
#pragma unroll
    for (int k = 0; k < N; ++k) a.v[k] += b.v[k];
    return a;
  }
};

// v[k] summed over the block, for every k; the result is valid in thread 0.
template <typename A, int N>
__device__ __forceinline__ void block_sum(A (&v)[N]) {
  Sums<A, N> s, zero;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    s.v[k] = v[k];
    zero.v[k] = A(0);
  }
  s = block_reduce(s, SumsAdd{}, zero);
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = s.v[k];
}

// Explicit instantiation of a launcher for every storage type the torch glue dispatches to:
// PPK_INSTANTIATE_FOR_DTYPES(M) expands M(float) M(double) M(__half) M(__nv_bfloat16).
#define PPK_INSTANTIATE_FOR_DTYPES(M) M(float) M(double) M(__half) M(__nv_bfloat16)

}  // namespace cuda
}  // namespace ppokernels
