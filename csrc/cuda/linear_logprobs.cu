// CUDA front end of the linear_logprobs family: per-token label logit, log-sum-exp and entropy from
// hidden states [N, H] and the lm_head weight [V, H] with the GEMMs in cuBLAS (aten::mm) on
// chunks, and fused epilogues on each [R, block] fp32 logits tile. The chunk loop is
// ppokernels/linear_logprobs_chunks.h, the same the CPU front end runs (so the CPU tests exercise
// it); this file is its CUDA policy:
//   GEMMs in the input dtype: bf16/fp16 on the tensor cores with fp32 outputs (logits never
//   rounded to bf16), fp32/fp64 as they are (no TF32 unless torch allows it). The backward rounds
//   the dlogits tile to bf16/fp16 for the two gradient GEMMs, whose outputs are fp32 and are
//   accumulated in fp32 across vocabulary blocks and row chunks (a GEMM into a scratch tile, then
//   an elementwise add: linear_logprobs_add).
//   Epilogues (acc dtype A = float or double): fold (one block per row: SoftmaxStats of the tile's
//   row in a fixed-order block reduction, merged into the row's running stats), finish (lse and
//   entropy), dz (dlogits, elementwise, linear_logprobs.h: in place, or from a tile of the
//   logits cache the forward's GEMM wrote, which saves the backward's logits GEMM).
//   Rows per chunk are fixed (never shrunk to the batch), so cuBLAS sees one GEMM shape and a row
//   gets the same bits in any batch; column sums for grad_bias use torch's deterministic sum.
#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/linear_logprobs.h"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;

struct SafeMerge {  // the block reduction's combine op: an empty side (s = 0) is no-op
  template <typename A>
  __device__ __forceinline__ SoftmaxStats<A> operator()(SoftmaxStats<A> a,
                                                       SoftmaxStats<A> b) const {
    return linear_logprobs_merge(a, b);
  }
};

template <typename A>
__device__ __forceinline__ A biased(const A* x, const A* bias, int64_t j) {
  return bias ? x[j] + bias[j] : x[j];
}

// One block per row i < cnt of the [R, vc] tile: z_j = (x_ij + b_j) * inv_t.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    linear_logprobs_fold_kernel(const A* __restrict__ logits,  // [R, vc] fp32/fp64
                                const A* __restrict__ bias,    // [vc] or null
                                const int64_t* __restrict__ labels,  // [cnt] labels
                                int64_t label_offset,  // labels - label_offset: block-local
                                SoftmaxStats<A>* __restrict__ stats,  // [R] running stats
                                A* __restrict__ label_logit,           // [R] z_y
                                int64_t vc, A inv_t) {
  const int64_t row = blockIdx.x;
  const A* x = logits + row * vc;
  SoftmaxStats<A> st = softmax_stats_init<A>();
  for (int64_t j = threadIdx.x; j < vc; j += kThreads) softmax_stats_add(st, biased(x, bias, j) * inv_t);
  st = block_reduce(st, SafeMerge{}, softmax_stats_init<A>());
  if (threadIdx.x == 0) {
    stats[row] = linear_logprobs_merge(stats[row], st);
    const int64_t y = labels[row] - label_offset;
    if (y >= 0 && y < vc) label_logit[row] = biased(x, bias, y) * inv_t;
  }
}

template <typename A>
__global__ void linear_logprobs_finish_kernel(const SoftmaxStats<A>* __restrict__ stats,
                                              A* __restrict__ lse, A* __restrict__ ent,
                                              int64_t cnt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < cnt) {
    lse[i] = softmax_stats_lse(stats[i]);
    ent[i] = softmax_stats_entropy(stats[i]);
  }
}

// dlogits of rows i < cnt: dz_ij / T (linear_logprobs.h) of the logits src, 0 for rows without
// gradient. src is x (in place) or a tile of the logits cache, so neither is __restrict__.
template <typename A>
__global__ void linear_logprobs_dz_kernel(const A* src,  // [R, vc] logits
                                          A* x,          // [R, vc] dlogits out
                                          const A* __restrict__ bias, const int64_t* labels,
                                          int64_t label_offset,
                                          const A* __restrict__ lse, const A* __restrict__ ent,
                                          const A* __restrict__ ga, const A* __restrict__ gb,
                                          const A* __restrict__ gc, int64_t cnt, int64_t vc,
                                          A inv_t) {
  const int64_t n = cnt * vc, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t row = i / vc, j = i - row * vc;
    const A a = ga[row], b = gb[row], c = gc[row];
    if (a == A(0) && b == A(0) && c == A(0)) {  // ignored or clipped tokens: no work
      x[i] = A(0);
      continue;
    }
    const A logp = biased(src + row * vc, bias, j) * inv_t - lse[row];
    const A d = j == labels[row] - label_offset ? linear_logprobs_dz_label(logp, a, b, c, ent[row])
                                                : linear_logprobs_dz(logp, b, c, ent[row]);
    x[i] = d * inv_t;
  }
}

// dst[i] += src[i]: the "+=" of the gradient GEMMs, whose products come into a scratch tile
// (the stable ABI's dispatcher takes no Scalar, so no addmm_ / add_; linear_logprobs_chunks.h).
template <typename A>
__global__ void linear_logprobs_add_kernel(A* __restrict__ dst, const A* __restrict__ src,
                                           int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] += src[i];
  }
}

// mask[i] = labels[i] != ignore_index, exact for every int64 (no Scalar, no double on the way).
__global__ void linear_logprobs_valid_kernel(const int64_t* __restrict__ labels,
                                             bool* __restrict__ mask, int64_t n,
                                             int64_t ignore_index) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    mask[i] = labels[i] != ignore_index;
  }
}

}  // namespace

template <typename A>
cudaError_t linear_logprobs_fold(const A* logits, const A* bias, const int64_t* labels,
                                 int64_t label_offset, SoftmaxStats<A>* stats, A* label_logit,
                                 int64_t cnt, int64_t vc, double inv_t, cudaStream_t stream) {
  if (cnt == 0) return cudaSuccess;
  linear_logprobs_fold_kernel<A><<<static_cast<unsigned>(cnt), kThreads, 0, stream>>>(
      logits, bias, labels, label_offset, stats, label_logit, vc, static_cast<A>(inv_t));
  return cudaGetLastError();
}

template <typename A>
cudaError_t linear_logprobs_finish(const SoftmaxStats<A>* stats, A* lse, A* ent, int64_t cnt,
                                   cudaStream_t stream) {
  if (cnt == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((cnt + kThreads - 1) / kThreads);
  linear_logprobs_finish_kernel<A><<<blocks, kThreads, 0, stream>>>(stats, lse, ent, cnt);
  return cudaGetLastError();
}

template <typename A>
cudaError_t linear_logprobs_dz(const A* src, A* x, const A* bias, const int64_t* labels,
                               int64_t label_offset, const A* lse, const A* ent, const A* ga,
                               const A* gb, const A* gc, int64_t cnt, int64_t vc, double inv_t,
                               cudaStream_t stream) {
  if (cnt == 0 || vc == 0) return cudaSuccess;
  linear_logprobs_dz_kernel<A><<<elementwise_blocks(cnt * vc, kThreads), kThreads, 0, stream>>>(
      src, x, bias, labels, label_offset, lse, ent, ga, gb, gc, cnt, vc, static_cast<A>(inv_t));
  return cudaGetLastError();
}

template <typename A>
cudaError_t linear_logprobs_add(A* dst, const A* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  linear_logprobs_add_kernel<A><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      dst, src, n);
  return cudaGetLastError();
}

cudaError_t linear_logprobs_valid(const int64_t* labels, bool* mask, int64_t n,
                                  int64_t ignore_index, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  linear_logprobs_valid_kernel<<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      labels, mask, n, ignore_index);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(A)                                                                     \
  template cudaError_t linear_logprobs_fold<A>(const A*, const A*, const int64_t*, int64_t,   \
                                               SoftmaxStats<A>*, A*, int64_t, int64_t, double, \
                                               cudaStream_t);                                  \
  template cudaError_t linear_logprobs_finish<A>(const SoftmaxStats<A>*, A*, A*, int64_t,     \
                                                 cudaStream_t);                                \
  template cudaError_t linear_logprobs_dz<A>(const A*, A*, const A*, const int64_t*, int64_t,  \
                                             const A*, const A*, const A*, const A*, const A*, \
                                             int64_t, int64_t, double, cudaStream_t);          \
  template cudaError_t linear_logprobs_add<A>(A*, const A*, int64_t, cudaStream_t);
PPK_INSTANTIATE(float)
PPK_INSTANTIATE(double)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/cuda_dispatch.h"
#include "ppokernels/linear_logprobs_chunks.h"

namespace ppokernels {
namespace {

bool is_half(ScalarType t) { return t == kBFloat16 || t == kHalf; }

template <typename A>
const A* bias_ptr(const Tensor& bias) {
  return bias.defined() ? bias.const_data_ptr<A>() : nullptr;
}

// dst += src, both contiguous, of the same shape, in the accumulation dtype.
void add_into(Tensor& dst, const Tensor& src) {
  PPK_DISPATCH_FP32_FP64(dst.scalar_type(), "llp_add_cuda", [&] {
    PPK_CUDA_CHECK(cuda::linear_logprobs_add<scalar_t>(dst.mutable_data_ptr<scalar_t>(),
                                                       src.const_data_ptr<scalar_t>(),
                                                       dst.numel(), cuda::stream()));
  });
}

// The CUDA policy of linear_logprobs_chunks.h.
struct CudaDev {
  using Guard = cuda::Guard;
  static constexpr bool kFixedRows = true;  // one GEMM shape per call: one cuBLAS algorithm
  static ScalarType gemm_dtype(ScalarType input) { return input; }

  // The labels != ignore_index mask by a small kernel (aten::ne.Scalar would need a Scalar, which
  // the stable ABI's dispatcher does not take; ne.Tensor against a filled 0-dim tensor would pass
  // ignore_index through a double), then aten::nonzero: ascending, one host sync as before.
  static Tensor valid_rows(const Tensor& labels, int64_t ignore_index) {
    Tensor mask = empty(sizes_of(labels), kBool, labels);
    PPK_CUDA_CHECK(cuda::linear_logprobs_valid(labels.const_data_ptr<int64_t>(),
                                               mask.mutable_data_ptr<bool>(), labels.numel(),
                                               ignore_index, cuda::stream()));
    return torch::stable::view(call_op("aten::nonzero", "", mask), {-1});
  }
  static void gather(const Tensor& hidden, const Tensor& rows, Tensor& hbuf) {
    const int64_t cnt = rows.numel(), R = hbuf.size(0);
    Tensor head = llp::slice(hbuf, 0, 0, cnt);
    torch::stable::copy_(head, llp::index_select(hidden, rows));
    if (cnt < R) {
      Tensor pad = llp::slice(hbuf, 0, cnt, R - cnt);
      torch::stable::zero_(pad);
    }
  }
  static Tensor weight_block(const Tensor& w, int64_t c0, int64_t vc) {
    return llp::slice(w, 0, c0, vc);
  }
  static void logits(Tensor& out, const Tensor& hbuf, const Tensor& wblk) {
    if (is_half(hbuf.scalar_type())) {
      // aten::mm.dtype_out(self, mat2, out_dtype, *, out): tensor cores, fp32 output
      (void)call_op("aten::mm", "dtype_out", hbuf, t(wblk), kFloat, out);
    } else {
      mm_out(out, hbuf, t(wblk));
    }
  }
  // gh += dz @ wblk and gw_blk += dz^T @ hbuf: the product into scratch (fp32 outputs of the
  // half GEMMs, as aten::mm.dtype gave), then added in.
  static void grad_hidden(Tensor& gh, const Tensor& dz, const Tensor& wblk, Tensor& scratch) {
    if (is_half(wblk.scalar_type())) {
      (void)call_op("aten::mm", "dtype_out", to_dtype(dz, wblk.scalar_type()), wblk, kFloat,
                    scratch);
    } else {
      mm_out(scratch, dz, wblk);
    }
    add_into(gh, scratch);
  }
  static void grad_weight(Tensor gw_blk, const Tensor& dz, const Tensor& hbuf, Tensor scratch) {
    if (is_half(hbuf.scalar_type())) {
      (void)call_op("aten::mm", "dtype_out", to_dtype(t(dz), hbuf.scalar_type()), hbuf, kFloat,
                    scratch);
    } else {
      mm_out(scratch, t(dz), hbuf);
    }
    add_into(gw_blk, scratch);
  }
  static void column_sums(Tensor gb, const Tensor& dz, int64_t cnt) {
    add_into(gb, torch::stable::sum(llp::slice(dz, 0, 0, cnt), std::vector<int64_t>{0}));
  }
  static void fold(FoldArgs& f) {
    PPK_DISPATCH_FP32_FP64(f.logits.scalar_type(), "llp_fold_cuda", [&] {
      using A = scalar_t;
      PPK_CUDA_CHECK(cuda::linear_logprobs_fold<A>(
          f.logits.const_data_ptr<A>(), bias_ptr<A>(f.bias), f.labels.const_data_ptr<int64_t>(),
          f.label_offset, reinterpret_cast<SoftmaxStats<A>*>(f.stats.mutable_data_ptr<A>()),
          f.label_logit.mutable_data_ptr<A>(), f.cnt, f.vc, f.inv_t, cuda::stream()));
    });
  }
  static void finish(FinishArgs& a) {
    PPK_DISPATCH_FP32_FP64(a.lse.scalar_type(), "llp_finish_cuda", [&] {
      using A = scalar_t;
      PPK_CUDA_CHECK(cuda::linear_logprobs_finish<A>(
          reinterpret_cast<const SoftmaxStats<A>*>(a.stats.const_data_ptr<A>()),
          a.lse.mutable_data_ptr<A>(), a.ent.mutable_data_ptr<A>(), a.cnt, cuda::stream()));
    });
  }
  static void dz(DzArgs& d) {
    PPK_DISPATCH_FP32_FP64(d.logits.scalar_type(), "llp_dz_cuda", [&] {
      using A = scalar_t;
      PPK_CUDA_CHECK(cuda::linear_logprobs_dz<A>(
          d.src.const_data_ptr<A>(), d.logits.mutable_data_ptr<A>(), bias_ptr<A>(d.bias),
          d.labels.const_data_ptr<int64_t>(),
          d.label_offset, d.lse.const_data_ptr<A>(), d.ent.const_data_ptr<A>(),
          d.a.const_data_ptr<A>(), d.b.const_data_ptr<A>(), d.c.const_data_ptr<A>(), d.cnt, d.vc,
          d.inv_t, cuda::stream()));
    });
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("linear_logprobs", TORCH_BOX(&linear_logprobs_op<CudaDev>));
  m.impl("linear_logprobs_backward", TORCH_BOX(&linear_logprobs_backward_op<CudaDev>));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
