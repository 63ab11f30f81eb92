// CUDA kernels of the logprobs family: per-token log-probs (and entropy) from logits, and the
// gradient with respect to the logits.
//
// One block per row. Forward: each thread folds 16-byte vectors of its columns into its own
// SoftmaxStats (token_logprobs.h, one rescale per vector), then a fixed-order block reduction
// (cuda_utils.cuh) gives the row's stats: deterministic, and independent of the batch. Backward: one pass,
// 16-byte loads and stores, the target column fixed up with -expm1(log p_y). fp32 math for
// fp32/bf16/fp16 logits (fp64 for fp64), int64 offsets, rows addressed through RowLayout so a
// strided slice such as logits[:, :-1] needs no copy. Out-of-range labels give NaN here (the
// Python wrapper checks them; a device-side assert would poison the context).
#include <cfloat>

#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/token_logprobs.h"

namespace ppokernels::cuda {
namespace {

// exp for the sums: the hardware ex2 (__expf, ~2 ulp near 0) for fp32, accurate for fp64.
struct FastExp {
  __device__ __forceinline__ float operator()(float x) const { return __expf(x); }
  __device__ __forceinline__ double operator()(double x) const { return ::exp(x); }
};

template <typename T> constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access
template <typename T> struct alignas(16) Pack { T v[kVec<T>]; };

template <typename A> __device__ __forceinline__ A to_acc(float x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(__half x) { return __half2float(x); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) {
  return static_cast<T>(x);
}
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16(x);
}

// Columns before the first 16-byte boundary of a row (processed one by one).
template <typename T> __device__ __forceinline__ int64_t head_of(const T* p, int64_t V) {
  const int64_t mis = (reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T);
  const int64_t head = mis == 0 ? 0 : kVec<T> - mis;
  return head < V ? head : V;
}

// Merge of two threads' stats, the combine op of the block reduction (cuda_utils.cuh).
struct StatsMerge {
  template <typename A>
  __device__ __forceinline__ SoftmaxStats<A> operator()(SoftmaxStats<A> a, SoftmaxStats<A> b) const {
    return softmax_stats_merge(a, b);
  }
};

template <typename T, int kThreads, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                              acc_t<T>* __restrict__ logprobs, acc_t<T>* __restrict__ entropy,
                              acc_t<T>* __restrict__ lse, int64_t V, RowLayout layout,
                              acc_t<T> inv_t, int64_t ignore_index) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  const bool ignored = label == ignore_index, valid = label >= 0 && label < V;
  if (ignored || !valid) {  // nothing to read; NaN marks an out-of-range label
    if (threadIdx.x == 0) {
      const A v = ignored ? A(0) : A(NAN);
      logprobs[row] = lse[row] = v;
      if (kEntropy) entropy[row] = v;
    }
    return;
  }
  const T* p = logits + layout.offset(row);
  const FastExp ex;
  SoftmaxStats<A> st = softmax_stats_init<A>();
  const int64_t head = head_of(p, V);
  if (threadIdx.x < head) {
    const A z = to_acc<A>(p[threadIdx.x]) * inv_t;
    softmax_stats_add_block<kEntropy, 1>(st, &z, ex);
  }
  const int64_t nvec = (V - head) / N;
  const Pack<T>* vp = reinterpret_cast<const Pack<T>*>(p + head);
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const Pack<T> pk = vp[i];
    A z[N];
#pragma unroll
    for (int k = 0; k < N; ++k) z[k] = to_acc<A>(pk.v[k]) * inv_t;
    softmax_stats_add_block<kEntropy, N>(st, z, ex);
  }
  const int64_t j = head + nvec * N + threadIdx.x;
  if (j < V) {
    const A z = to_acc<A>(p[j]) * inv_t;
    softmax_stats_add_block<kEntropy, 1>(st, &z, ex);
  }
  st = block_reduce(st, StatsMerge{}, softmax_stats_init<A>());
  if (threadIdx.x == 0) {
    const A l = softmax_stats_lse(st);
    lse[row] = l;
    const A lp = to_acc<A>(p[label]) * inv_t - l;
    logprobs[row] = lp < A(0) ? lp : A(0) * lp;  // <= 0 (rounding may cross); NaN stays
    if (kEntropy) {
      const A h = softmax_stats_entropy(st);
      entropy[row] = h > A(0) ? h : A(0) * h;
    }
  }
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_bwd_kernel(const acc_t<T>* __restrict__ grad_logprobs,
                              const acc_t<T>* __restrict__ grad_entropy, const T* logits,
                              const int64_t* __restrict__ labels, const acc_t<T>* __restrict__ lse,
                              const acc_t<T>* __restrict__ entropy, T* grad, int64_t V,
                              RowLayout in_layout, RowLayout out_layout, acc_t<T> inv_t,
                              int64_t ignore_index) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  const A g_lp = grad_logprobs[row];
  const A g_ent = grad_entropy ? grad_entropy[row] : A(0);
  const T* src = logits + in_layout.offset(row);
  T* dst = grad + out_layout.offset(row);
  const bool zero = label == ignore_index || label < 0 || label >= V || (g_lp == 0 && g_ent == 0);
  if (zero) {  // ignored / PPO-clipped tokens: write zeros, read nothing
    for (int64_t j = threadIdx.x; j < V; j += kThreads) dst[j] = from_acc<T>(A(0));
    return;
  }
  const A l = lse[row];
  const A mean_z = grad_entropy ? softmax_mean_logit(l, entropy[row]) : A(0);
  const A z_y = to_acc<A>(src[label]) * inv_t;
  __syncthreads();  // every thread has read z_y before any (in-place) write
  const A d_y = logprobs_grad_target(z_y, l, mean_z, g_lp, g_ent, inv_t);
  const A c0 = -g_lp * inv_t, c1 = -g_ent * inv_t;
  const FastExp ex;
  auto dz = [&](A x, int64_t j) {
    return j == label ? d_y : logprobs_grad(x * inv_t, l, mean_z, c0, c1, ex);
  };
  const int64_t head = head_of(src, V);
  const bool vec = head == head_of(dst, V);  // same misalignment: 16-byte loads and stores
  int64_t begin = 0;
  if (vec) {
    if (threadIdx.x < head) dst[threadIdx.x] = from_acc<T>(dz(to_acc<A>(src[threadIdx.x]), threadIdx.x));
    const int64_t nvec = (V - head) / N;
    const Pack<T>* sp = reinterpret_cast<const Pack<T>*>(src + head);
    Pack<T>* dp = reinterpret_cast<Pack<T>*>(dst + head);
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const Pack<T> in = sp[i];
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < N; ++k) out.v[k] = from_acc<T>(dz(to_acc<A>(in.v[k]), head + i * N + k));
      dp[i] = out;
    }
    begin = head + nvec * N;
  }
  for (int64_t j = begin + threadIdx.x; j < V; j += kThreads) {
    dst[j] = from_acc<T>(dz(to_acc<A>(src[j]), j));
  }
}

constexpr int kSmall = 128, kLarge = 512;  // threads per row for V < 16384 / otherwise

}  // namespace

template <typename T>
cudaError_t token_logprobs_fwd(const T* logits, const int64_t* labels, acc_t<T>* logprobs,
                               acc_t<T>* entropy, acc_t<T>* lse, int64_t n, int64_t V,
                               RowLayout layout, double inv_t, int64_t ignore_index,
                               cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const auto t = static_cast<acc_t<T>>(inv_t);
#define PPK_LAUNCH(THREADS, ENT)                                                          \
  token_logprobs_fwd_kernel<T, THREADS, ENT><<<static_cast<unsigned>(n), THREADS, 0, stream>>>( \
      logits, labels, logprobs, entropy, lse, V, layout, t, ignore_index)
  if (V < 16384) {
    if (entropy) PPK_LAUNCH(kSmall, true); else PPK_LAUNCH(kSmall, false);
  } else {
    if (entropy) PPK_LAUNCH(kLarge, true); else PPK_LAUNCH(kLarge, false);
  }
#undef PPK_LAUNCH
  return cudaGetLastError();
}

template <typename T>
cudaError_t token_logprobs_bwd(const acc_t<T>* grad_logprobs, const acc_t<T>* grad_entropy,
                               const T* logits, const int64_t* labels, const acc_t<T>* lse,
                               const acc_t<T>* entropy, T* grad, int64_t n, int64_t V,
                               RowLayout in_layout, RowLayout out_layout, double inv_t,
                               int64_t ignore_index, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const auto t = static_cast<acc_t<T>>(inv_t);
  const unsigned blocks = static_cast<unsigned>(n);
  if (V < 16384) {
    token_logprobs_bwd_kernel<T, kSmall><<<blocks, kSmall, 0, stream>>>(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, grad, V, in_layout,
        out_layout, t, ignore_index);
  } else {
    token_logprobs_bwd_kernel<T, kLarge><<<blocks, kLarge, 0, stream>>>(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, grad, V, in_layout,
        out_layout, t, ignore_index);
  }
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                      \
  template cudaError_t token_logprobs_fwd<T>(const T*, const int64_t*, acc_t<T>*, acc_t<T>*,    \
                                             acc_t<T>*, int64_t, int64_t, RowLayout, double,    \
                                             int64_t, cudaStream_t);                            \
  template cudaError_t token_logprobs_bwd<T>(const acc_t<T>*, const acc_t<T>*, const T*,        \
                                             const int64_t*, const acc_t<T>*, const acc_t<T>*,  \
                                             T*, int64_t, int64_t, RowLayout, RowLayout, double, \
                                             int64_t, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/token_logprobs_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {

std::tuple<Tensor, Tensor, Tensor> token_logprobs_cuda(
    const Tensor& logits, const Tensor& labels, double temperature, bool with_entropy,
    int64_t ignore_index, bool /*inplace_backward: autograd only*/) {
  const cuda::Guard guard(logits);
  const LogprobsForwardArgs a = logprobs_forward_args(logits, labels, temperature, with_entropy);
  cuda::check_grid_rows("token_logprobs", a.n);
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "token_logprobs_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK(cuda::token_logprobs_fwd<T>(
        cuda::ptr<scalar_t>(a.x), a.lab.const_data_ptr<int64_t>(), a.lp.mutable_data_ptr<A>(),
        with_entropy ? a.ent.mutable_data_ptr<A>() : nullptr, a.lse.mutable_data_ptr<A>(), a.n,
        a.V, a.layout, 1.0 / temperature, ignore_index, cuda::stream()));
  });
  return {a.lp, a.ent, a.lse};
}

namespace {
// dz of every row into a.dst (token_logprobs_backward and its in-place form, token_logprobs_args.h).
void backward_cuda(const LogprobsBackwardArgs& a, double inv_temperature, int64_t ignore_index) {
  const cuda::Guard guard(a.x);
  cuda::check_grid_rows("token_logprobs_backward", a.n);
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "token_logprobs_bwd_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK(cuda::token_logprobs_bwd<T>(
        a.g_lp.const_data_ptr<A>(), a.has_ent ? a.g_ent.const_data_ptr<A>() : nullptr,
        cuda::ptr<scalar_t>(a.x), a.lab.const_data_ptr<int64_t>(), a.lse.const_data_ptr<A>(),
        a.has_ent ? a.ent.const_data_ptr<A>() : nullptr, cuda::ptr<scalar_t>(a.dst), a.n, a.V,
        a.in_layout, a.out_layout, inv_temperature, ignore_index, cuda::stream()));
  });
}
}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("token_logprobs", TORCH_BOX(&token_logprobs_cuda));
  m.impl("token_logprobs_backward", TORCH_BOX(&token_logprobs_backward_op<backward_cuda>));
  m.impl("token_logprobs_backward_", TORCH_BOX(&token_logprobs_backward_inplace_op<backward_cuda>));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
