// CUDA kernel of rollout_correction: importance weights, rejection mask and per-row statistics of
// the trainer/sampler log-prob mismatch. One block per row, in passes over the row:
//   1. counts and sums over the valid tokens (and the row's weight of the sequence levels);
//   2. per sequence criterion, the sum and max of its statistic (the row value, its pass/fail);
//   3. the weights and the rejection mask, written, with their sums and extremes;
//   4. per token criterion, its sums, extremes and counts.
// Each pass ends in the fixed-order block reduction of cuda_utils.cuh: deterministic, no atomics,
// the same bits wherever the row sits in the batch. The criteria get a pass each so that a thread
// holds a fixed handful of accumulators (16 criteria x 8 would spill); the later passes re-read
// the row (two log-probs and the mask, 9 bytes a token in fp32) from L1/L2. The per-token and
// per-row math is ppokernels/rollout_correction.h, shared with the CPU kernel
// (cpu/rollout_correction.cpp); the setup is ppokernels/rollout_correction_args.h.
#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/rollout_correction.h"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;

// NS sums, one max and one min (NaN-propagating, as torch.amax / amin), reduced together.
template <typename A, int NS>
struct RowAcc {
  A s[NS];
  A mx, mn;
};
struct RowAccOp {
  template <typename A, int NS>
  __device__ __forceinline__ RowAcc<A, NS> operator()(RowAcc<A, NS> a,
                                                      const RowAcc<A, NS>& b) const {
#pragma unroll
    for (int k = 0; k < NS; ++k) a.s[k] += b.s[k];
    a.mx = vmax(a.mx, b.mx);
    a.mn = vmin(a.mn, b.mn);
    return a;
  }
};
template <typename A, int NS>
__device__ __forceinline__ RowAcc<A, NS> row_acc_identity() {
  RowAcc<A, NS> r;
#pragma unroll
  for (int k = 0; k < NS; ++k) r.s[k] = A(0);
  r.mx = A(-INFINITY);
  r.mn = A(INFINITY);
  return r;
}
// The block's total, valid in thread 0.
template <typename A, int NS>
__device__ __forceinline__ RowAcc<A, NS> block_row_acc(const RowAcc<A, NS>& v) {
  return block_reduce(v, RowAccOp{}, row_acc_identity<A, NS>());
}

// The mask, read and written in its own dtype (no converted [B, T] copy): `width` bytes per
// token; a token is valid when any bit but the sign (floating masks: -0.0 is 0) is set, and a
// kept token of the rejection mask holds `one` (the bits of 1 in that dtype).
struct MaskIO {
  const uint8_t* in;
  uint8_t* out;
  int width;
  uint64_t nosign, one;
};
__device__ __forceinline__ bool mask_valid(const MaskIO& m, int64_t i) {
  uint64_t v;
  switch (m.width) {
    case 1: v = m.in[i]; break;
    case 2: v = reinterpret_cast<const uint16_t*>(m.in)[i]; break;
    case 4: v = reinterpret_cast<const uint32_t*>(m.in)[i]; break;
    default: v = reinterpret_cast<const uint64_t*>(m.in)[i]; break;
  }
  return (v & m.nosign) != 0;
}
__device__ __forceinline__ void mask_store(const MaskIO& m, int64_t i, bool keep) {
  const uint64_t v = keep ? m.one : 0;
  switch (m.width) {
    case 1: m.out[i] = static_cast<uint8_t>(v); break;
    case 2: reinterpret_cast<uint16_t*>(m.out)[i] = static_cast<uint16_t>(v); break;
    case 4: reinterpret_cast<uint32_t*>(m.out)[i] = static_cast<uint32_t>(v); break;
    default: reinterpret_cast<uint64_t*>(m.out)[i] = v; break;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rollout_correction_row_kernel(const T* __restrict__ lp_ptr, const T* __restrict__ rlp_ptr,
                                  MaskIO mask, acc_t<T>* __restrict__ w_out,
                                  acc_t<T>* __restrict__ stats, int64_t width, int64_t cols,
                                  RcParams p) {
  using A = acc_t<T>;
  __shared__ A s_row[2];                  // n, raw row weight
  __shared__ A s_keep[kRcMaxCriteria];    // 1 / 0: the row passes sequence criterion c
  const int64_t base = static_cast<int64_t>(blockIdx.x) * width;
  A* out = stats + static_cast<int64_t>(blockIdx.x) * cols;
  A* cstats = out + kRcRowStats;
  const A clamp = A(p.clamp);
  // the token's clamped log-ratio; lp, rlp, x its log-probs and raw log-ratio
  auto load = [&](int64_t i, A* lp, A* rlp, A* x) {
    *lp = load_as<A>(lp_ptr, i);
    *rlp = load_as<A>(rlp_ptr, i);
    *x = *lp - *rlp;
    return vclamp(*x, -clamp, clamp);
  };

  // ---- 1. counts and sums: n, sum x, sum lp, sum rlp, sum k3, sum exp(2 xc), sum |x|; max |x|
  RowAcc<A, 7> r1 = row_acc_identity<A, 7>();
  r1.mx = A(0);  // max |x| of an empty row is 0
  for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
    if (!mask_valid(mask, base + t)) continue;
    A lp, rlp, x;
    const A xc = load(base + t, &lp, &rlp, &x);
    r1.s[0] += A(1);
    r1.s[1] += x;
    r1.s[2] += lp;
    r1.s[3] += rlp;
    r1.s[4] += expm1_minus_y(x);
    r1.s[5] += vexp(xc + xc);
    r1.s[6] += vabs(x);
    r1.mx = vmax(r1.mx, vabs(x));
  }
  r1 = block_row_acc(r1);
  if (threadIdx.x == 0) {
    const A n = r1.s[0];
    const A s = rc_row_logratio(p.level, n, r1.s[1]);
    const A raw = rc_row_raw(s, p.clamp);
    out[kRsCount] = n;
    out[kRsSumLogratio] = r1.s[1];
    out[kRsSumLogprobs] = r1.s[2];
    out[kRsSumRolloutLogprobs] = r1.s[3];
    out[kRsSumK3] = r1.s[4];
    out[kRsSumRatioSq] = r1.s[5];
    out[kRsSumAbsLogratio] = r1.s[6];
    out[kRsMaxAbsLogratio] = r1.mx;
    out[kRsSeqLogratio] = s;
    out[kRsSeqWeight] = rc_bound(raw, p.mode, p.lower, p.upper);
    s_row[0] = n;
    s_row[1] = raw;
  }
  __syncthreads();
  const A n = s_row[0], raw_row = s_row[1];

  // ---- 2. per sequence criterion: sum and max of its statistic over the valid tokens
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] == kRcAggToken) continue;  // uniform over the block
    RowAcc<A, 1> r = row_acc_identity<A, 1>();
    for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
      if (!mask_valid(mask, base + t)) continue;
      A lp, rlp, x;
      const A xc = load(base + t, &lp, &rlp, &x);
      const A st = rc_estimator(p.est[c], xc, lp, rlp);
      r.s[0] += st;
      r.mx = vmax(r.mx, st);
    }
    r = block_row_acc(r);
    if (threadIdx.x == 0) {
      const A v = rc_seq_value(p.agg[c], n, r.s[0], r.mx);
      s_keep[c] = rc_seq_criterion_stats(p, c, v, n, cstats + kRcCritStats * c);
    }
  }
  __syncthreads();

  // ---- 3. weights and rejection mask: sum w, sum w^2, count high, count low, sum raw, count
  // rejected; max w, min w
  RowAcc<A, 6> r3 = row_acc_identity<A, 6>();
  for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
    const int64_t i = base + t;
    if (!mask_valid(mask, i)) {
      w_out[i] = A(0);
      mask_store(mask, i, false);
      continue;
    }
    A lp, rlp, x;
    const A xc = load(i, &lp, &rlp, &x);
    const A raw = p.level == kRcToken ? vexp(xc) : raw_row;
    const A w = rc_bound(raw, p.mode, p.lower, p.upper);
    w_out[i] = w;
    bool keep = true;
    for (int c = 0; c < p.n_crit; ++c) {
      const A in = p.agg[c] == kRcAggToken
                       ? rc_inside(rc_estimator(p.est[c], xc, lp, rlp), p.lo[c], p.hi[c])
                       : s_keep[c];
      keep = keep && in > A(0);
    }
    mask_store(mask, i, keep);
    r3.s[0] += w;
    r3.s[1] += w * w;
    r3.s[2] += raw > A(p.upper) ? A(1) : A(0);
    r3.s[3] += raw < A(p.report_low) ? A(1) : A(0);
    r3.s[4] += raw;
    r3.s[5] += keep ? A(0) : A(1);
    r3.mx = vmax(r3.mx, w);
    r3.mn = vmin(r3.mn, w);
  }
  r3 = block_row_acc(r3);
  if (threadIdx.x == 0) {
    out[kRsSumWeights] = r3.s[0];
    out[kRsSumWeightsSq] = r3.s[1];
    out[kRsMaxWeight] = r3.mx;
    out[kRsMinWeight] = r3.mn;
    out[kRsCountHigh] = r3.s[2];
    out[kRsCountLow] = r3.s[3];
    out[kRsSumRawWeights] = r3.s[4];
    out[kRsCountRejected] = r3.s[5];
  }

  // ---- 4. per token criterion: sum, count high, count low, sum clamped, its square, count
  // rejected; max, min of its statistic
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] != kRcAggToken) continue;
    const A lo = A(p.lo[c]), hi = A(p.hi[c]), clo = A(p.clo[c]);
    RowAcc<A, 6> r = row_acc_identity<A, 6>();
    for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
      if (!mask_valid(mask, base + t)) continue;
      A lp, rlp, x;
      const A xc = load(base + t, &lp, &rlp, &x);
      const A st = rc_estimator(p.est[c], xc, lp, rlp);
      const A sc = vclamp(st, clo, hi);
      r.s[0] += st;
      r.s[1] += st > hi ? A(1) : A(0);
      r.s[2] += st < lo ? A(1) : A(0);
      r.s[3] += sc;
      r.s[4] += sc * sc;
      r.s[5] += A(1) - rc_inside(st, p.lo[c], p.hi[c]);
      r.mx = vmax(r.mx, st);
      r.mn = vmin(r.mn, st);
    }
    r = block_row_acc(r);
    if (threadIdx.x == 0) {
      const A acc[kRcTokAcc] = {r.s[0], r.mx, r.mn, r.s[1], r.s[2], r.s[3], r.s[4], r.s[5]};
      rc_token_criterion_stats(n, acc, cstats + kRcCritStats * c);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t rollout_correction_fwd(const T* logprobs, const T* rollout_logprobs,
                                   const uint8_t* mask, uint8_t* keep, int mask_width,
                                   bool mask_floating, uint64_t one_bits, acc_t<T>* weights,
                                   acc_t<T>* row_stats, int64_t rows, int64_t width,
                                   const RcParams& p, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const uint64_t nosign =
      mask_floating ? ~(uint64_t(1) << (8 * mask_width - 1)) : ~uint64_t(0);
  const MaskIO m{mask, keep, mask_width, nosign, one_bits};
  rollout_correction_row_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logprobs, rollout_logprobs, m, weights, row_stats, width, p.n_cols(), p);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                  \
  template cudaError_t rollout_correction_fwd<T>(const T*, const T*, const uint8_t*,       \
                                                 uint8_t*, int, bool, uint64_t, acc_t<T>*, \
                                                 acc_t<T>*, int64_t, int64_t,              \
                                                 const RcParams&, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/cuda_dispatch.h"
#include "ppokernels/rollout_correction_args.h"

namespace ppokernels {

std::tuple<Tensor, Tensor, Tensor> rollout_correction_cuda(
    const Tensor& logprobs, const Tensor& rollout_logprobs, const Tensor& mask,
    const std::string& level, const std::string& mode, std::vector<double> bounds,
    std::optional<double> logratio_clamp, std::vector<int64_t> criteria,
    std::vector<double> criteria_bounds) {
  const cuda::Guard guard(logprobs);
  RcArgs k = rollout_correction_args(logprobs, rollout_logprobs, mask, level, mode, bounds,
                                     logratio_clamp, criteria, criteria_bounds);
  cuda::check_grid_rows("rollout_correction", k.B);
  const ScalarType mt = k.mask.scalar_type();
  const auto* mask_bytes = static_cast<const uint8_t*>(k.mask.const_data_ptr());
  auto* keep_bytes = static_cast<uint8_t*>(k.keep.mutable_data_ptr());
  PPK_DISPATCH_FLOATING(k.lp.scalar_type(), "rollout_correction_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK(cuda::rollout_correction_fwd<T>(
        cuda::ptr<scalar_t>(k.lp), cuda::ptr<scalar_t>(k.rlp), mask_bytes, keep_bytes,
        rc_mask_width(mt), rc_mask_floating(mt), rc_one_bits(mt),
        k.weights.mutable_data_ptr<A>(), k.row_stats.mutable_data_ptr<A>(), k.B, k.T, k.p,
        cuda::stream()));
  });
  return {k.weights, k.keep, k.row_stats};
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("rollout_correction", TORCH_BOX(&rollout_correction_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
