// CUDA kernels of the gae family: GAE and discounted returns as a block-parallel scan.
//
// One block owns one row and walks it in tiles of kThreads * kItems positions (from the end of
// the row for the forward scan, from the start for the backward). Each thread composes the affine
// maps (gae.h) of its kItems consecutive positions, the block scans those aggregates (warp
// shuffles, then one warp over the warp totals), and each thread replays its positions from the
// state its prefix yields, writing outputs. The state leaving the tile carries to the next one.
// Efficient for many short rows (one tile each) and for few long rows (a loop of tiles).
#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/gae.h"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int kWarps = kThreads / 32;

// Exclusive block scan in thread order: returns the composition of the aggregates of all lower
// threads (identity for thread 0); `total` receives the composition of all of them. A scan, not a
// reduction, so it has its own two levels (the shuffles are cuda_utils.cuh's generic shfl_up).
template <typename A>
__device__ Affine<A> block_exclusive_scan(Affine<A> x, Affine<A>& total) {
  __shared__ Affine<A> warp_total[kWarps];
  __shared__ Affine<A> block_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Affine<A> incl = x;
  for (int delta = 1; delta < 32; delta <<= 1) {
    const Affine<A> lower = shfl_up(incl, delta);
    if (lane >= delta) incl = affine_after(incl, lower);
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    Affine<A> w = lane < kWarps ? warp_total[lane] : affine_identity<A>();
    for (int delta = 1; delta < 32; delta <<= 1) {
      const Affine<A> lower = shfl_up(w, delta);
      if (lane >= delta) w = affine_after(w, lower);
    }
    if (lane < kWarps) warp_total[lane] = w;  // inclusive over warps
    if (lane == kWarps - 1) block_total = w;
  }
  __syncthreads();
  Affine<A> excl = shfl_up(incl, 1);
  if (lane == 0) excl = affine_identity<A>();
  if (warp > 0) excl = affine_after(excl, warp_total[warp - 1]);
  total = block_total;
  __syncthreads();  // warp_total is reused by the next tile
  return excl;
}

// kBackward = false: forward scan (reverse time) of GAE / returns; true: the adjoint scan.
// Forward reads (a = rewards, b = values, mask) and writes (o1 = advantages, o2 = returns);
// backward reads (a = grad_returns, b = grad_advantages, mask) and writes (o1 = grad_rewards,
// o2 = grad_values). b / o2 are null for discounted returns.
template <bool kBackward, typename In, typename Out, typename A>
__global__ void __launch_bounds__(kThreads)
    gae_scan_kernel(const In* __restrict__ a, const In* __restrict__ b,
                    const bool* __restrict__ mask, Out* __restrict__ o1, Out* __restrict__ o2,
                    int64_t T, A gamma, A lam, MaskMode mode) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * T;  // int64: rows * T may pass 2^31
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;
  A x0 = 0, x1 = 0;  // state entering the tile
  for (int64_t done = 0; done < T; done += kTile) {
    Affine<A> f[kItems];
    A m[kItems], g_ret[kItems], v[kItems];
    int64_t t[kItems];
    Affine<A> agg = affine_identity<A>();
    for (int j = 0; j < kItems; ++j) {
      const int64_t k = done + threadIdx.x * kItems + j;  // scan position
      t[j] = kBackward ? k : T - 1 - k;
      const bool live = k < T;
      const int64_t i = row + t[j];
      m[j] = live && mask[i] ? A(1) : A(0);
      if (!live) {
        f[j] = affine_identity<A>();
        continue;
      }
      if (!kBackward) {
        v[j] = b ? load_as<A>(b, i) : A(0);
        f[j] = gae_step(m[j], load_as<A>(a, i), v[j], gamma, lam, mode);
      } else {
        g_ret[j] = load_as<A>(a, i);
        const A g = b ? g_ret[j] + load_as<A>(b, i) : g_ret[j];
        const A m_prev = t[j] > 0 && mask[i - 1] ? A(1) : A(0);
        f[j] = gae_adjoint_step(m_prev, g, gamma, lam, mode);
      }
      agg = affine_after(f[j], agg);
    }
    Affine<A> total;
    const Affine<A> prefix = block_exclusive_scan(agg, total);
    A y0 = x0, y1 = x1;
    affine_apply(prefix, y0, y1);
    for (int j = 0; j < kItems; ++j) {
      const int64_t k = done + threadIdx.x * kItems + j;
      if (k >= T) break;
      affine_apply(f[j], y0, y1);
      const int64_t i = row + t[j];
      if (!kBackward) {
        store_as(o1, i, y1);
        if (o2) store_as(o2, i, gae_return(y1, m[j], v[j], mode));
      } else {
        A dr, dv;
        gae_grads(y0, y1, m[j], g_ret[j], mode, dr, dv);
        store_as(o1, i, dr);
        if (o2) store_as(o2, i, dv);
      }
    }
    affine_apply(total, x0, x1);
  }
}

}  // namespace

// Forward: advantages/returns (returns, values may be null for discounted returns).
template <typename In, typename A>
cudaError_t gae_forward(const In* rewards, const In* values, const bool* mask, A* advantages,
                        A* returns, int64_t rows, int64_t T, double gamma, double lam,
                        MaskMode mode, cudaStream_t stream) {
  if (rows == 0 || T == 0) return cudaSuccess;
  gae_scan_kernel<false, In, A, A><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      rewards, values, mask, advantages, returns, T, A(gamma), A(lam), mode);
  return cudaGetLastError();
}

// Backward: grad_rewards/grad_values (grad_advantages, grad_values null for discounted returns).
template <typename Out, typename A>
cudaError_t gae_backward(const A* grad_returns, const A* grad_advantages, const bool* mask,
                         Out* grad_rewards, Out* grad_values, int64_t rows, int64_t T,
                         double gamma, double lam, MaskMode mode, cudaStream_t stream) {
  if (rows == 0 || T == 0) return cudaSuccess;
  gae_scan_kernel<true, A, Out, A><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      grad_returns, grad_advantages, mask, grad_rewards, grad_values, T, A(gamma), A(lam), mode);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                     \
  template cudaError_t gae_forward<T, acc_t<T>>(const T*, const T*, const bool*, acc_t<T>*,   \
                                                acc_t<T>*, int64_t, int64_t, double, double,   \
                                                MaskMode, cudaStream_t);                       \
  template cudaError_t gae_backward<T, acc_t<T>>(const acc_t<T>*, const acc_t<T>*, const bool*, \
                                                 T*, T*, int64_t, int64_t, double, double,     \
                                                 MaskMode, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/gae_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards, const Tensor& values,
                                    const Tensor& mask, double gamma, double lam,
                                    const std::string& mode_name) {
  const cuda::Guard guard(rewards);
  const auto a = gae_forward_args("gae", rewards, &values, mask, gamma, lam, mode_name);
  cuda::check_grid_rows("gae", a.rows.n);
  PPK_DISPATCH_FLOATING(a.r.scalar_type(), "gae_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::gae_forward<T, A>(
        cuda::ptr<scalar_t>(a.r), cuda::ptr<scalar_t>(a.v), a.m.const_data_ptr<bool>(),
        a.adv.mutable_data_ptr<A>(), a.ret.mutable_data_ptr<A>(), a.rows.n, a.rows.len, gamma,
        lam, a.rows.mode, cuda::stream())));
  });
  return {a.adv, a.ret};
}

std::tuple<Tensor, Tensor> gae_backward_cuda(const Tensor& grad_advantages,
                                             const Tensor& grad_returns, const Tensor& mask,
                                             double gamma, double lam,
                                             const std::string& mode_name, ScalarType dtype) {
  const cuda::Guard guard(grad_returns);
  const auto a = gae_backward_args("gae_backward", &grad_advantages, grad_returns, mask, gamma,
                                   lam, mode_name, dtype);
  cuda::check_grid_rows("gae_backward", a.rows.n);
  PPK_DISPATCH_FLOATING(dtype, "gae_backward_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::gae_backward<T, A>(
        a.gr.const_data_ptr<A>(), a.ga.const_data_ptr<A>(), a.m.const_data_ptr<bool>(),
        cuda::ptr<scalar_t>(a.grad_r), cuda::ptr<scalar_t>(a.grad_v), a.rows.n, a.rows.len, gamma,
        lam, a.rows.mode, cuda::stream())));
  });
  return {a.grad_r, a.grad_v};
}

Tensor discounted_returns_cuda(const Tensor& rewards, const Tensor& mask, double gamma,
                               const std::string& mode_name) {
  const cuda::Guard guard(rewards);
  const auto a = gae_forward_args("discounted_returns", rewards, nullptr, mask, gamma, 1.0,
                                  mode_name);
  cuda::check_grid_rows("discounted_returns", a.rows.n);
  PPK_DISPATCH_FLOATING(a.r.scalar_type(), "returns_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::gae_forward<T, A>(
        cuda::ptr<scalar_t>(a.r), nullptr, a.m.const_data_ptr<bool>(), a.adv.mutable_data_ptr<A>(),
        nullptr, a.rows.n, a.rows.len, gamma, 1.0, a.rows.mode, cuda::stream())));
  });
  return a.adv;
}

Tensor discounted_returns_backward_cuda(const Tensor& grad_returns, const Tensor& mask,
                                        double gamma, const std::string& mode_name,
                                        ScalarType dtype) {
  const cuda::Guard guard(grad_returns);
  const auto a = gae_backward_args("discounted_returns_backward", nullptr, grad_returns, mask,
                                   gamma, 1.0, mode_name, dtype);
  cuda::check_grid_rows("discounted_returns_backward", a.rows.n);
  PPK_DISPATCH_FLOATING(dtype, "returns_bwd_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::gae_backward<T, A>(
        a.gr.const_data_ptr<A>(), nullptr, a.m.const_data_ptr<bool>(),
        cuda::ptr<scalar_t>(a.grad_r), nullptr, a.rows.n, a.rows.len, gamma, 1.0, a.rows.mode,
        cuda::stream())));
  });
  return a.grad_r;
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("gae", TORCH_BOX(&gae_cuda));
  m.impl("gae_backward", TORCH_BOX(&gae_backward_cuda));
  m.impl("discounted_returns", TORCH_BOX(&discounted_returns_cuda));
  m.impl("discounted_returns_backward", TORCH_BOX(&discounted_returns_backward_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
