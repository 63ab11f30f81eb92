// CUDA kernels of the kl family: per-token KL estimators, forward and backward.
#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/kl_penalty.h"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void kl_fwd_kernel(const T* __restrict__ logprobs, const T* __restrict__ ref_logprobs,
                              acc_t<T>* __restrict__ out, int64_t n, KLEstimator est,
                              acc_t<T> clamp) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = kl_value<A>(load_as<A>(logprobs, i) - load_as<A>(ref_logprobs, i), est, clamp);
  }
}

template <typename T>
__global__ void kl_bwd_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ logprobs,
                              const T* __restrict__ ref_logprobs, T* __restrict__ grad_logprobs,
                              int64_t n, KLEstimator est, acc_t<T> clamp, bool straight_through) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A x = load_as<A>(logprobs, i) - load_as<A>(ref_logprobs, i);
    store_as(grad_logprobs, i, grad[i] * kl_grad<A>(x, est, clamp, straight_through));
  }
}

}  // namespace

template <typename T>
cudaError_t kl_penalty_fwd(const T* logprobs, const T* ref_logprobs, acc_t<T>* out, int64_t n,
                           KLEstimator est, double clamp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  kl_fwd_kernel<T><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      logprobs, ref_logprobs, out, n, est, static_cast<acc_t<T>>(clamp));
  return cudaGetLastError();
}

template <typename T>
cudaError_t kl_penalty_bwd(const acc_t<T>* grad, const T* logprobs, const T* ref_logprobs,
                           T* grad_logprobs, int64_t n, KLEstimator est, double clamp,
                           bool straight_through, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  kl_bwd_kernel<T><<<elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      grad, logprobs, ref_logprobs, grad_logprobs, n, est, static_cast<acc_t<T>>(clamp),
      straight_through);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                     \
  template cudaError_t kl_penalty_fwd<T>(const T*, const T*, acc_t<T>*, int64_t, KLEstimator, \
                                         double, cudaStream_t);                                \
  template cudaError_t kl_penalty_bwd<T>(const acc_t<T>*, const T*, const T*, T*, int64_t,     \
                                         KLEstimator, double, bool, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/kl_penalty_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {

Tensor kl_penalty_cuda(const Tensor& logprobs, const Tensor& ref_logprobs,
                           const std::string& estimator, std::optional<double> clamp) {
  const cuda::Guard guard(logprobs);
  const KLArgs k = kl_args("kl_penalty", logprobs, ref_logprobs, estimator, clamp, nullptr);
  PPK_DISPATCH_FLOATING(k.lp.scalar_type(), "kl_penalty_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    PPK_CUDA_CHECK(cuda::kl_penalty_fwd<T>(cuda::ptr<scalar_t>(k.lp), cuda::ptr<scalar_t>(k.ref),
                                           k.out.mutable_data_ptr<cuda::acc_t<T>>(), k.lp.numel(), k.est,
                                           k.clamp, cuda::stream()));
  });
  return k.out;
}

Tensor kl_penalty_backward_cuda(const Tensor& grad, const Tensor& logprobs,
                                    const Tensor& ref_logprobs, const std::string& estimator,
                                    std::optional<double> clamp) {
  const cuda::Guard guard(logprobs);
  const KLArgs k = kl_args("kl_penalty_backward", logprobs, ref_logprobs, estimator, clamp, &grad);
  PPK_DISPATCH_FLOATING(k.lp.scalar_type(), "kl_penalty_bwd_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    PPK_CUDA_CHECK(cuda::kl_penalty_bwd<T>(k.g.mutable_data_ptr<cuda::acc_t<T>>(), cuda::ptr<scalar_t>(k.lp),
                                           cuda::ptr<scalar_t>(k.ref), cuda::ptr<scalar_t>(k.out),
                                           k.lp.numel(), k.est, k.clamp, k.straight_through,
                                           cuda::stream()));
  });
  return k.out;
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("kl_penalty", TORCH_BOX(&kl_penalty_cuda));
  m.impl("kl_penalty_backward", TORCH_BOX(&kl_penalty_backward_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
