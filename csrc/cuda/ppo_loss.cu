// CUDA kernels of the ppo_loss family: clipped policy loss and clipped value loss, forward and
// backward. Forward: one block per row reduces the row into partial sums (fixed shuffle tree),
// then one block reduces the rows in a fixed order (in double) and applies the aggregation
// weights: deterministic, no atomics. Backward: grid-stride elementwise pass with the per-row
// weight saved by the forward. Masked tokens are skipped (no loads, zero gradient).
#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/ppo_loss.h"

namespace ppokernels {
namespace cuda {

template <typename T>
struct PolicyPtrs {
  const T *lp, *old, *ref, *ent;  // [B, T]; ref / ent may be null
  const acc_t<T>*adv, *w;         // [B, T] or [B] (adv_row / w_row); w may be null
  const bool* mask;               // [B, T]
  bool adv_row, w_row;
};

namespace {

constexpr int kThreads = 256;
constexpr int kFinalThreads = 512;

// Sums v[k] over the block (fixed tree); the result is valid in thread 0.
template <typename A, int K>
__device__ void block_sum(A (&v)[K], A* smem) {
  for (int off = 16; off > 0; off >>= 1) {
    for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
    for (int k = 0; k < K; ++k) v[k] = lane < warps ? smem[k * 32 + lane] : A(0);
    for (int off = 16; off > 0; off >>= 1) {
      for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    }
  }
}

template <typename T>
__global__ void policy_row_kernel(PolicyPtrs<T> p, int64_t width, PolicyParams<acc_t<T>> prm,
                                  acc_t<T>* __restrict__ part, acc_t<T>* __restrict__ seq_lr) {
  using A = acc_t<T>;
  __shared__ A smem[kPolicyK * 32];
  __shared__ A s_shared;
  const int64_t b = blockIdx.x, base = b * width;
  const A adv_row = p.adv_row ? p.adv[b] : A(0);
  const A w_row = p.w && p.w_row ? p.w[b] : A(1);
  A s = 0;
  if (prm.seq_ratio) {  // masked mean of the clamped log-ratio (GSPO's sequence log-ratio)
    A v[2] = {0, 0};
    for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
      if (!p.mask[base + t]) continue;
      v[0] += clamp_logratio(load_as<A>(p.lp, base + t) - load_as<A>(p.old, base + t),
                             prm.logratio_clamp);
      v[1] += A(1);
    }
    block_sum(v, smem);
    if (threadIdx.x == 0) s_shared = v[1] > A(0) ? v[0] / v[1] : A(0);
    __syncthreads();
    s = s_shared;
  }
  A v[kPolicyK] = {};
  for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
    const int64_t i = base + t;
    if (!p.mask[i]) continue;
    const A lp = load_as<A>(p.lp, i);
    const A adv = p.adv_row ? adv_row : p.adv[i];
    const A w = p.w && !p.w_row ? p.w[i] : w_row;
    const A ref = p.ref ? load_as<A>(p.ref, i) : A(0);
    A kl, clipped, dual, neg_lr;
    const A loss = policy_token_forward(prm, lp, load_as<A>(p.old, i), ref, adv, w, s, &kl,
                                        &clipped, &dual, &neg_lr);
    v[kPN] += A(1);
    v[kPLoss] += loss;
    v[kPKL] += kl;
    v[kPEntropy] += p.ent ? load_as<A>(p.ent, i) : A(0);
    v[kPClip] += clipped;
    v[kPNegLR] += neg_lr;
    v[kPDual] += dual;
  }
  block_sum(v, smem);
  if (threadIdx.x == 0) {
    for (int k = 0; k < kPolicyK; ++k) part[b * kPolicyK + k] = v[k];
    seq_lr[b] = s;
  }
}

// One block: the rows in a fixed order, in double. K partials per row; the loss of row b is
// part[kLoss] + kl_coef part[kKL] - entropy_coef part[kEnt] (policy) or part[1] (value, K = 3).
template <typename A, int K>
__global__ void finalize_kernel(const A* __restrict__ part, const A* __restrict__ seq_lr,
                                int64_t rows, int64_t width, AggMode mode, double num_tokens,
                                double num_seqs, double kl_coef, double entropy_coef,
                                A* __restrict__ loss, A* __restrict__ metrics,
                                A* __restrict__ row_stats) {
  __shared__ double smem[4 * 32];
  __shared__ double n_shared;
  constexpr bool policy = K == kPolicyK;
  double c[4] = {0, 0, 0, 0};  // n, clipped, -logratio, dual
  for (int64_t b = threadIdx.x; b < rows; b += blockDim.x) {
    const A* q = part + b * K;
    c[0] += q[0];
    if constexpr (policy) {
      c[1] += q[kPClip];
      c[2] += q[kPNegLR];
      c[3] += q[kPDual];
    } else {
      c[1] += q[2];
    }
  }
  block_sum(c, smem);
  if (threadIdx.x == 0) n_shared = c[0];
  __syncthreads();
  const double n_total = n_shared;
  double l[3] = {0, 0, 0};  // loss, kl, entropy
  for (int64_t b = threadIdx.x; b < rows; b += blockDim.x) {
    const A* q = part + b * K;
    const double w = agg_row_scale(mode, q[0], n_total, num_tokens, num_seqs, rows, width);
    if constexpr (policy) {
      row_stats[2 * b] = A(w);
      row_stats[2 * b + 1] = seq_lr[b];
      if (w != 0) {
        l[0] += w * (double(q[kPLoss]) + kl_coef * q[kPKL] - entropy_coef * q[kPEntropy]);
        l[1] += w * q[kPKL];
        l[2] += w * q[kPEntropy];
      }
    } else {
      row_stats[b] = A(w);
      if (w != 0) l[0] += w * q[1];
    }
  }
  __syncthreads();
  block_sum(l, smem);
  if (threadIdx.x == 0) {
    const double inv = n_total > 0 ? 1.0 / n_total : 0.0;
    *loss = A(l[0]);
    metrics[0] = A(c[1] * inv);
    if constexpr (policy) {
      metrics[1] = A(c[2] * inv);
      metrics[2] = A(c[3] * inv);
      metrics[3] = A(l[1]);
      metrics[4] = A(l[2]);
    }
  }
}

template <typename T>
__global__ void policy_bwd_kernel(const acc_t<T>* __restrict__ grad, PolicyPtrs<T> p,
                                  const acc_t<T>* __restrict__ row_stats, int64_t rows,
                                  int64_t width, PolicyParams<acc_t<T>> prm, T* __restrict__ g_lp,
                                  T* __restrict__ g_ref, T* __restrict__ g_ent) {
  using A = acc_t<T>;
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const A g = *grad;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = i / width;
    const A scale = g * row_stats[2 * b];
    if (!p.mask[i] || scale == A(0)) {
      store_as(g_lp, i, A(0));
      if (g_ref) store_as(g_ref, i, A(0));
      if (g_ent) store_as(g_ent, i, A(0));
      continue;
    }
    const A adv = p.adv_row ? p.adv[b] : p.adv[i];
    const A w = p.w ? (p.w_row ? p.w[b] : p.w[i]) : A(1);
    const A ref = p.ref ? load_as<A>(p.ref, i) : A(0);
    A dkl;
    const A d = policy_token_backward(prm, load_as<A>(p.lp, i), load_as<A>(p.old, i), ref, adv, w,
                                      row_stats[2 * b + 1], &dkl);
    store_as(g_lp, i, scale * d);
    if (g_ref) store_as(g_ref, i, -scale * dkl);
    if (g_ent) store_as(g_ent, i, -A(prm.entropy_coef) * scale);
  }
}

template <typename T>
__global__ void value_row_kernel(const T* __restrict__ v, const T* __restrict__ vo,
                                 const acc_t<T>* __restrict__ ret, const bool* __restrict__ mask,
                                 int64_t width, acc_t<T> clip, acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A smem[3 * 32];
  const int64_t b = blockIdx.x, base = b * width;
  A acc[3] = {0, 0, 0};
  for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    A d, clipped;
    acc[1] += value_token(load_as<A>(v, i), load_as<A>(vo, i), ret[i], clip, &d, &clipped);
    acc[0] += A(1);
    acc[2] += clipped;
  }
  block_sum(acc, smem);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) part[b * 3 + k] = acc[k];
  }
}

template <typename T>
__global__ void value_bwd_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ v,
                                 const T* __restrict__ vo, const acc_t<T>* __restrict__ ret,
                                 const bool* __restrict__ mask,
                                 const acc_t<T>* __restrict__ row_scale, int64_t rows,
                                 int64_t width, acc_t<T> clip, T* __restrict__ g_v) {
  using A = acc_t<T>;
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const A g = *grad;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A scale = g * row_scale[i / width];
    A d = 0, clipped;
    if (mask[i] && scale != A(0)) {
      value_token(load_as<A>(v, i), load_as<A>(vo, i), ret[i], clip, &d, &clipped);
    }
    store_as(g_v, i, scale * d);
  }
}

template <typename A>
PolicyParams<A> to_acc(const PolicyParams<double>& p) {
  return PolicyParams<A>{A(p.clip_low),  A(p.clip_high), A(p.dual),         A(p.logratio_clamp),
                         A(p.kl_coef),   A(p.kl_clamp),  A(p.entropy_coef), p.est,
                         p.kl_straight_through,          p.seq_ratio,       p.has_ref};
}

}  // namespace

// Forward of the policy loss. part: [B, kPolicyK] and seq_lr: [B] scratch; loss: [];
// metrics: [kPolicyMetrics]; row_stats: [B, 2].
template <typename T>
cudaError_t ppo_policy_fwd(PolicyPtrs<T> p, int64_t rows, int64_t width,
                           const PolicyParams<double>& prm, AggMode mode, double num_tokens,
                           double num_seqs, acc_t<T>* part, acc_t<T>* seq_lr, acc_t<T>* loss,
                           acc_t<T>* metrics, acc_t<T>* row_stats, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows > 0) {
    policy_row_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        p, width, to_acc<A>(prm), part, seq_lr);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  finalize_kernel<A, kPolicyK><<<1, kFinalThreads, 0, stream>>>(
      part, seq_lr, rows, width, mode, num_tokens, num_seqs, prm.kl_coef, prm.entropy_coef, loss,
      metrics, row_stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ppo_policy_bwd(const acc_t<T>* grad, PolicyPtrs<T> p, const acc_t<T>* row_stats,
                           int64_t rows, int64_t width, const PolicyParams<double>& prm, T* g_lp,
                           T* g_ref, T* g_ent, cudaStream_t stream) {
  const int64_t n = rows * width;
  if (n == 0) return cudaSuccess;
  policy_bwd_kernel<T><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      grad, p, row_stats, rows, width, to_acc<acc_t<T>>(prm), g_lp, g_ref, g_ent);
  return cudaGetLastError();
}

template <typename T>
cudaError_t value_loss_fwd(const T* v, const T* vo, const acc_t<T>* ret, const bool* mask,
                           int64_t rows, int64_t width, double clip, AggMode mode,
                           double num_tokens, double num_seqs, acc_t<T>* part, acc_t<T>* loss,
                           acc_t<T>* clipfrac, acc_t<T>* row_scale, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows > 0) {
    value_row_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        v, vo, ret, mask, width, A(clip), part);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  finalize_kernel<A, 3><<<1, kFinalThreads, 0, stream>>>(part, nullptr, rows, width, mode,
                                                         num_tokens, num_seqs, 0.0, 0.0, loss,
                                                         clipfrac, row_scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t value_loss_bwd(const acc_t<T>* grad, const T* v, const T* vo, const acc_t<T>* ret,
                           const bool* mask, const acc_t<T>* row_scale, int64_t rows,
                           int64_t width, double clip, T* g_v, cudaStream_t stream) {
  const int64_t n = rows * width;
  if (n == 0) return cudaSuccess;
  value_bwd_kernel<T><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      grad, v, vo, ret, mask, row_scale, rows, width, acc_t<T>(clip), g_v);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                       \
  template cudaError_t ppo_policy_fwd<T>(PolicyPtrs<T>, int64_t, int64_t,                       \
                                         const PolicyParams<double>&, AggMode, double, double,   \
                                         acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*,  \
                                         cudaStream_t);                                          \
  template cudaError_t ppo_policy_bwd<T>(const acc_t<T>*, PolicyPtrs<T>, const acc_t<T>*,       \
                                         int64_t, int64_t, const PolicyParams<double>&, T*, T*,  \
                                         T*, cudaStream_t);                                      \
  template cudaError_t value_loss_fwd<T>(const T*, const T*, const acc_t<T>*, const bool*,      \
                                         int64_t, int64_t, double, AggMode, double, double,      \
                                         acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*,             \
                                         cudaStream_t);                                          \
  template cudaError_t value_loss_bwd<T>(const acc_t<T>*, const T*, const T*, const acc_t<T>*,  \
                                         const bool*, const acc_t<T>*, int64_t, int64_t, double, \
                                         T*, cudaStream_t);
PPK_INSTANTIATE(float)
PPK_INSTANTIATE(double)
PPK_INSTANTIATE(__half)
PPK_INSTANTIATE(__nv_bfloat16)
#undef PPK_INSTANTIATE

}  // namespace cuda
}  // namespace ppokernels

#ifndef PPK_KERNELS_ONLY
#include "ppo_loss_glue.inc"
#endif  // PPK_KERNELS_ONLY
