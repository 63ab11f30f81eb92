// CPU kernels of the linear_logprobs family: per-token label logit, log-sum-exp and entropy
// straight from hidden states [N, H] and the lm_head weight [V, H], never building [N, V] logits.
//
// Rows whose label is ignore_index are compacted out first. Valid rows are processed in chunks of
// R rows (R from the caller's memory budget, padded to a multiple of kRowAlign); for each chunk
// the vocabulary is walked in fixed blocks of kVocabBlock columns:
//   forward:  logits = rows @ W_blk^T (at::mm into a reusable fp32 buffer), then one fused SIMD
//             pass per row updates its SoftmaxStats and picks the label logit;
//   backward: the same matmul recomputes the block bit for bit, a fused pass turns it into
//             dlogits in place, then grad_hidden += dlogits @ W_blk and
//             grad_weight[blk] += dlogits^T @ rows (addmm_, fp32), grad_bias[blk] += column sums.
// Determinism: a row's statistics are merged over the same vocabulary blocks in the same order
// whatever N or R is, and MKL's sgemm gives a row the same bits for every M that is a multiple of
// 16 (it switches to other kernels for M < 8), hence the zero-padded row chunks. Setup (checks,
// the row compaction and the chunk plan) in ppokernels/linear_logprobs_args.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ppokernels/cpu_vec.h"
#include "ppokernels/linear_logprobs_args.h"

namespace ppokernels {
namespace {

// Copies the hidden rows rows[r0 .. r0 + cnt) into buf [R, H] (acc_t), zeroing the padding.
template <typename scalar_t, typename acc_t>
void gather_rows(const at::Tensor& hidden, const std::vector<int64_t>& rows, int64_t r0,
                 int64_t cnt, at::Tensor& buf) {
  const int64_t H = hidden.size(1);
  const scalar_t* h = hidden.data_ptr<scalar_t>();
  acc_t* out = buf.data_ptr<acc_t>();
  at::parallel_for(0, buf.size(0), 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t* dst = out + i * H;
      if (i < cnt) {
        const scalar_t* src = h + rows[r0 + i] * H;
        for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<acc_t>(src[k]);
      } else {
        std::fill(dst, dst + H, acc_t(0));
      }
    }
  });
}

// Softmax statistics of z_j = (x_j + b_j) * inv_t over one row of a vocabulary block (two passes
// over an L1-resident row: max, then sum exp and sum exp * (z - max)). b may be null.
template <typename acc_t>
SoftmaxStats<acc_t> block_stats(const acc_t* x, const acc_t* b, int64_t n, acc_t inv_t) {
  auto z = [&](int64_t j) { return (x[j] + (b ? b[j] : acc_t(0))) * inv_t; };
  acc_t m = -INFINITY;
  acc_t s = 0, u = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const VecF vt(inv_t);
    auto zv = [&](int64_t k) {
      VecF v = VecF::loadu(x + k);
      return (b ? v + VecF::loadu(b + k) : v) * vt;
    };
    VecF vm(-INFINITY);
    for (; j + VecF::size() <= n; j += VecF::size()) vm = at::vec::maximum(vm, zv(j));
    m = hmax(vm, m);
    for (int64_t k = j; k < n; ++k) m = std::max(m, z(k));
    if (m == -INFINITY) return {m, acc_t(0), acc_t(0)};  // an all -inf block adds nothing
    const VecF vmax(m), lowest(-FLT_MAX);
    VecF vs(0.f), vu(0.f);
    for (j = 0; j + VecF::size() <= n; j += VecF::size()) {
      const VecF d = zv(j) - vmax;
      const VecF e = vexp(d);
      vs = vs + e;
      vu = at::vec::fmadd(e, at::vec::maximum(d, lowest), vu);  // -inf column: 0 * -FLT_MAX
    }
    s = hsum(vs);
    u = hsum(vu);
  } else {
    for (int64_t k = 0; k < n; ++k) m = std::max(m, z(k));
    if (m == -INFINITY) return {m, acc_t(0), acc_t(0)};
    j = 0;
  }
  for (; j < n; ++j) {
    const acc_t d = z(j) - m;
    const acc_t e = std::exp(d);
    s += e;
    u += e * std::max(d, acc_t(-FLT_MAX));  // e * d with d = -inf would be 0 * -inf = NaN
  }
  return {m, s, u};
}

// dlogits of one row of a block, in place: x_j -> dz_j / T (see linear_logprobs.h).
template <typename acc_t>
void block_grad(acc_t* x, const acc_t* bias, int64_t n, int64_t label, acc_t inv_t, acc_t lse,
                acc_t ent, acc_t a, acc_t b, acc_t c) {
  if (a == acc_t(0) && b == acc_t(0) && c == acc_t(0)) {
    std::fill(x, x + n, acc_t(0));
    return;
  }
  acc_t logp_y = 0;
  if (label >= 0 && label < n) logp_y = (x[label] + (bias ? bias[label] : acc_t(0))) * inv_t - lse;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const VecF vt(inv_t), vl(lse), ve(ent), vb(b), vc(c);
    for (; j + VecF::size() <= n; j += VecF::size()) {
      VecF v = VecF::loadu(x + j);
      if (bias) v = v + VecF::loadu(bias + j);
      const VecF logp = v * vt - vl;
      (linear_logprobs_dz(logp, vb, vc, ve) * vt).store(x + j);
    }
  }
  for (; j < n; ++j) {
    const acc_t logp = (x[j] + (bias ? bias[j] : acc_t(0))) * inv_t - lse;
    x[j] = linear_logprobs_dz(logp, b, c, ent) * inv_t;
  }
  if (label >= 0 && label < n) x[label] = linear_logprobs_dz_label(logp_y, a, b, c, ent) * inv_t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_cpu(
    const at::Tensor& hidden_, const at::Tensor& weight_, const at::Tensor& labels_,
    const std::optional<at::Tensor>& bias_, double temperature, int64_t ignore_index,
    int64_t vocab_start, int64_t chunk_size) {
  const LinearLogprobsPlan p = linear_logprobs_plan("linear_logprobs", hidden_, weight_, labels_,
                                                    bias_, ignore_index, chunk_size);
  const auto &hidden = p.hidden, &weight = p.weight, &labels = p.labels;
  const auto acc = acc_dtype(hidden);
  const int64_t N = hidden.size(0);
  auto opts = hidden.options().dtype(acc);
  auto label_logit = at::zeros({N}, opts), lse = at::zeros({N}, opts), ent = at::zeros({N}, opts);
  const int64_t n = static_cast<int64_t>(p.rows.size());
  if (n == 0 || p.V == 0) return {label_logit, lse, ent};
  const auto bias = bias_ ? std::optional<at::Tensor>(bias_->to(acc).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "llp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = acc_t(1.0 / temperature);
    const int64_t* y = labels.data_ptr<int64_t>();
    const acc_t* bp = bias ? bias->data_ptr<acc_t>() : nullptr;
    auto hbuf = at::empty({p.R, p.H}, opts);
    auto lbuf = at::empty({p.R * std::min(kVocabBlock, p.V)}, opts);
    std::vector<SoftmaxStats<acc_t>> st(p.R);
    acc_t* out_y = label_logit.data_ptr<acc_t>();
    acc_t* out_lse = lse.data_ptr<acc_t>();
    acc_t* out_ent = ent.data_ptr<acc_t>();
    for (int64_t r0 = 0; r0 < n; r0 += p.R) {
      const int64_t cnt = std::min(p.R, n - r0);
      gather_rows<scalar_t, acc_t>(hidden, p.rows, r0, cnt, hbuf);
      std::fill(st.begin(), st.end(), softmax_stats_init<acc_t>());
      std::vector<acc_t> zy(cnt, acc_t(0));
      for (int64_t c0 = 0; c0 < p.V; c0 += kVocabBlock) {
        const int64_t vc = std::min(kVocabBlock, p.V - c0);
        auto logits = lbuf.narrow(0, 0, p.R * vc).view({p.R, vc});
        at::mm_out(logits, hbuf, weight.narrow(0, c0, vc).to(acc).t());
        const acc_t* x = logits.data_ptr<acc_t>();
        at::parallel_for(0, cnt, 8, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const acc_t* xi = x + i * vc;
            const acc_t* bi = bp ? bp + c0 : nullptr;
            st[i] = linear_logprobs_merge(st[i], block_stats(xi, bi, vc, inv_t));
            const int64_t local = y[p.rows[r0 + i]] - vocab_start - c0;
            if (local >= 0 && local < vc) zy[i] = (xi[local] + (bi ? bi[local] : acc_t(0))) * inv_t;
          }
        });
      }
      for (int64_t i = 0; i < cnt; ++i) {
        const int64_t row = p.rows[r0 + i];
        out_y[row] = zy[i];
        out_lse[row] = softmax_stats_lse(st[i]);
        out_ent[row] = softmax_stats_entropy(st[i]);
      }
    }
  });
  return {label_logit, lse, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward_cpu(
    const at::Tensor& grad_label_logit, const at::Tensor& grad_lse, const at::Tensor& grad_ent,
    const at::Tensor& hidden_, const at::Tensor& weight_, const at::Tensor& labels_,
    const std::optional<at::Tensor>& bias_, const at::Tensor& lse_, const at::Tensor& ent_,
    double temperature, int64_t ignore_index, int64_t vocab_start, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  const LinearLogprobsPlan p = linear_logprobs_plan("linear_logprobs_backward", hidden_, weight_,
                                                    labels_, bias_, ignore_index, chunk_size);
  const auto &hidden = p.hidden, &weight = p.weight, &labels = p.labels;
  const auto acc = acc_dtype(hidden);
  const int64_t N = hidden.size(0);
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias_;
  auto opts = hidden.options().dtype(acc);
  auto gh = need_h ? at::zeros({N, p.H}, hidden.options()) : at::empty({0}, hidden.options());
  // fp32 accumulators for grad_weight / grad_bias across row chunks, cast once at the end
  auto gw = need_w ? at::zeros({p.V, p.H}, opts) : at::empty({0}, opts);
  auto gb = need_b ? at::zeros({p.V}, opts) : at::empty({0}, opts);
  const int64_t n = static_cast<int64_t>(p.rows.size());
  if (n > 0 && p.V > 0 && (need_h || need_w || need_b)) {
    const auto ga = grad_label_logit.to(acc).contiguous();
    const auto gl = grad_lse.to(acc).contiguous();
    const auto ge = grad_ent.to(acc).contiguous();
    const auto lse = lse_.to(acc).contiguous();
    const auto ent = ent_.to(acc).contiguous();
    const auto bias = bias_ ? std::optional<at::Tensor>(bias_->to(acc).contiguous()) : std::nullopt;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "llp_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t inv_t = acc_t(1.0 / temperature);
      const int64_t* y = labels.data_ptr<int64_t>();
      const acc_t* bp = bias ? bias->data_ptr<acc_t>() : nullptr;
      const acc_t *pa = ga.data_ptr<acc_t>(), *pl = gl.data_ptr<acc_t>();
      const acc_t *pe = ge.data_ptr<acc_t>(), *plse = lse.data_ptr<acc_t>();
      const acc_t* pent = ent.data_ptr<acc_t>();
      auto hbuf = at::empty({p.R, p.H}, opts);
      auto ghbuf = need_h ? at::empty({p.R, p.H}, opts) : at::Tensor();
      auto lbuf = at::empty({p.R * std::min(kVocabBlock, p.V)}, opts);
      for (int64_t r0 = 0; r0 < n; r0 += p.R) {
        const int64_t cnt = std::min(p.R, n - r0);
        gather_rows<scalar_t, acc_t>(hidden, p.rows, r0, cnt, hbuf);
        if (need_h) ghbuf.zero_();
        for (int64_t c0 = 0; c0 < p.V; c0 += kVocabBlock) {
          const int64_t vc = std::min(kVocabBlock, p.V - c0);
          auto dz = lbuf.narrow(0, 0, p.R * vc).view({p.R, vc});
          const auto wblk = weight.narrow(0, c0, vc).to(acc);
          at::mm_out(dz, hbuf, wblk.t());
          acc_t* x = dz.data_ptr<acc_t>();
          const acc_t* bi = bp ? bp + c0 : nullptr;
          at::parallel_for(0, cnt, 8, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              const int64_t row = p.rows[r0 + i];
              block_grad(x + i * vc, bi, vc, y[row] - vocab_start - c0, inv_t, plse[row],
                         pent[row], pa[row], pl[row], -pe[row]);
            }
          });
          // padded rows of dz are exact zeros (zero hidden rows), so they add nothing below
          if (need_h) ghbuf.addmm_(dz, wblk);
          if (need_w) gw.narrow(0, c0, vc).addmm_(dz.t(), hbuf);
          if (need_b) {
            acc_t* g = gb.data_ptr<acc_t>() + c0;
            for (int64_t i = 0; i < cnt; ++i) {  // rows in order: a fixed summation order
              for (int64_t j = 0; j < vc; ++j) g[j] += x[i * vc + j];
            }
          }
        }
        if (need_h) {
          const auto idx = at::tensor(std::vector<int64_t>(p.rows.begin() + r0,
                                                           p.rows.begin() + r0 + cnt));
          gh.index_copy_(0, idx, ghbuf.narrow(0, 0, cnt).to(gh.scalar_type()));
        }
      }
    });
  }
  return {gh, need_w ? gw.to(weight.scalar_type()) : gw,
          need_b ? gb.to(bias_->scalar_type()) : gb};
}

TORCH_LIBRARY_IMPL(ppokernels, CPU, m) {
  m.impl("linear_logprobs", &linear_logprobs_cpu);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward_cpu);
}

}  // namespace ppokernels
