// CUDA kernels of ppo_policy_loss (value_loss.cu ends in the finalize kernel defined here too,
// declared in agg_cuda.cuh), forward and backward. Forward: one block per row reduces the
// row into partial sums (the fixed-order block reduction of cuda_utils.cuh), then one block
// reduces the rows in a fixed order (in double) and applies the aggregation weights:
// deterministic, no atomics. Backward: grid-stride elementwise pass with the per-row
// weight saved by the forward. Masked tokens are skipped (no loads, zero gradient).
#include "ppokernels/agg_cuda.cuh"

namespace ppokernels::cuda {

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

// rowv: [rows, 3] = ra, rb, the row's own surrogate loss (policy_row_values).
template <typename T>
__global__ void policy_row_kernel(PolicyPtrs<T> p, int64_t width, PolicyParams<acc_t<T>> prm,
                                  acc_t<T>* __restrict__ part, acc_t<T>* __restrict__ rowv) {
  using A = acc_t<T>;
  __shared__ A s_shared[3];
  const int64_t b = blockIdx.x, base = b * width;
  const A adv_row = p.adv_row ? p.adv[b] : A(0);
  const A w_row = p.w && p.w_row ? p.w[b] : A(1);
  A ra = 0, rb = 0;
  if (policy_row_pass(prm.mode)) {  // sequence-level quantities (gspo, geo_mean, vespo)
    A v[4] = {0, 0, 0, 0};
    for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
      if (!p.mask[base + t]) continue;
      const A lr = clamp_logratio(load_as<A>(p.lp, base + t) - load_as<A>(p.old, base + t),
                                  prm.logratio_clamp);
      const A adv = p.adv_row ? adv_row : p.adv[base + t];
      const A w = p.w && !p.w_row ? p.w[base + t] : w_row;
      A s0, s1, s2;
      policy_row_terms(prm.mode, prm.has_w, lr, adv, w, prm.clip_low, prm.clip_high, &s0, &s1,
                       &s2);
      v[0] += s0;
      v[1] += s1;
      v[2] += s2;
      v[3] += A(1);
    }
    block_sum(v);
    if (threadIdx.x == 0) {
      policy_row_values(prm.mode, prm.has_w, v[0], v[1], v[2], v[3], &s_shared[0], &s_shared[1],
                        &s_shared[2]);
    }
    __syncthreads();
    ra = s_shared[0];
    rb = s_shared[1];
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
    const A loss = policy_token_forward(prm, lp, load_as<A>(p.old, i), ref, adv, w, ra, rb, &kl,
                                        &clipped, &dual, &neg_lr);
    v[kPN] += A(1);
    v[kPLoss] += loss;
    v[kPKL] += kl;
    v[kPEntropy] += p.ent ? load_as<A>(p.ent, i) : A(0);
    v[kPClip] += clipped;
    v[kPNegLR] += neg_lr;
    v[kPDual] += dual;
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    const bool rp = policy_row_pass(prm.mode);
    for (int k = 0; k < kPolicyK; ++k) part[b * kPolicyK + k] = v[k];
    part[b * kPolicyK + kPLoss] += rp ? s_shared[2] : A(0);  // geo_mean's per-row loss
    rowv[3 * b] = ra;
    rowv[3 * b + 1] = rb;
  }
}

// One block: the rows in a fixed order, in double. K partials per row; the loss of row b is
// part[kLoss] + kl_coef part[kKL] - entropy_coef part[kEnt] (policy) or part[1] (value, K = 3).
template <typename A, int K>
__global__ void finalize_kernel(const A* __restrict__ part, const A* __restrict__ rowv,
                                int64_t rows, int64_t width, AggMode mode, PolicyMode pmode,
                                double num_tokens, double num_seqs, double kl_coef,
                                double entropy_coef,
                                A* __restrict__ loss, A* __restrict__ metrics,
                                A* __restrict__ row_stats) {
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
  block_sum(c);
  if (threadIdx.x == 0) n_shared = c[0];
  __syncthreads();
  const double n_total = n_shared;
  double l[3] = {0, 0, 0};  // loss, kl, entropy
  for (int64_t b = threadIdx.x; b < rows; b += blockDim.x) {
    const A* q = part + b * K;
    const double w = agg_row_scale(mode, q[0], n_total, num_tokens, num_seqs, rows, width);
    if constexpr (policy) {
      const double wp = policy_surrogate_scale(pmode, w, num_seqs, rows);
      A* r = row_stats + kPolicyRowStats * b;
      r[0] = A(w);
      r[1] = rowv[3 * b];
      r[2] = A(wp);
      r[3] = rowv[3 * b + 1];
      if (wp != 0) l[0] += wp * double(q[kPLoss]);
      if (w != 0) {
        l[0] += w * (kl_coef * q[kPKL] - entropy_coef * q[kPEntropy]);
        l[1] += w * q[kPKL];
        l[2] += w * q[kPEntropy];
      }
    } else {
      row_stats[b] = A(w);
      if (w != 0) l[0] += w * q[1];
    }
  }
  __syncthreads();
  block_sum(l);
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
    const A* r = row_stats + kPolicyRowStats * b;
    const A scale = g * r[0], scale_pg = g * r[2];
    if (!p.mask[i] || (scale == A(0) && scale_pg == A(0))) {
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
                                      r[1], r[3], &dkl);
    store_as(g_lp, i, scale_pg * d + scale * dkl);
    if (g_ref) store_as(g_ref, i, -scale * dkl);
    if (g_ent) store_as(g_ent, i, -A(prm.entropy_coef) * scale);
  }
}


}  // namespace

template <typename A, int K>
cudaError_t ppo_loss_finalize(const A* part, const A* rowv, int64_t rows, int64_t width,
                              AggMode mode, PolicyMode pmode, double num_tokens, double num_seqs,
                              double kl_coef, double entropy_coef, A* loss, A* metrics,
                              A* row_stats, cudaStream_t stream) {
  finalize_kernel<A, K><<<1, kFinalThreads, 0, stream>>>(part, rowv, rows, width, mode, pmode,
                                                          num_tokens, num_seqs, kl_coef,
                                                          entropy_coef, loss, metrics, row_stats);
  return cudaGetLastError();
}

// Forward of the policy loss. part: [B, kPolicyK] and rowv: [B, 3] scratch; loss: [];
// metrics: [kPolicyMetrics]; row_stats: [B, kPolicyRowStats].
template <typename T>
cudaError_t ppo_policy_fwd(PolicyPtrs<T> p, int64_t rows, int64_t width,
                           const PolicyParams<double>& prm, AggMode mode, double num_tokens,
                           double num_seqs, acc_t<T>* part, acc_t<T>* rowv, acc_t<T>* loss,
                           acc_t<T>* metrics, acc_t<T>* row_stats, cudaStream_t stream) {
  using A = acc_t<T>;
  if (rows > 0) {
    policy_row_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        p, width, policy_params_as<A>(prm), part, rowv);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return ppo_loss_finalize<A, kPolicyK>(part, rowv, rows, width, mode, prm.mode, num_tokens,
                                        num_seqs, prm.kl_coef, prm.entropy_coef, loss, metrics,
                                        row_stats, stream);
}

template <typename T>
cudaError_t ppo_policy_bwd(const acc_t<T>* grad, PolicyPtrs<T> p, const acc_t<T>* row_stats,
                           int64_t rows, int64_t width, const PolicyParams<double>& prm, T* g_lp,
                           T* g_ref, T* g_ent, cudaStream_t stream) {
  const int64_t n = rows * width;
  if (n == 0) return cudaSuccess;
  policy_bwd_kernel<T><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      grad, p, row_stats, rows, width, policy_params_as<acc_t<T>>(prm), g_lp, g_ref, g_ent);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                       \
  template cudaError_t ppo_policy_fwd<T>(PolicyPtrs<T>, int64_t, int64_t,                       \
                                         const PolicyParams<double>&, AggMode, double, double,   \
                                         acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*,  \
                                         cudaStream_t);                                          \
  template cudaError_t ppo_policy_bwd<T>(const acc_t<T>*, PolicyPtrs<T>, const acc_t<T>*,       \
                                         int64_t, int64_t, const PolicyParams<double>&, T*, T*,  \
                                         T*, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE
#define PPK_INSTANTIATE(A, K)                                                                     \
  template cudaError_t ppo_loss_finalize<A, K>(const A*, const A*, int64_t, int64_t, AggMode,     \
                                               PolicyMode, double, double, double, double, A*, A*, \
                                               A*, cudaStream_t);
PPK_INSTANTIATE(float, kPolicyK)
PPK_INSTANTIATE(double, kPolicyK)
PPK_INSTANTIATE(float, 3)
PPK_INSTANTIATE(double, 3)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/ppo_policy_loss_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {
namespace {

template <typename scalar_t>
cuda::PolicyPtrs<typename cuda::CudaType<scalar_t>::type> pointers(const PolicyArgs& c) {
  using T = typename cuda::CudaType<scalar_t>::type;
  using A = cuda::acc_t<T>;
  cuda::PolicyPtrs<T> p;
  p.lp = cuda::ptr<scalar_t>(c.lp);
  p.old = cuda::ptr<scalar_t>(c.old);
  p.ref = c.ref.defined() ? cuda::ptr<scalar_t>(c.ref) : nullptr;
  p.ent = c.ent.defined() ? cuda::ptr<scalar_t>(c.ent) : nullptr;
  p.adv = c.adv.const_data_ptr<A>();
  p.w = c.w.defined() ? c.w.const_data_ptr<A>() : nullptr;
  p.mask = c.mask.const_data_ptr<bool>();
  p.adv_row = c.adv_row;
  p.w_row = c.w_row;
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_cuda(
    const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
    const Tensor& mask, const std::optional<Tensor>& ref_logprobs,
    const std::optional<Tensor>& entropy, const std::optional<Tensor>& is_weights,
    const std::string& loss_mode, const std::vector<double>& loss_params,
    std::optional<double> logratio_clamp, const std::string& agg,
    std::optional<double> num_tokens, std::optional<double> num_seqs, double kl_coef,
    const std::string& kl_estimator, std::optional<double> kl_clamp, double entropy_coef) {
  const char* op = "ppo_policy_loss";
  const cuda::Guard guard(logprobs);
  const AggMode mode = ppo_agg_mode(op, agg);
  const PolicyArgs c = policy_args(op, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                   entropy, is_weights, loss_mode, loss_params,
                                   logratio_clamp, kl_coef, kl_estimator, kl_clamp,
                                   entropy_coef);
  const int64_t B = c.B, T = c.T;
  cuda::check_grid_rows(op, B);
  const auto acc = acc_dtype(logprobs);
  auto part = empty({B, kPolicyK}, acc, c.lp);
  auto rowv = empty({B, 3}, acc, c.lp);
  auto loss = empty({}, acc, c.lp);
  auto metrics = empty({kPolicyMetrics}, acc, c.lp);
  auto row_stats = empty({B, kPolicyRowStats}, acc, c.lp);
  PPK_DISPATCH_FLOATING(c.lp.scalar_type(), "ppo_policy_cuda", [&] {
    using T_ = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T_>;
    PPK_CUDA_CHECK(cuda::ppo_policy_fwd<T_>(
        pointers<scalar_t>(c), B, T, c.p, mode, num_tokens.value_or(0.0), num_seqs.value_or(0.0),
        part.mutable_data_ptr<A>(), rowv.mutable_data_ptr<A>(), loss.mutable_data_ptr<A>(),
        metrics.mutable_data_ptr<A>(), row_stats.mutable_data_ptr<A>(), cuda::stream()));
  });
  return {loss, metrics, row_stats};
}

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_backward_cuda(
    const Tensor& grad, const Tensor& logprobs, const Tensor& old_logprobs,
    const Tensor& advantages, const Tensor& mask,
    const std::optional<Tensor>& ref_logprobs, const std::optional<Tensor>& entropy,
    const std::optional<Tensor>& is_weights, const Tensor& row_stats,
    const std::string& loss_mode, const std::vector<double>& loss_params,
    std::optional<double> logratio_clamp, double kl_coef, const std::string& kl_estimator,
    std::optional<double> kl_clamp, double entropy_coef) {
  const char* op = "ppo_policy_loss_backward";
  const cuda::Guard guard(logprobs);
  const PolicyArgs c = policy_args(op, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                   entropy, is_weights, loss_mode, loss_params,
                                   logratio_clamp, kl_coef, kl_estimator, kl_clamp,
                                   entropy_coef);
  const int64_t B = c.B, T = c.T;
  const PolicyGrads out = policy_grad_outputs(op, c, grad, row_stats);
  const Tensor &g_lp = out.lp, &g_ref = out.ref, &g_ent = out.ent;
  const auto acc = acc_dtype(logprobs);
  const auto g = as_contiguous(to_dtype(grad, acc));
  const auto rs = as_contiguous(to_dtype(row_stats, acc));
  PPK_DISPATCH_FLOATING(c.lp.scalar_type(), "ppo_policy_bwd_cuda", [&] {
    using T_ = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T_>;
    PPK_CUDA_CHECK(cuda::ppo_policy_bwd<T_>(
        g.const_data_ptr<A>(), pointers<scalar_t>(c), rs.const_data_ptr<A>(), B, T, c.p,
        cuda::ptr<scalar_t>(g_lp), c.ref.defined() ? cuda::ptr<scalar_t>(g_ref) : nullptr,
        c.ent.defined() ? cuda::ptr<scalar_t>(g_ent) : nullptr, cuda::stream()));
  });
  return {g_lp, g_ref, g_ent};
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("ppo_policy_loss", TORCH_BOX(&ppo_policy_loss_cuda));
  m.impl("ppo_policy_loss_backward", TORCH_BOX(&ppo_policy_loss_backward_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
