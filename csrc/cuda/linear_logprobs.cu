// CUDA front end of the linear_logprobs family: per-token label logit, log-sum-exp and entropy from
// hidden states [N, H] and the lm_head weight [V, H] with the GEMMs in cuBLAS (through ATen) on
// chunks, and fused epilogues on each [R, block] fp32 logits tile. The chunk loop is
// ppokernels/linear_logprobs_chunks.h, the same the CPU front end runs (so the CPU tests exercise
// it); this file is its CUDA policy:
//   GEMMs in the input dtype: bf16/fp16 on the tensor cores with fp32 outputs (logits never
//   rounded to bf16), fp32/fp64 as they are (no TF32 unless torch allows it). The backward rounds
//   the dlogits tile to bf16/fp16 for the two gradient GEMMs, whose outputs are fp32 and are
//   accumulated in fp32 across vocabulary blocks and row chunks.
//   Epilogues (acc dtype A = float or double): fold (one block per row: SoftmaxStats of the tile's
//   row in a fixed-order block reduction, merged into the row's running stats), finish (lse and
//   entropy), dz (dlogits in place, elementwise, linear_logprobs.h).
//   Rows per chunk are fixed (never shrunk to the batch), so cuBLAS sees one GEMM shape and a row
//   gets the same bits in any batch; column sums for grad_bias use ATen's deterministic sum.
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
                                const int64_t* __restrict__ labels,  // [cnt] block-local label
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
    const int64_t y = labels[row];
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

// dlogits of rows i < cnt in place: dz_ij / T (linear_logprobs.h), 0 for rows without gradient.
template <typename A>
__global__ void linear_logprobs_dz_kernel(A* __restrict__ x,  // [R, vc] logits in, dlogits out
                                          const A* __restrict__ bias, const int64_t* labels,
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
    const A logp = biased(x + row * vc, bias, j) * inv_t - lse[row];
    const A d = j == labels[row] ? linear_logprobs_dz_label(logp, a, b, c, ent[row])
                                 : linear_logprobs_dz(logp, b, c, ent[row]);
    x[i] = d * inv_t;
  }
}

}  // namespace

template <typename A>
cudaError_t linear_logprobs_fold(const A* logits, const A* bias, const int64_t* labels,
                                 SoftmaxStats<A>* stats, A* label_logit, int64_t cnt, int64_t vc,
                                 double inv_t, cudaStream_t stream) {
  if (cnt == 0) return cudaSuccess;
  linear_logprobs_fold_kernel<A><<<static_cast<unsigned>(cnt), kThreads, 0, stream>>>(
      logits, bias, labels, stats, label_logit, vc, static_cast<A>(inv_t));
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
cudaError_t linear_logprobs_dz(A* x, const A* bias, const int64_t* labels, const A* lse,
                               const A* ent, const A* ga, const A* gb, const A* gc, int64_t cnt,
                               int64_t vc, double inv_t, cudaStream_t stream) {
  if (cnt == 0 || vc == 0) return cudaSuccess;
  linear_logprobs_dz_kernel<A><<<elementwise_blocks(cnt * vc, kThreads), kThreads, 0, stream>>>(
      x, bias, labels, lse, ent, ga, gb, gc, cnt, vc, static_cast<A>(inv_t));
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(A)                                                                     \
  template cudaError_t linear_logprobs_fold<A>(const A*, const A*, const int64_t*,            \
                                               SoftmaxStats<A>*, A*, int64_t, int64_t, double, \
                                               cudaStream_t);                                  \
  template cudaError_t linear_logprobs_finish<A>(const SoftmaxStats<A>*, A*, A*, int64_t,     \
                                                 cudaStream_t);                                \
  template cudaError_t linear_logprobs_dz<A>(A*, const A*, const int64_t*, const A*, const A*, \
                                             const A*, const A*, const A*, int64_t, int64_t,   \
                                             double, cudaStream_t);
PPK_INSTANTIATE(float)
PPK_INSTANTIATE(double)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/cuda_dispatch.h"
#include "ppokernels/linear_logprobs_chunks.h"

namespace ppokernels {
namespace {

bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

template <typename A>
const A* bias_ptr(const at::Tensor& bias) {
  return bias.defined() ? bias.data_ptr<A>() : nullptr;
}

// The CUDA policy of linear_logprobs_chunks.h.
struct CudaDev {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr bool kFixedRows = true;  // one GEMM shape per call: one cuBLAS algorithm
  static at::ScalarType gemm_dtype(at::ScalarType input) { return input; }

  static void gather(const at::Tensor& hidden, const at::Tensor& rows, at::Tensor& hbuf) {
    const int64_t cnt = rows.numel(), R = hbuf.size(0);
    hbuf.narrow(0, 0, cnt).copy_(hidden.index_select(0, rows));
    if (cnt < R) hbuf.narrow(0, cnt, R - cnt).zero_();
  }
  static at::Tensor weight_block(const at::Tensor& w, int64_t c0, int64_t vc) {
    return w.narrow(0, c0, vc);
  }
  static void logits(at::Tensor& out, const at::Tensor& hbuf, const at::Tensor& wblk) {
    if (is_half(hbuf.scalar_type())) {
      at::mm_out(out, hbuf, wblk.t(), at::kFloat);  // tensor cores, fp32 output
    } else {
      at::mm_out(out, hbuf, wblk.t());
    }
  }
  static void grad_hidden(at::Tensor& gh, const at::Tensor& dz, const at::Tensor& wblk) {
    if (is_half(wblk.scalar_type())) {
      gh.add_(at::mm(dz.to(wblk.scalar_type()), wblk, at::kFloat));
    } else {
      gh.addmm_(dz, wblk);
    }
  }
  static void grad_weight(at::Tensor gw_blk, const at::Tensor& dz, const at::Tensor& hbuf) {
    if (is_half(hbuf.scalar_type())) {
      gw_blk.add_(at::mm(dz.t().to(hbuf.scalar_type()), hbuf, at::kFloat));
    } else {
      gw_blk.addmm_(dz.t(), hbuf);
    }
  }
  static void column_sums(at::Tensor gb, const at::Tensor& dz, int64_t cnt) {
    gb.add_(dz.narrow(0, 0, cnt).sum(0));
  }
  static void fold(FoldArgs& f) {
    AT_DISPATCH_FLOATING_TYPES(f.logits.scalar_type(), "llp_fold_cuda", [&] {
      using A = scalar_t;
      C10_CUDA_CHECK(cuda::linear_logprobs_fold<A>(
          f.logits.data_ptr<A>(), bias_ptr<A>(f.bias), f.labels.data_ptr<int64_t>(),
          reinterpret_cast<SoftmaxStats<A>*>(f.stats.data_ptr<A>()), f.label_logit.data_ptr<A>(),
          f.cnt, f.vc, f.inv_t, cuda::stream()));
    });
  }
  static void finish(FinishArgs& a) {
    AT_DISPATCH_FLOATING_TYPES(a.lse.scalar_type(), "llp_finish_cuda", [&] {
      using A = scalar_t;
      C10_CUDA_CHECK(cuda::linear_logprobs_finish<A>(
          reinterpret_cast<const SoftmaxStats<A>*>(a.stats.data_ptr<A>()), a.lse.data_ptr<A>(),
          a.ent.data_ptr<A>(), a.cnt, cuda::stream()));
    });
  }
  static void dz(DzArgs& d) {
    AT_DISPATCH_FLOATING_TYPES(d.logits.scalar_type(), "llp_dz_cuda", [&] {
      using A = scalar_t;
      C10_CUDA_CHECK(cuda::linear_logprobs_dz<A>(
          d.logits.data_ptr<A>(), bias_ptr<A>(d.bias), d.labels.data_ptr<int64_t>(),
          d.lse.data_ptr<A>(), d.ent.data_ptr<A>(), d.a.data_ptr<A>(), d.b.data_ptr<A>(),
          d.c.data_ptr<A>(), d.cnt, d.vc, d.inv_t, cuda::stream()));
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("linear_logprobs", &linear_logprobs_op<CudaDev>);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward_op<CudaDev>);
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
