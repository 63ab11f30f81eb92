// CUDA kernels of masked_mean, masked_var and masked_whiten (forward, backward).
// The group baselines are in group_advantages.cu.
//
// Deterministic reductions, no atomics: each block sums a fixed chunk of kChunk entries (fixed
// per-thread order, then a fixed warp-shuffle + shared-memory tree) into double partials; one
// block of finalize_kernel sums the partials in a fixed order and derives the statistics on the
// device (masked_whiten.h), so the passes follow each other on the stream without a host sync.
#include "ppokernels/masked_whiten.h"
#include "ppokernels/cuda_utils.cuh"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;                    // entries per thread per reduction block
constexpr int64_t kChunk = kThreads * kItems;  // entries per partial (fixed: determinism)

// Pass A: part = (sum m, sum m x, sum g); pass B: (sum m (x - mu)^2, sum g (x - mu), 0).
template <typename T, bool kPassB>
__global__ void partials_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                                const acc_t<T>* __restrict__ g, const double* __restrict__ stats,
                                double* __restrict__ part, int64_t n) {
  using A = acc_t<T>;
  const A mean = kPassB ? static_cast<A>(stats[kStatMean]) : A(0);
  A v[3] = {A(0), A(0), A(0)};
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
#pragma unroll 4
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = base + static_cast<int64_t>(k) * kThreads;
    if (i >= n) break;
    const A xv = load_as<A>(x, i);
    const bool feed = g && feeds_stats_grad(mask[i], xv);  // masked_whiten.h
    const A gv = feed ? g[i] : A(0);
    if (kPassB) {
      const A d = xv - mean;
      v[0] += mask[i] ? d * d : A(0);  // select: masked inf/NaN must not leak
      v[1] += feed ? gv * d : A(0);
    } else {
      v[0] += mask[i] ? A(1) : A(0);
      v[1] += mask[i] ? xv : A(0);
      v[2] += gv;
    }
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) part[blockIdx.x * 3 + k] = static_cast<double>(v[k]);
  }
}

template <bool kPassB>
__global__ void finalize_kernel(const double* __restrict__ part, int64_t num_parts,
                                double* __restrict__ stats, bool unbiased, bool shift_mean,
                                double eps) {
  double v[3] = {0.0, 0.0, 0.0};
  for (int64_t p = threadIdx.x; p < num_parts; p += kThreads) {
    for (int k = 0; k < 3; ++k) v[k] += part[p * 3 + k];
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    if (kPassB) {
      masked_stats_finalize_b(v, stats, unbiased, shift_mean, eps);
    } else {
      masked_stats_finalize_a(v, stats);
    }
  }
}

// mode 0: y = whitened x; mode 1: dx of the whitening; mode 2: dx of masked_moments.
template <typename T, typename O, int kMode>
__global__ void elementwise_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                                   const acc_t<T>* __restrict__ g, const double* __restrict__ stats,
                                   const acc_t<T>* __restrict__ moments, O* __restrict__ out,
                                   int64_t n, bool flag) {
  using A = acc_t<T>;
  A mean, c0, c1, c2 = A(0);
  if (kMode == 2) {  // moments = (mean, var, count), g = their gradient; flag = unbiased
    mean = moments[0];
    const MomentsCoefs c = moments_coefs(g[0], g[1], moments[2], flag);
    c0 = A(c.mean);
    c1 = A(c.var);
  } else {  // flag = shift_mean
    mean = static_cast<A>(stats[kStatMean]);
    c0 = static_cast<A>(stats[kStatRstd]);
    c1 = static_cast<A>(stats[kStatCoefG]);
    c2 = static_cast<A>(stats[kStatCoefH]);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A xv = load_as<A>(x, i);
    A y;
    if (kMode == 0) {
      y = whiten_value(xv, mean, c0, flag ? A(0) : mean);
    } else if (kMode == 1) {
      y = whiten_grad(g[i], xv, mask[i] ? A(1) : A(0), mean, c0, c1, c2);
    } else {
      y = moments_grad(xv, mask[i] ? A(1) : A(0), mean, c0, c1);
    }
    store_as(out, i, y);
  }
}

}  // namespace

inline int64_t masked_stats_parts(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Both reduction passes into stats[kNumStats]; part holds max(1, masked_stats_parts(n)) x 3.
template <typename T>
cudaError_t masked_stats(const T* x, const bool* mask, const acc_t<T>* g, int64_t n,
                         bool unbiased, bool shift_mean, double eps, double* part, double* stats,
                         cudaStream_t stream) {
  const int64_t parts = masked_stats_parts(n);
  const unsigned blocks = static_cast<unsigned>(parts);
  if (parts > 0) partials_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, mask, g, stats, part, n);
  finalize_kernel<false><<<1, kThreads, 0, stream>>>(part, parts, stats, unbiased, shift_mean, eps);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (parts > 0) partials_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, mask, g, stats, part, n);
  finalize_kernel<true><<<1, kThreads, 0, stream>>>(part, parts, stats, unbiased, shift_mean, eps);
  return cudaGetLastError();
}

template <typename T, typename O, int kMode>
cudaError_t masked_elementwise(const T* x, const bool* mask, const acc_t<T>* g,
                               const double* stats, const acc_t<T>* moments, O* out, int64_t n,
                               bool flag, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  elementwise_kernel<T, O, kMode><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      x, mask, g, stats, moments, out, n, flag);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                        \
  template cudaError_t masked_stats<T>(const T*, const bool*, const acc_t<T>*, int64_t, bool,     \
                                       bool, double, double*, double*, cudaStream_t);             \
  template cudaError_t masked_elementwise<T, acc_t<T>, 0>(const T*, const bool*, const acc_t<T>*, \
                                                          const double*, const acc_t<T>*,         \
                                                          acc_t<T>*, int64_t, bool, cudaStream_t); \
  template cudaError_t masked_elementwise<T, T, 1>(const T*, const bool*, const acc_t<T>*,        \
                                                   const double*, const acc_t<T>*, T*, int64_t,   \
                                                   bool, cudaStream_t);                           \
  template cudaError_t masked_elementwise<T, T, 2>(const T*, const bool*, const acc_t<T>*,        \
                                                   const double*, const acc_t<T>*, T*, int64_t,   \
                                                   bool, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/masked_whiten_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {
namespace {

// fp64 [kNumStats] statistics of x over the mask (and of g when defined), on x's device.
template <typename scalar_t>
Tensor stats_of(const MaskedArgs& a, bool unbiased, bool shift_mean, double eps) {
  using T = typename cuda::CudaType<scalar_t>::type;
  auto stats = empty({kNumStats}, kDouble, a.x);
  auto part =
      empty({std::max<int64_t>(1, cuda::masked_stats_parts(a.x.numel())) * 3}, kDouble, a.x);
  const auto* gp = a.g.defined() ? a.g.const_data_ptr<cuda::acc_t<T>>() : nullptr;
  PPK_CUDA_CHECK(cuda::masked_stats<T>(cuda::ptr<scalar_t>(a.x), a.m.const_data_ptr<bool>(), gp,
                                       a.x.numel(), unbiased, shift_mean, eps,
                                       part.mutable_data_ptr<double>(),
                                       stats.mutable_data_ptr<double>(), cuda::stream()));
  return stats;
}

}  // namespace

Tensor masked_moments_cuda(const Tensor& x, const Tensor& mask, bool unbiased) {
  const cuda::Guard guard(x);
  const MaskedArgs a = masked_args("masked_moments", x, mask, nullptr);
  Tensor stats;
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_moments", [&] {
    stats = stats_of<scalar_t>(a, unbiased, true, 0.0);
  });
  // stats[[kStatMean, kStatVar, kStatCount]], by three device copies
  auto out = empty({3}, kDouble, stats);
  const int64_t idx[3] = {kStatMean, kStatVar, kStatCount};
  for (int64_t k = 0; k < 3; ++k) {
    auto dst = torch::stable::narrow(out, 0, k, 1);
    torch::stable::copy_(dst, torch::stable::narrow(stats, 0, idx[k], 1));
  }
  return to_dtype(out, acc_dtype(x));
}

Tensor masked_moments_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& mask,
                                    const Tensor& moments, bool unbiased) {
  const cuda::Guard guard(x);
  const MaskedArgs a = moments_backward_args(grad, x, mask, moments);
  const auto mo = as_contiguous(to_dtype(moments, acc_dtype(x)));
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_moments_bwd", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::masked_elementwise<T, T, 2>(
        cuda::ptr<scalar_t>(a.x), a.m.const_data_ptr<bool>(), a.g.const_data_ptr<A>(), nullptr,
        mo.const_data_ptr<A>(), cuda::ptr<scalar_t>(a.out), a.x.numel(), unbiased,
        cuda::stream())));
  });
  return a.out;
}

Tensor masked_whiten_cuda(const Tensor& x, const Tensor& mask, bool shift_mean, bool unbiased,
                          double eps) {
  const cuda::Guard guard(x);
  const MaskedArgs a = whiten_args(x, mask);
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_whiten", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    const auto stats = stats_of<scalar_t>(a, unbiased, shift_mean, eps);
    PPK_CUDA_CHECK((cuda::masked_elementwise<T, A, 0>(
        cuda::ptr<scalar_t>(a.x), a.m.const_data_ptr<bool>(), nullptr,
        stats.const_data_ptr<double>(), nullptr, a.out.mutable_data_ptr<A>(), a.x.numel(),
        shift_mean, cuda::stream())));
  });
  return a.out;
}

Tensor masked_whiten_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& mask,
                                   bool shift_mean, bool unbiased, double eps) {
  const cuda::Guard guard(x);
  const MaskedArgs a = whiten_backward_args(grad, x, mask);
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_whiten_bwd", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    const auto stats = stats_of<scalar_t>(a, unbiased, shift_mean, eps);
    PPK_CUDA_CHECK((cuda::masked_elementwise<T, T, 1>(
        cuda::ptr<scalar_t>(a.x), a.m.const_data_ptr<bool>(), a.g.const_data_ptr<A>(),
        stats.const_data_ptr<double>(), nullptr, cuda::ptr<scalar_t>(a.out), a.x.numel(),
        shift_mean, cuda::stream())));
  });
  return a.out;
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("masked_moments", TORCH_BOX(&masked_moments_cuda));
  m.impl("masked_moments_backward", TORCH_BOX(&masked_moments_backward_cuda));
  m.impl("masked_whiten", TORCH_BOX(&masked_whiten_cuda));
  m.impl("masked_whiten_backward", TORCH_BOX(&masked_whiten_backward_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
