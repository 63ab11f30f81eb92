// CUDA kernels of value_loss, the clipped value loss: forward (one block per row reduces the row
// with the fixed-order block reduction of cuda_utils.cuh, then the finalize kernel of
// ppo_policy_loss.cu, declared in agg_cuda.cuh, reduces the rows in a fixed order, in double) and backward (grid-stride,
// with the per-row weight saved by the forward). Masked tokens are skipped (zero gradient).
#include "ppokernels/agg_cuda.cuh"
#include "ppokernels/value_loss.h"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void value_row_kernel(const T* __restrict__ v, const T* __restrict__ vo,
                                 const acc_t<T>* __restrict__ ret, const bool* __restrict__ mask,
                                 int64_t width, acc_t<T> clip, acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
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
  block_sum(acc);
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

}  // namespace

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
  return ppo_loss_finalize<A, 3>(part, nullptr, rows, width, mode, PolicyMode::kVanilla, num_tokens,
                                 num_seqs, 0.0, 0.0, loss, clipfrac, row_scale, stream);
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
  template cudaError_t value_loss_fwd<T>(const T*, const T*, const acc_t<T>*, const bool*,      \
                                         int64_t, int64_t, double, AggMode, double, double,      \
                                         acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*,             \
                                         cudaStream_t);                                          \
  template cudaError_t value_loss_bwd<T>(const acc_t<T>*, const T*, const T*, const acc_t<T>*,  \
                                         const bool*, const acc_t<T>*, int64_t, int64_t, double, \
                                         T*, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/value_loss_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {

std::tuple<Tensor, Tensor, Tensor> value_loss_cuda(
    const Tensor& values, const Tensor& old_values, const Tensor& returns,
    const Tensor& mask, std::optional<double> clip, const std::string& agg,
    std::optional<double> num_tokens, std::optional<double> num_seqs) {
  const char* op = "value_loss";
  const cuda::Guard guard(values);
  const AggMode mode = ppo_agg_mode(op, agg);
  const ValueArgs c = value_args(op, values, old_values, returns, mask, clip);
  const int64_t B = c.B, T = c.T;
  cuda::check_grid_rows(op, B);
  const auto acc = acc_dtype(values);
  const auto &v = c.v, &vo = c.vo, &ret = c.ret, &m = c.mask;
  auto part = empty({B, 3}, acc, values);
  auto loss = empty({}, acc, values);
  auto clipfrac = empty({}, acc, values);
  auto row_scale = empty({B}, acc, values);
  PPK_DISPATCH_FLOATING(v.scalar_type(), "value_loss_cuda", [&] {
    using T_ = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T_>;
    PPK_CUDA_CHECK(cuda::value_loss_fwd<T_>(
        cuda::ptr<scalar_t>(v), cuda::ptr<scalar_t>(vo), ret.const_data_ptr<A>(),
        m.const_data_ptr<bool>(), B, T, c.clip, mode, num_tokens.value_or(0.0),
        num_seqs.value_or(0.0), part.mutable_data_ptr<A>(), loss.mutable_data_ptr<A>(),
        clipfrac.mutable_data_ptr<A>(), row_scale.mutable_data_ptr<A>(), cuda::stream()));
  });
  return {loss, clipfrac, row_scale};
}

Tensor value_loss_backward_cuda(const Tensor& grad, const Tensor& values,
                                const Tensor& old_values, const Tensor& returns,
                                const Tensor& mask, const Tensor& row_scale,
                                std::optional<double> clip) {
  const char* op = "value_loss_backward";
  const cuda::Guard guard(values);
  const ValueArgs c = value_args(op, values, old_values, returns, mask, clip);
  const int64_t B = c.B, T = c.T;
  auto g_v = value_grad_output(op, c, grad, row_scale);
  const auto acc = acc_dtype(values);
  const auto &v = c.v, &vo = c.vo, &ret = c.ret, &m = c.mask;
  const auto g = as_contiguous(to_dtype(grad, acc));
  const auto rs = as_contiguous(to_dtype(row_scale, acc));
  PPK_DISPATCH_FLOATING(v.scalar_type(), "value_bwd_cuda", [&] {
    using T_ = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T_>;
    PPK_CUDA_CHECK(cuda::value_loss_bwd<T_>(
        g.const_data_ptr<A>(), cuda::ptr<scalar_t>(v), cuda::ptr<scalar_t>(vo),
        ret.const_data_ptr<A>(), m.const_data_ptr<bool>(), rs.const_data_ptr<A>(), B, T, c.clip,
        cuda::ptr<scalar_t>(g_v), cuda::stream()));
  });
  return g_v;
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("value_loss", TORCH_BOX(&value_loss_cuda));
  m.impl("value_loss_backward", TORCH_BOX(&value_loss_backward_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
