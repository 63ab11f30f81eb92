// The chunk loop of linear_logprobs, written once for every device: the CPU front end
// (cpu/linear_logprobs.cpp) and the CUDA one (cuda/linear_logprobs.cu) run this same loop and
// differ only in their `Dev` policy: how a GEMM is called (aten::mm through the stable ABI's
// dispatcher: BLAS on CPU in the accumulation dtype; cuBLAS on CUDA, half inputs with fp32 outputs)
// and the fused epilogue that follows each GEMM (a SIMD pass on CPU, a kernel on CUDA). So the CPU
// tests exercise the orchestration the GPU runs.
//
// Rows whose label is ignore_index are compacted out first (`rows`, on the device). Valid rows go
// in chunks of R rows, zero-padded to R (a fixed GEMM shape); for each chunk the vocabulary is
// walked in fixed blocks of kVocabBlock columns:
//   forward:  logits = rows @ W_blk^T into a reusable fp32 buffer, then Dev::fold merges each row's
//             SoftmaxStats and picks its label logit; Dev::finish turns the stats into lse, entropy;
//   backward: the same GEMM recomputes the block bit for bit (or the block is read from the
//             logits cache, below), Dev::dz turns it into dlogits, then
//             grad_hidden += dlogits @ W_blk, grad_weight[blk] += dlogits^T @ rows,
//             grad_bias[blk] += column sums (Dev::column_sums, fixed order).
// A row's statistics are merged over the same blocks in the same order whatever N or R is.
//
// The logits cache (cache_bytes > 0): the forward's GEMM writes the first tiles, in the order the
// loop meets them (chunk by chunk, each chunk's blocks in vocabulary order), straight into one
// flat tensor instead of the reusable buffer, as many whole tiles as fit cache_bytes; tile
// (chunk k, block c0) lies at k R V + R c0 and is [R, vc] row-major like the buffer (padding
// rows included: they are the GEMM's). The backward runs Dev::dz from a cached tile into the
// buffer instead of recomputing its GEMM: the same values, hence the same bits, with three GEMMs
// instead of four for those tiles. Tiles past the budget are recomputed as without a cache.
// The two "+= GEMM"s are a GEMM into a scratch tensor (allocated once per call, the shape of the
// destination, accumulation dtype) and an elementwise add by the Dev: the stable ABI's dispatcher
// takes no Scalar, so neither addmm_ (beta, alpha) nor add_ (alpha) can be called.
//
// The Dev policy (see the two front ends):
//   using Guard = ...;                          constructed from an input (its device: cuda::Guard)
//   static constexpr bool kFixedRows;           R never shrinks to the number of valid rows
//   static ScalarType gemm_dtype(ScalarType input);
//   static Tensor valid_rows(const Tensor& labels, int64_t ignore_index);  // ValidRowsFn
//   static void gather(const Tensor& hidden, const Tensor& rows, Tensor& hbuf);
//   static Tensor weight_block(const Tensor& weight, int64_t c0, int64_t vc);
//   static void logits(Tensor& out, const Tensor& hbuf, const Tensor& wblk);
//   static void fold(FoldArgs&);  static void finish(FinishArgs&);
//   static void dz(DzArgs&);   // d.logits = dz of d.src (the same tensor, or a cached tile)
//   static void grad_hidden(Tensor& gh, const Tensor& dz, const Tensor& wblk, Tensor& scratch);
//   static void grad_weight(Tensor gw_blk, const Tensor& dz, const Tensor& hbuf, Tensor scratch);
//   static void column_sums(Tensor gb_blk, const Tensor& dz, int64_t cnt);
#pragma once
#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "ppokernels/linear_logprobs_args.h"
#include "ppokernels/stable.h"

namespace ppokernels {

// The aten:: ops of the chunk loop that stable.h does not wrap, through the dispatcher (call_op).
namespace llp {
// x.narrow(dim, start, length) of a const x (torch::stable::narrow takes a non-const one).
inline Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  Tensor v = x;
  return torch::stable::narrow(v, dim, start, length);
}
// x.index_select(0, index)
inline Tensor index_select(const Tensor& x, const Tensor& index) {
  return call_op("aten::index_select", "", x, int64_t(0), index);
}
// x.index_copy_(0, index, source)
inline void index_copy_(const Tensor& x, const Tensor& index, const Tensor& source) {
  (void)call_op("aten::index_copy_", "", x, int64_t(0), index, source);
}
// -x
inline Tensor neg(const Tensor& x) { return call_op("aten::neg", "", x); }
}  // namespace llp

// The fp32 (fp64) softmax statistics of a chunk's rows, [R, 3] = (m, s, u) of SoftmaxStats.
inline Tensor stats_buffer(int64_t R, ScalarType dtype, const Tensor& like) {
  Tensor st = empty({R, 3}, dtype, like);
  torch::stable::fill_(torch::stable::select(st, 1, 0), -INFINITY);
  Tensor su = llp::slice(st, 1, 1, 2);
  torch::stable::zero_(su);
  return st;
}

// One vocabulary block of one chunk, for the epilogues. Pointers are acc_t (fp32, fp64).
struct BlockArgs {
  Tensor logits;  // [R, vc] in: logits (no bias, no temperature); dz: out, dlogits in place
  Tensor bias;    // [vc] or undefined
  Tensor labels;  // [cnt] int64, the rows' labels; label - label_offset is the block-local column
  int64_t label_offset;  // vocab_start + c0
  int64_t cnt, vc;
  double inv_t;
};

struct FoldArgs : BlockArgs {
  Tensor stats, label_logit;  // [R, 3] running stats, [R] z_y (written when the label is here)
};

struct FinishArgs {
  Tensor stats, lse, ent;  // [R, 3] in; [cnt] lse and entropy out
  int64_t cnt;
};

struct DzArgs : BlockArgs {
  Tensor src;  // [R, vc] the logits Dev::dz reads: `logits` itself (in place) or a cached tile
  Tensor lse, ent, a, b, c;  // [cnt] per row: saved lse, entropy, and the upstream gradients
};                           // a = g_label_logit, b = g_lse, c = -g_entropy (linear_logprobs.h)

// Bytes per entry of an accumulation dtype (fp32, fp64).
inline int64_t acc_bytes(ScalarType acc) { return acc == kDouble ? 8 : 4; }

// Elements of the logits cache for n valid rows in chunks of R, vocabulary V and a budget of
// cache_bytes (elem bytes per entry): the largest prefix of whole tiles, in loop order, that fits.
// A chunk's tiles are kVocabBlock wide but its last (V mod kVocabBlock, or kVocabBlock), so a
// partly cached chunk holds only full-width tiles.
inline int64_t logits_cache_elems(int64_t n, int64_t R, int64_t V, int64_t cache_bytes,
                                  int64_t elem) {
  if (cache_bytes <= 0 || n <= 0 || V <= 0) return 0;
  const int64_t chunks = (n + R - 1) / R, per_chunk = R * V, cap = cache_bytes / elem;
  const int64_t full = cap / per_chunk;
  if (full >= chunks) return chunks * per_chunk;
  const int64_t wide_blocks = (V - 1) / kVocabBlock;  // full-width tiles before a chunk's last
  const int64_t more = std::min(wide_blocks, (cap - full * per_chunk) / (R * kVocabBlock));
  return full * per_chunk + more * R * kVocabBlock;
}

// Offset in the logits cache of tile (chunk starting at valid row r0, block c0); the tile is
// cached iff offset + R vc <= cache.numel().
inline int64_t logits_cache_offset(int64_t r0, int64_t c0, int64_t R, int64_t V) {
  return r0 / R * R * V + R * c0;
}

// [R, vc] view of a flat buffer at `offset`.
inline Tensor tile_view(const Tensor& flat, int64_t offset, int64_t R, int64_t vc) {
  return torch::stable::view(llp::slice(flat, 0, offset, R * vc), {R, vc});
}

// Rows per chunk: the plan's R, or for kFixedRows devices the requested chunk (so every call
// runs the GEMMs at one shape; cuBLAS may pick another algorithm for another M).
template <typename Dev>
int64_t chunk_rows(const LinearLogprobsPlan& p, int64_t chunk_size) {
  if (!Dev::kFixedRows || chunk_size <= 0) return p.R;
  return (chunk_size + kRowAlign - 1) / kRowAlign * kRowAlign;
}

// Returns (label_logit, lse, entropy, logits cache); the cache is [0] when cache_bytes is 0.
template <typename Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_logprobs_chunked(
    const LinearLogprobsPlan& p, const std::optional<Tensor>& bias_, double temperature,
    int64_t vocab_start, int64_t chunk_size, int64_t cache_bytes) {
  const auto &hidden = p.hidden, &weight = p.weight;
  const ScalarType acc = acc_dtype(hidden);
  const int64_t N = hidden.size(0), n = p.rows.numel(), R = chunk_rows<Dev>(p, chunk_size);
  auto label_logit = zeros({N}, acc, hidden), lse = zeros({N}, acc, hidden),
       ent = zeros({N}, acc, hidden);
  const int64_t cache_n = logits_cache_elems(n, R, p.V, cache_bytes, acc_bytes(acc));
  const Tensor cache = empty({cache_n}, acc, hidden);
  if (n == 0 || p.V == 0) return {label_logit, lse, ent, cache};
  const Tensor bias = bias_ ? as_contiguous(to_dtype(*bias_, acc)) : Tensor();
  Tensor hbuf = empty({R, p.H}, Dev::gemm_dtype(hidden.scalar_type()), hidden);
  // the reusable logits buffer, for the tiles the cache does not hold
  const bool all_cached = cache_n == (n + R - 1) / R * R * p.V;
  const Tensor lbuf = empty({all_cached ? 0 : R * std::min(kVocabBlock, p.V)}, acc, hidden);
  Tensor zy = empty({R}, acc, hidden), lse_c = empty({R}, acc, hidden),
         ent_c = empty({R}, acc, hidden);
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t cnt = std::min(R, n - r0);
    const Tensor rows = llp::slice(p.rows, 0, r0, cnt);
    Dev::gather(hidden, rows, hbuf);
    FoldArgs f;
    f.stats = stats_buffer(R, acc, hidden);
    f.label_logit = torch::stable::zero_(zy);
    f.labels = llp::index_select(p.labels, rows);
    f.cnt = cnt;
    f.inv_t = 1.0 / temperature;
    for (int64_t c0 = 0; c0 < p.V; c0 += kVocabBlock) {
      f.vc = std::min(kVocabBlock, p.V - c0);
      const int64_t off = logits_cache_offset(r0, c0, R, p.V);
      const bool cached = off + R * f.vc <= cache_n;
      f.logits = cached ? tile_view(cache, off, R, f.vc) : tile_view(lbuf, 0, R, f.vc);
      Dev::logits(f.logits, hbuf, Dev::weight_block(weight, c0, f.vc));
      f.bias = bias.defined() ? llp::slice(bias, 0, c0, f.vc) : Tensor();
      f.label_offset = vocab_start + c0;
      Dev::fold(f);
    }
    FinishArgs fin{f.stats, lse_c, ent_c, cnt};
    Dev::finish(fin);
    llp::index_copy_(label_logit, rows, llp::slice(zy, 0, 0, cnt));
    llp::index_copy_(lse, rows, llp::slice(lse_c, 0, 0, cnt));
    llp::index_copy_(ent, rows, llp::slice(ent_c, 0, 0, cnt));
  }
  return {label_logit, lse, ent, cache};
}

template <typename Dev>
std::tuple<Tensor, Tensor, Tensor> linear_logprobs_backward_chunked(
    const LinearLogprobsPlan& p, const Tensor& grad_label_logit, const Tensor& grad_lse,
    const Tensor& grad_ent, const std::optional<Tensor>& bias_, const Tensor& lse_,
    const Tensor& ent_, const Tensor& cache, double temperature, int64_t vocab_start,
    int64_t chunk_size, const std::vector<bool>& output_mask) {
  const auto &hidden = p.hidden, &weight = p.weight;
  const ScalarType acc = acc_dtype(hidden), in_dtype = hidden.scalar_type();
  const int64_t N = hidden.size(0), n = p.rows.numel(), R = chunk_rows<Dev>(p, chunk_size);
  const int64_t cache_n = cache.numel();
  // the forward of the same rows, chunking and vocabulary made it: a whole prefix of tiles
  PPK_CHECK(cache_n == 0 || (cache.dim() == 1 && cache.scalar_type() == acc &&
                             same_device(cache, hidden) && cache.is_contiguous() &&
                             logits_cache_elems(n, R, p.V, cache_n * acc_bytes(acc),
                                                acc_bytes(acc)) == cache_n),
            "linear_logprobs_backward: logits_cache does not match these rows, chunk_size and "
            "vocabulary (pass the forward's own cache, or an empty tensor)");
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias_;
  Tensor gh = need_h ? zeros({N, p.H}, in_dtype, hidden) : empty({0}, in_dtype, hidden);
  // accumulators in the accumulation dtype across row chunks, cast once at the end
  Tensor gw = need_w ? zeros({p.V, p.H}, acc, hidden) : empty({0}, acc, hidden);
  Tensor gb = need_b ? zeros({p.V}, acc, hidden) : empty({0}, acc, hidden);
  if (n > 0 && p.V > 0 && (need_h || need_w || need_b)) {
    const Tensor ga = to_dtype(grad_label_logit, acc), gl = to_dtype(grad_lse, acc),
                 gc = llp::neg(to_dtype(grad_ent, acc));
    const Tensor lse = to_dtype(lse_, acc), ent = to_dtype(ent_, acc);
    const Tensor bias = bias_ ? as_contiguous(to_dtype(*bias_, acc)) : Tensor();
    const int64_t block = std::min(kVocabBlock, p.V);
    Tensor hbuf = empty({R, p.H}, Dev::gemm_dtype(in_dtype), hidden);
    Tensor ghbuf = need_h ? empty({R, p.H}, acc, hidden) : Tensor();
    const Tensor lbuf = empty({R * block}, acc, hidden);
    // the products of the two gradient GEMMs before the Dev adds them in (once per call)
    Tensor gh_prod = need_h ? empty({R, p.H}, acc, hidden) : Tensor();
    const Tensor gw_prod = need_w ? empty({block * p.H}, acc, hidden) : Tensor();
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      const int64_t cnt = std::min(R, n - r0);
      const Tensor rows = llp::slice(p.rows, 0, r0, cnt);
      Dev::gather(hidden, rows, hbuf);
      if (need_h) torch::stable::zero_(ghbuf);
      DzArgs d;
      d.labels = llp::index_select(p.labels, rows);
      d.lse = llp::index_select(lse, rows);
      d.ent = llp::index_select(ent, rows);
      d.a = llp::index_select(ga, rows);
      d.b = llp::index_select(gl, rows);
      d.c = llp::index_select(gc, rows);
      d.cnt = cnt;
      d.inv_t = 1.0 / temperature;
      for (int64_t c0 = 0; c0 < p.V; c0 += kVocabBlock) {
        d.vc = std::min(kVocabBlock, p.V - c0);
        d.logits = tile_view(lbuf, 0, R, d.vc);
        const Tensor wblk = Dev::weight_block(weight, c0, d.vc);
        const int64_t off = logits_cache_offset(r0, c0, R, p.V);
        if (off + R * d.vc <= cache_n) {
          // dz from the cached tile into the buffer (the cache stays intact for another
          // backward); the padding rows, which Dev::dz leaves alone, as the GEMM gave them
          d.src = tile_view(cache, off, R, d.vc);
          if (cnt < R) {
            Tensor pad = llp::slice(d.logits, 0, cnt, R - cnt);
            torch::stable::copy_(pad, llp::slice(d.src, 0, cnt, R - cnt));
          }
        } else {
          Dev::logits(d.logits, hbuf, wblk);
          d.src = d.logits;
        }
        d.bias = bias.defined() ? llp::slice(bias, 0, c0, d.vc) : Tensor();
        d.label_offset = vocab_start + c0;
        Dev::dz(d);  // padded rows of dz are exact zeros (zero hidden rows): they add nothing
        if (need_h) Dev::grad_hidden(ghbuf, d.logits, wblk, gh_prod);
        if (need_w) {
          Dev::grad_weight(llp::slice(gw, 0, c0, d.vc), d.logits, hbuf,
                           torch::stable::view(llp::slice(gw_prod, 0, 0, d.vc * p.H), {d.vc, p.H}));
        }
        if (need_b) Dev::column_sums(llp::slice(gb, 0, c0, d.vc), d.logits, cnt);
      }
      if (need_h) llp::index_copy_(gh, rows, to_dtype(llp::slice(ghbuf, 0, 0, cnt), in_dtype));
    }
  }
  return {gh, need_w ? to_dtype(gw, weight.scalar_type()) : gw,
          need_b ? to_dtype(gb, bias_->scalar_type()) : gb};
}

// The two registered ops of a front end:
// m.impl("linear_logprobs", TORCH_BOX(&linear_logprobs_op<Dev>)).
template <typename Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_logprobs_op(
    const Tensor& hidden, const Tensor& weight, const Tensor& labels,
    const std::optional<Tensor>& bias, double temperature, int64_t ignore_index,
    int64_t vocab_start, int64_t chunk_size, int64_t cache_bytes) {
  const typename Dev::Guard guard(hidden);
  PPK_CHECK(cache_bytes >= 0, "linear_logprobs: cache_bytes must be >= 0");
  const auto p = linear_logprobs_plan("linear_logprobs", hidden, weight, labels, bias,
                                      ignore_index, chunk_size, &Dev::valid_rows);
  return linear_logprobs_chunked<Dev>(p, bias, temperature, vocab_start, chunk_size,
                                      cache_bytes);
}

template <typename Dev>
std::tuple<Tensor, Tensor, Tensor> linear_logprobs_backward_op(
    const Tensor& grad_label_logit, const Tensor& grad_lse, const Tensor& grad_ent,
    const Tensor& hidden, const Tensor& weight, const Tensor& labels,
    const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& ent,
    const Tensor& logits_cache, double temperature, int64_t ignore_index, int64_t vocab_start,
    int64_t chunk_size, std::vector<bool> output_mask) {  // bool[3]
  const typename Dev::Guard guard(hidden);
  const auto p = linear_logprobs_plan("linear_logprobs_backward", hidden, weight, labels, bias,
                                      ignore_index, chunk_size, &Dev::valid_rows);
  return linear_logprobs_backward_chunked<Dev>(p, grad_label_logit, grad_lse, grad_ent, bias,
                                               lse, ent, logits_cache, temperature, vocab_start,
                                               chunk_size, output_mask);
}

}  // namespace ppokernels
