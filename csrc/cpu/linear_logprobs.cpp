// CPU front end of the linear_logprobs family: per-token label logit, log-sum-exp and entropy
// straight from hidden states [N, H] and the lm_head weight [V, H], never building [N, V] logits.
// The chunk loop is ppokernels/linear_logprobs_chunks.h (shared with the CUDA front end); this
// file is its CPU policy: GEMMs by torch's BLAS (aten::mm) in the accumulation dtype (fp32,
// fp64), and fused SIMD epilogues per row of each vocabulary block (statistics in the forward,
// dlogits in the backward: in place, or from a tile of the logits cache). Determinism: MKL's sgemm gives a row the same bits for
// every M that is a multiple of 16 (it switches to other kernels for M < 8), hence the
// zero-padded row chunks.
#include <cfloat>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/linear_logprobs_chunks.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

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
    for (; j + VecF::size() <= n; j += VecF::size()) vm = maximum(vm, zv(j));
    m = hmax(vm, m);
    for (int64_t k = j; k < n; ++k) m = std::max(m, z(k));
    if (m == -INFINITY) return {m, acc_t(0), acc_t(0)};  // an all -inf block adds nothing
    const VecF vmax(m), lowest(-FLT_MAX);
    VecF vs(0.f), vu(0.f);
    for (j = 0; j + VecF::size() <= n; j += VecF::size()) {
      const VecF d = zv(j) - vmax;
      const VecF e = vexp(d);
      vs = vs + e;
      vu = fmadd(e, maximum(d, lowest), vu);  // -inf column: 0 * -FLT_MAX
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

// dlogits of one row of a block: out_j = dz_j / T of the logits x_j (see linear_logprobs.h); out
// may be x (in place: the label's logit is read before the row is written).
template <typename acc_t>
void block_grad(const acc_t* x, acc_t* out, const acc_t* bias, int64_t n, int64_t label,
                acc_t inv_t, acc_t lse, acc_t ent, acc_t a, acc_t b, acc_t c) {
  if (a == acc_t(0) && b == acc_t(0) && c == acc_t(0)) {
    std::fill(out, out + n, acc_t(0));
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
      (linear_logprobs_dz(logp, vb, vc, ve) * vt).store(out + j);
    }
  }
  for (; j < n; ++j) {
    const acc_t logp = (x[j] + (bias ? bias[j] : acc_t(0))) * inv_t - lse;
    out[j] = linear_logprobs_dz(logp, b, c, ent) * inv_t;
  }
  if (label >= 0 && label < n) out[label] = linear_logprobs_dz_label(logp_y, a, b, c, ent) * inv_t;
}

// Copies the hidden rows `rows` into buf [R, H] (acc_t), zeroing the padding rows.
template <typename scalar_t, typename acc_t>
void gather_rows(const Tensor& hidden, const Tensor& rows, Tensor& buf) {
  const int64_t H = hidden.size(1), cnt = rows.numel();
  const int64_t* idx = rows.const_data_ptr<int64_t>();
  const scalar_t* h = hidden.const_data_ptr<scalar_t>();
  acc_t* out = buf.mutable_data_ptr<acc_t>();
  torch::stable::parallel_for(0, buf.size(0), 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t* dst = out + i * H;
      if (i < cnt) {
        const scalar_t* src = h + idx[i] * H;
        for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<acc_t>(src[k]);
      } else {
        std::fill(dst, dst + H, acc_t(0));
      }
    }
  });
}

template <typename acc_t>
const acc_t* bias_ptr(const Tensor& bias) {
  return bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
}

// dst += src, both contiguous, of the same shape, in the accumulation dtype (the "+=" of the
// gradient GEMMs, whose products come into a scratch tensor: see linear_logprobs_chunks.h).
void add_into(Tensor& dst, const Tensor& src) {
  PPK_DISPATCH_FP32_FP64(dst.scalar_type(), "llp_add", [&] {
    scalar_t* d = dst.mutable_data_ptr<scalar_t>();
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    parallel_for_work(dst.numel(), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) d[i] += s[i];
    });
  });
}

// The CPU policy of linear_logprobs_chunks.h.
struct CpuDev {
  struct Guard {
    explicit Guard(const Tensor&) {}
  };
  static constexpr bool kFixedRows = false;  // MKL: same bits for every M multiple of 16
  static ScalarType gemm_dtype(ScalarType input) { return acc_dtype(input); }

  // The ascending rows whose label is not ignore_index, read on the host (labels contiguous).
  static Tensor valid_rows(const Tensor& labels, int64_t ignore_index) {
    const int64_t N = labels.numel();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    int64_t n = 0;
    for (int64_t i = 0; i < N; ++i) n += y[i] != ignore_index;
    Tensor rows = empty({n}, kLong, labels);
    int64_t* r = rows.mutable_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      if (y[i] != ignore_index) *r++ = i;
    }
    return rows;
  }
  static void gather(const Tensor& hidden, const Tensor& rows, Tensor& hbuf) {
    PPK_DISPATCH_FLOATING(hidden.scalar_type(), "llp_gather", [&] {
      gather_rows<scalar_t, acc_type<scalar_t>>(hidden, rows, hbuf);
    });
  }
  static Tensor weight_block(const Tensor& w, int64_t c0, int64_t vc) {
    return to_dtype(llp::slice(w, 0, c0, vc), acc_dtype(w));
  }
  static void logits(Tensor& out, const Tensor& hbuf, const Tensor& wblk) {
    mm_out(out, hbuf, t(wblk));
  }
  static void fold(FoldArgs& f) {
    PPK_DISPATCH_FP32_FP64(f.logits.scalar_type(), "llp_fold", [&] {
      using acc_t = scalar_t;
      const acc_t* x = f.logits.const_data_ptr<acc_t>();
      const acc_t* bi = bias_ptr<acc_t>(f.bias);
      const int64_t* lab = f.labels.const_data_ptr<int64_t>();
      const int64_t off = f.label_offset;
      auto* st = reinterpret_cast<SoftmaxStats<acc_t>*>(f.stats.mutable_data_ptr<acc_t>());
      acc_t* zy = f.label_logit.mutable_data_ptr<acc_t>();
      const acc_t inv_t = acc_t(f.inv_t);
      const int64_t vc = f.vc;
      torch::stable::parallel_for(0, f.cnt, 8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const acc_t* xi = x + i * vc;
          const int64_t y = lab[i] - off;  // the block-local label column
          st[i] = linear_logprobs_merge(st[i], block_stats(xi, bi, vc, inv_t));
          if (y >= 0 && y < vc) zy[i] = (xi[y] + (bi ? bi[y] : acc_t(0))) * inv_t;
        }
      });
    });
  }
  static void finish(FinishArgs& a) {
    PPK_DISPATCH_FP32_FP64(a.lse.scalar_type(), "llp_finish", [&] {
      const auto* st =
          reinterpret_cast<const SoftmaxStats<scalar_t>*>(a.stats.const_data_ptr<scalar_t>());
      scalar_t *lse = a.lse.mutable_data_ptr<scalar_t>(), *ent = a.ent.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < a.cnt; ++i) {
        lse[i] = softmax_stats_lse(st[i]);
        ent[i] = softmax_stats_entropy(st[i]);
      }
    });
  }
  static void dz(DzArgs& d) {
    PPK_DISPATCH_FP32_FP64(d.logits.scalar_type(), "llp_dz", [&] {
      using acc_t = scalar_t;
      const acc_t* x = d.src.const_data_ptr<acc_t>();
      acc_t* out = d.logits.mutable_data_ptr<acc_t>();
      const acc_t* bi = bias_ptr<acc_t>(d.bias);
      const int64_t* y = d.labels.const_data_ptr<int64_t>();
      const int64_t off = d.label_offset;
      const acc_t *lse = d.lse.const_data_ptr<acc_t>(), *ent = d.ent.const_data_ptr<acc_t>();
      const acc_t *a = d.a.const_data_ptr<acc_t>(), *b = d.b.const_data_ptr<acc_t>(),
                  *c = d.c.const_data_ptr<acc_t>();
      const acc_t inv_t = acc_t(d.inv_t);
      const int64_t vc = d.vc;
      torch::stable::parallel_for(0, d.cnt, 8, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          block_grad(x + i * vc, out + i * vc, bi, vc, y[i] - off, inv_t, lse[i], ent[i], a[i],
                     b[i], c[i]);
        }
      });
    });
  }
  // gh += dz @ wblk and gw_blk += dz^T @ hbuf: the product into scratch, then added in.
  static void grad_hidden(Tensor& gh, const Tensor& dz, const Tensor& wblk, Tensor& scratch) {
    mm_out(scratch, dz, wblk);
    add_into(gh, scratch);
  }
  static void grad_weight(Tensor gw_blk, const Tensor& dz, const Tensor& hbuf, Tensor scratch) {
    mm_out(scratch, t(dz), hbuf);
    add_into(gw_blk, scratch);
  }
  static void column_sums(Tensor gb, const Tensor& dz, int64_t cnt) {
    PPK_DISPATCH_FP32_FP64(dz.scalar_type(), "llp_bias", [&] {
      scalar_t* g = gb.mutable_data_ptr<scalar_t>();
      const scalar_t* x = dz.const_data_ptr<scalar_t>();
      const int64_t vc = dz.size(1);
      for (int64_t i = 0; i < cnt; ++i) {  // rows in order: a fixed summation order
        for (int64_t j = 0; j < vc; ++j) g[j] += x[i * vc + j];
      }
    });
  }
};

}  // namespace

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_linear_logprobs(Library& m) {
  m.impl("linear_logprobs", TORCH_BOX(&linear_logprobs_op<CpuDev>));
  m.impl("linear_logprobs_backward", TORCH_BOX(&linear_logprobs_backward_op<CpuDev>));
}

}  // namespace ppokernels::CPU_CAPABILITY
