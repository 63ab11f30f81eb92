// The chunk loop of linear_logprobs, written once for every device: the CPU front end
// (cpu/linear_logprobs.cpp) and the CUDA one (cuda/linear_logprobs.cu) run this same loop and
// differ only in their `Dev` policy: how a GEMM is called (ATen on CPU in the accumulation dtype;
// cuBLAS through ATen on CUDA, half inputs with fp32 outputs) and the fused epilogue that follows
// each GEMM (a SIMD pass on CPU, a kernel on CUDA). So the CPU tests exercise the orchestration the
// GPU runs.
//
// Rows whose label is ignore_index are compacted out first (`rows`, on the device). Valid rows go
// in chunks of R rows, zero-padded to R (a fixed GEMM shape); for each chunk the vocabulary is
// walked in fixed blocks of kVocabBlock columns:
//   forward:  logits = rows @ W_blk^T into a reusable fp32 buffer, then Dev::fold merges each row's
//             SoftmaxStats and picks its label logit; Dev::finish turns the stats into lse, entropy;
//   backward: the same GEMM recomputes the block bit for bit, Dev::dz turns it into dlogits in
//             place, then grad_hidden += dlogits @ W_blk, grad_weight[blk] += dlogits^T @ rows,
//             grad_bias[blk] += column sums (Dev::column_sums, fixed order).
// A row's statistics are merged over the same blocks in the same order whatever N or R is.
//
// The Dev policy (see the two front ends):
//   using Guard = ...;                          constructed from the inputs' device (CUDAGuard)
//   static constexpr bool kFixedRows;           R never shrinks to the number of valid rows
//   static at::ScalarType gemm_dtype(at::ScalarType input);
//   static void gather(const at::Tensor& hidden, const at::Tensor& rows, at::Tensor& hbuf);
//   static at::Tensor weight_block(const at::Tensor& weight, int64_t c0, int64_t vc);
//   static void logits(at::Tensor& out, const at::Tensor& hbuf, const at::Tensor& wblk);
//   static void fold(FoldArgs&);  static void finish(FinishArgs&);  static void dz(DzArgs&);
//   static void grad_hidden(at::Tensor& gh, const at::Tensor& dz, const at::Tensor& wblk);
//   static void grad_weight(at::Tensor gw_blk, const at::Tensor& dz, const at::Tensor& hbuf);
//   static void column_sums(at::Tensor gb_blk, const at::Tensor& dz, int64_t cnt);
#pragma once
#include <ATen/ATen.h>

#include "ppokernels/linear_logprobs_args.h"

namespace ppokernels {

// The fp32 (fp64) softmax statistics of a chunk's rows, [R, 3] = (m, s, u) of SoftmaxStats.
inline at::Tensor stats_buffer(int64_t R, const at::TensorOptions& opts) {
  auto st = at::empty({R, 3}, opts);
  st.select(1, 0).fill_(-INFINITY);
  st.narrow(1, 1, 2).zero_();
  return st;
}

// One vocabulary block of one chunk, for the epilogues. Pointers are acc_t (fp32, fp64).
struct BlockArgs {
  at::Tensor logits;  // [R, vc] in: logits (no bias, no temperature); dz: out, dlogits in place
  at::Tensor bias;    // [vc] or undefined
  at::Tensor labels;  // [cnt] int64, label - (vocab_start + c0): the block-local label column
  int64_t cnt, vc;
  double inv_t;
};

struct FoldArgs : BlockArgs {
  at::Tensor stats, label_logit;  // [R, 3] running stats, [R] z_y (written when the label is here)
};

struct FinishArgs {
  at::Tensor stats, lse, ent;  // [R, 3] in; [cnt] lse and entropy out
  int64_t cnt;
};

struct DzArgs : BlockArgs {
  at::Tensor lse, ent, a, b, c;  // [cnt] per row: saved lse, entropy, and the upstream gradients
};                               // a = g_label_logit, b = g_lse, c = -g_entropy (linear_logprobs.h)

// Rows per chunk: the plan's R, or for kFixedRows devices the requested chunk (so every call
// runs the GEMMs at one shape; cuBLAS may pick another algorithm for another M).
template <typename Dev>
int64_t chunk_rows(const LinearLogprobsPlan& p, int64_t chunk_size) {
  if (!Dev::kFixedRows || chunk_size <= 0) return p.R;
  return (chunk_size + kRowAlign - 1) / kRowAlign * kRowAlign;
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_chunked(
    const LinearLogprobsPlan& p, const std::optional<at::Tensor>& bias_, double temperature,
    int64_t vocab_start, int64_t chunk_size) {
  const auto &hidden = p.hidden, &weight = p.weight;
  const auto opts = hidden.options().dtype(acc_dtype(hidden));
  const int64_t N = hidden.size(0), n = p.rows.numel(), R = chunk_rows<Dev>(p, chunk_size);
  auto label_logit = at::zeros({N}, opts), lse = at::zeros({N}, opts), ent = at::zeros({N}, opts);
  if (n == 0 || p.V == 0) return {label_logit, lse, ent};
  const auto bias = bias_ ? bias_->to(opts.dtype()).contiguous() : at::Tensor();
  auto hbuf = at::empty({R, p.H}, hidden.options().dtype(Dev::gemm_dtype(hidden.scalar_type())));
  auto lbuf = at::empty({R * std::min(kVocabBlock, p.V)}, opts);
  auto zy = at::empty({R}, opts), lse_c = at::empty({R}, opts), ent_c = at::empty({R}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t cnt = std::min(R, n - r0);
    const auto rows = p.rows.narrow(0, r0, cnt);
    Dev::gather(hidden, rows, hbuf);
    FoldArgs f;
    f.stats = stats_buffer(R, opts);
    f.label_logit = zy.zero_();
    const auto labels = p.labels.index_select(0, rows) - vocab_start;
    f.cnt = cnt;
    f.inv_t = 1.0 / temperature;
    for (int64_t c0 = 0; c0 < p.V; c0 += kVocabBlock) {
      f.vc = std::min(kVocabBlock, p.V - c0);
      f.logits = lbuf.narrow(0, 0, R * f.vc).view({R, f.vc});
      Dev::logits(f.logits, hbuf, Dev::weight_block(weight, c0, f.vc));
      f.bias = bias.defined() ? bias.narrow(0, c0, f.vc) : at::Tensor();
      f.labels = labels - c0;
      Dev::fold(f);
    }
    FinishArgs fin{f.stats, lse_c, ent_c, cnt};
    Dev::finish(fin);
    label_logit.index_copy_(0, rows, zy.narrow(0, 0, cnt));
    lse.index_copy_(0, rows, lse_c.narrow(0, 0, cnt));
    ent.index_copy_(0, rows, ent_c.narrow(0, 0, cnt));
  }
  return {label_logit, lse, ent};
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward_chunked(
    const LinearLogprobsPlan& p, const at::Tensor& grad_label_logit, const at::Tensor& grad_lse,
    const at::Tensor& grad_ent, const std::optional<at::Tensor>& bias_, const at::Tensor& lse_,
    const at::Tensor& ent_, double temperature, int64_t vocab_start, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  const auto &hidden = p.hidden, &weight = p.weight;
  const auto acc = acc_dtype(hidden);
  const auto opts = hidden.options().dtype(acc);
  const int64_t N = hidden.size(0), n = p.rows.numel(), R = chunk_rows<Dev>(p, chunk_size);
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias_;
  auto gh = need_h ? at::zeros({N, p.H}, hidden.options()) : at::empty({0}, hidden.options());
  // accumulators in the accumulation dtype across row chunks, cast once at the end
  auto gw = need_w ? at::zeros({p.V, p.H}, opts) : at::empty({0}, opts);
  auto gb = need_b ? at::zeros({p.V}, opts) : at::empty({0}, opts);
  if (n > 0 && p.V > 0 && (need_h || need_w || need_b)) {
    const auto ga = grad_label_logit.to(acc), gl = grad_lse.to(acc), gc = -grad_ent.to(acc);
    const auto lse = lse_.to(acc), ent = ent_.to(acc);
    const auto bias = bias_ ? bias_->to(acc).contiguous() : at::Tensor();
    auto hbuf = at::empty({R, p.H}, hidden.options().dtype(Dev::gemm_dtype(hidden.scalar_type())));
    auto ghbuf = need_h ? at::empty({R, p.H}, opts) : at::Tensor();
    auto lbuf = at::empty({R * std::min(kVocabBlock, p.V)}, opts);
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      const int64_t cnt = std::min(R, n - r0);
      const auto rows = p.rows.narrow(0, r0, cnt);
      Dev::gather(hidden, rows, hbuf);
      if (need_h) ghbuf.zero_();
      DzArgs d;
      const auto labels = p.labels.index_select(0, rows) - vocab_start;
      d.lse = lse.index_select(0, rows);
      d.ent = ent.index_select(0, rows);
      d.a = ga.index_select(0, rows);
      d.b = gl.index_select(0, rows);
      d.c = gc.index_select(0, rows);
      d.cnt = cnt;
      d.inv_t = 1.0 / temperature;
      for (int64_t c0 = 0; c0 < p.V; c0 += kVocabBlock) {
        d.vc = std::min(kVocabBlock, p.V - c0);
        d.logits = lbuf.narrow(0, 0, R * d.vc).view({R, d.vc});
        const auto wblk = Dev::weight_block(weight, c0, d.vc);
        Dev::logits(d.logits, hbuf, wblk);
        d.bias = bias.defined() ? bias.narrow(0, c0, d.vc) : at::Tensor();
        d.labels = labels - c0;
        Dev::dz(d);  // padded rows of dz are exact zeros (zero hidden rows): they add nothing
        if (need_h) Dev::grad_hidden(ghbuf, d.logits, wblk);
        if (need_w) Dev::grad_weight(gw.narrow(0, c0, d.vc), d.logits, hbuf);
        if (need_b) Dev::column_sums(gb.narrow(0, c0, d.vc), d.logits, cnt);
      }
      if (need_h) gh.index_copy_(0, rows, ghbuf.narrow(0, 0, cnt).to(gh.scalar_type()));
    }
  }
  return {gh, need_w ? gw.to(weight.scalar_type()) : gw,
          need_b ? gb.to(bias_->scalar_type()) : gb};
}

// The two registered ops of a front end: m.impl("linear_logprobs", &linear_logprobs_op<Dev>).
template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_op(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, double temperature, int64_t ignore_index,
    int64_t vocab_start, int64_t chunk_size) {
  const typename Dev::Guard guard(hidden.device());
  const auto p = linear_logprobs_plan("linear_logprobs", hidden, weight, labels, bias,
                                      ignore_index, chunk_size);
  return linear_logprobs_chunked<Dev>(p, bias, temperature, vocab_start, chunk_size);
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward_op(
    const at::Tensor& grad_label_logit, const at::Tensor& grad_lse, const at::Tensor& grad_ent,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& ent,
    double temperature, int64_t ignore_index, int64_t vocab_start, int64_t chunk_size,
    std::array<bool, 3> output_mask) {
  const typename Dev::Guard guard(hidden.device());
  const auto p = linear_logprobs_plan("linear_logprobs_backward", hidden, weight, labels, bias,
                                      ignore_index, chunk_size);
  return linear_logprobs_backward_chunked<Dev>(p, grad_label_logit, grad_lse, grad_ent, bias,
                                               lse, ent, temperature, vocab_start, chunk_size,
                                               output_mask);
}

}  // namespace ppokernels
