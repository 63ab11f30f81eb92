// CUDA kernels of the logprobs family: per-token log-probs (and entropy) from logits, and the
// gradient with respect to the logits.
//
// One block per row. Forward: each thread folds 16-byte vectors of its columns into its own
// SoftmaxStats (logprobs.h, one rescale per vector), then a fixed shuffle tree + shared-memory
// merge gives the row's stats: deterministic, and independent of the batch. Backward: one pass,
// 16-byte loads and stores, the target column fixed up with -expm1(log p_y). fp32 math for
// fp32/bf16/fp16 logits (fp64 for fp64), int64 offsets, rows addressed through RowLayout so a
// strided slice such as logits[:, :-1] needs no copy. Out-of-range labels give NaN here (the
// Python wrapper checks them; a device-side assert would poison the context).
#include <cfloat>

#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/logprobs.h"

namespace ppokernels {
namespace cuda {
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

template <typename A> __device__ __forceinline__ SoftmaxStats<A> shfl_down(SoftmaxStats<A> a,
                                                                          int off) {
  return {__shfl_down_sync(0xffffffffu, a.m, off), __shfl_down_sync(0xffffffffu, a.s, off),
          __shfl_down_sync(0xffffffffu, a.u, off)};
}

// Merges the stats of all threads of the block in a fixed order; the result is in thread 0.
template <int kThreads, typename A>
__device__ SoftmaxStats<A> block_merge(SoftmaxStats<A> st) {
  __shared__ SoftmaxStats<A> warp_stats[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) st = softmax_stats_merge(st, shfl_down(st, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (kThreads == 32) return st;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_stats[lane] : softmax_stats_init<A>();
    for (int off = 16; off > 0; off >>= 1) st = softmax_stats_merge(st, shfl_down(st, off));
  }
  return st;
}

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
  st = block_merge<kThreads>(st);
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
PPK_INSTANTIATE(float)
PPK_INSTANTIATE(double)
PPK_INSTANTIATE(__half)
PPK_INSTANTIATE(__nv_bfloat16)
#undef PPK_INSTANTIATE

}  // namespace cuda
}  // namespace ppokernels

#ifndef PPK_KERNELS_ONLY
// ---------------------------------------------------------------- torch glue
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {

namespace {
void check_args(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                double temperature) {
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have at least 1 dimension (..., V)");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64");
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
              ": labels must have shape logits.shape[:-1]");
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels and logits on different devices");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(logits.size(-1) > 0 || labels.numel() == 0, op, ": logits has an empty vocabulary");
  TORCH_CHECK(labels.numel() <= INT32_MAX, op, ": too many rows for one launch");
}

at::Tensor rows_of(const at::Tensor& t, RowLayout* layout) {
  const int nd = static_cast<int>(t.dim()) - 1;
  if (t.stride(-1) == 1 && make_row_layout(t.sizes().data(), t.strides().data(), nd, layout)) {
    return t;
  }
  auto c = t.contiguous();
  make_row_layout(c.sizes().data(), c.strides().data(), nd, layout);
  return c;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, bool with_entropy,
    int64_t ignore_index, bool /*inplace_backward: autograd only*/) {
  check_args("token_logprobs", logits, labels, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  RowLayout layout;
  const at::Tensor x = rows_of(logits, &layout);
  const at::Tensor lab = labels.contiguous();
  const auto opts = logits.options().dtype(
      logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor lp = at::empty(labels.sizes(), opts), lse = at::empty(labels.sizes(), opts);
  at::Tensor ent = with_entropy ? at::empty(labels.sizes(), opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_logprobs_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    C10_CUDA_CHECK(cuda::token_logprobs_fwd<T>(
        cuda::ptr<scalar_t>(x), lab.data_ptr<int64_t>(), lp.data_ptr<A>(),
        with_entropy ? ent.data_ptr<A>() : nullptr, lse.data_ptr<A>(), lab.numel(), x.size(-1),
        layout, 1.0 / temperature, ignore_index, cuda::stream()));
  });
  return {lp, ent, lse};
}

namespace {
void backward_into(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                   const std::optional<at::Tensor>& entropy, double temperature,
                   int64_t ignore_index, const at::Tensor& out) {
  check_args("token_logprobs_backward", logits, labels, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool has_ent = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_ent || (entropy.has_value() && entropy->numel() == labels.numel()),
              "token_logprobs_backward: grad_entropy needs the entropy of the forward");
  RowLayout in_layout, out_layout;
  const at::Tensor x = rows_of(logits, &in_layout);
  at::Tensor dst = out;
  if (out.stride(-1) != 1 || !make_row_layout(out.sizes().data(), out.strides().data(),
                                              static_cast<int>(out.dim()) - 1, &out_layout)) {
    dst = at::empty(logits.sizes(), logits.options());
    make_row_layout(dst.sizes().data(), dst.strides().data(), dst.dim() - 1, &out_layout);
  }
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lab = labels.contiguous(), ls = lse.to(acc).contiguous();
  const at::Tensor g_lp = grad_logprobs.to(acc).contiguous();
  const at::Tensor g_ent = has_ent ? grad_entropy->to(acc).contiguous() : at::Tensor();
  const at::Tensor ent = has_ent ? entropy->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_logprobs_bwd_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    C10_CUDA_CHECK(cuda::token_logprobs_bwd<T>(
        g_lp.data_ptr<A>(), has_ent ? g_ent.data_ptr<A>() : nullptr, cuda::ptr<scalar_t>(x),
        lab.data_ptr<int64_t>(), ls.data_ptr<A>(), has_ent ? ent.data_ptr<A>() : nullptr,
        cuda::ptr<scalar_t>(dst), lab.numel(), x.size(-1), in_layout, out_layout,
        1.0 / temperature, ignore_index, cuda::stream()));
  });
  if (!dst.is_same(out)) out.copy_(dst);
}
}  // namespace

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logprobs,
                                        const std::optional<at::Tensor>& grad_entropy,
                                        const at::Tensor& logits, const at::Tensor& labels,
                                        const at::Tensor& lse,
                                        const std::optional<at::Tensor>& entropy,
                                        double temperature, int64_t ignore_index) {
  at::Tensor out = at::empty_like(logits);
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature,
                ignore_index, out);
  return out;
}

void token_logprobs_backward_inplace_cuda(const at::Tensor& grad_logprobs,
                                          const std::optional<at::Tensor>& grad_entropy,
                                          at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& lse,
                                          const std::optional<at::Tensor>& entropy,
                                          double temperature, int64_t ignore_index) {
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature,
                ignore_index, logits);
}

TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_inplace_cuda);
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
