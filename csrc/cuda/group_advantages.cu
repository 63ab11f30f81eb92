// CUDA kernels of group_advantages: GRPO, Dr.GRPO and RLOO advantages
// (forward, backward). Math in ppokernels/group_advantages.h.
#include "ppokernels/group_advantages.h"
#include "ppokernels/cuda_utils.cuh"

namespace ppokernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per group scans the batch (dense ids): count / sum (/ sum g), centred squares
// (/ sum g (s - mu)), then the members' outputs. Deterministic; O(B x G) loads.
template <typename T, typename O, bool kBackward>
__global__ void group_kernel(const T* __restrict__ scores, const int64_t* __restrict__ ids,
                             const acc_t<T>* __restrict__ g, O* __restrict__ out, int64_t batch,
                             GroupEstimator est, double eps, bool norm_by_std) {
  using A = acc_t<T>;
  __shared__ double coef[5];  // mean, center, scale, coef_g, coef_h
  const int64_t gid = blockIdx.x;
  A v[3] = {A(0), A(0), A(0)};
  for (int64_t i = threadIdx.x; i < batch; i += kThreads) {
    if (ids[i] != gid) continue;
    v[0] += A(1);
    v[1] += load_as<A>(scores, i);
    if (kBackward) v[2] += g[i];
  }
  block_sum(v);
  if (threadIdx.x == 0) coef[0] = static_cast<double>(v[1]) / static_cast<double>(v[0]);
  __syncthreads();
  const double n = static_cast<double>(v[0]), sum = static_cast<double>(v[1]);
  const double sg = static_cast<double>(v[2]);  // valid in thread 0 only, as n and sum
  const A mean = static_cast<A>(coef[0]);
  A w[2] = {A(0), A(0)};
  for (int64_t i = threadIdx.x; i < batch; i += kThreads) {
    if (ids[i] != gid) continue;
    const A d = load_as<A>(scores, i) - mean;
    w[0] += d * d;
    if (kBackward) w[1] += g[i] * d;
  }
  block_sum(w);
  if (threadIdx.x == 0) {
    const GroupCoefs c = group_coefs(n, sum, static_cast<double>(w[0]), est, eps, norm_by_std);
    coef[1] = c.center;
    coef[2] = c.scale;
    group_grad_coefs(c, n, sg, static_cast<double>(w[1]), est, norm_by_std, &coef[3], &coef[4]);
  }
  __syncthreads();
  const A center = coef[1], scale = coef[2], cg = coef[3], ch = coef[4];
  for (int64_t i = threadIdx.x; i < batch; i += kThreads) {
    if (ids[i] != gid) continue;
    const A s = load_as<A>(scores, i);
    store_as(out, i, kBackward ? scale * g[i] - cg - ch * (s - mean) : (s - center) * scale);
  }
}

}  // namespace

template <typename T, typename O, bool kBackward>
cudaError_t group_advantages(const T* scores, const int64_t* ids, const acc_t<T>* g, O* out,
                             int64_t batch, int64_t num_groups, GroupEstimator est, double eps,
                             bool norm_by_std, cudaStream_t stream) {
  if (batch == 0 || num_groups == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_groups);
  group_kernel<T, O, kBackward><<<blocks, kThreads, 0, stream>>>(scores, ids, g, out, batch, est,
                                                                 eps, norm_by_std);
  return cudaGetLastError();
}

#define PPK_INSTANTIATE(T)                                                                        \
  template cudaError_t group_advantages<T, acc_t<T>, false>(                                      \
      const T*, const int64_t*, const acc_t<T>*, acc_t<T>*, int64_t, int64_t, GroupEstimator,     \
      double, bool, cudaStream_t);                                                                \
  template cudaError_t group_advantages<T, T, true>(const T*, const int64_t*, const acc_t<T>*,    \
                                                    T*, int64_t, int64_t, GroupEstimator, double, \
                                                    bool, cudaStream_t);
PPK_INSTANTIATE_FOR_DTYPES(PPK_INSTANTIATE)
#undef PPK_INSTANTIATE

}  // namespace ppokernels::cuda

#ifndef PPK_KERNELS_ONLY  // ---------------------------------------------------- torch glue
#include "ppokernels/group_advantages_args.h"
#include "ppokernels/cuda_dispatch.h"

namespace ppokernels {

Tensor group_advantages_cuda(const Tensor& scores, const Tensor& group_ids, int64_t num_groups,
                             const std::string& estimator, double eps, bool norm_by_std) {
  const cuda::Guard guard(scores);
  const GroupArgs a =
      group_args("group_advantages", scores, group_ids, num_groups, estimator, nullptr);
  PPK_DISPATCH_FLOATING(a.s.scalar_type(), "group_adv", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::group_advantages<T, A, false>(
        cuda::ptr<scalar_t>(a.s), a.ids.const_data_ptr<int64_t>(), nullptr,
        a.out.mutable_data_ptr<A>(), a.s.numel(), num_groups, a.est, eps, norm_by_std,
        cuda::stream())));
  });
  return a.out;
}

Tensor group_advantages_backward_cuda(const Tensor& grad, const Tensor& scores,
                                      const Tensor& group_ids, int64_t num_groups,
                                      const std::string& estimator, double eps, bool norm_by_std) {
  const cuda::Guard guard(scores);
  const GroupArgs a =
      group_args("group_advantages_backward", scores, group_ids, num_groups, estimator, &grad);
  PPK_DISPATCH_FLOATING(a.s.scalar_type(), "group_adv_bwd", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    PPK_CUDA_CHECK((cuda::group_advantages<T, T, true>(
        cuda::ptr<scalar_t>(a.s), a.ids.const_data_ptr<int64_t>(), a.g.const_data_ptr<A>(),
        cuda::ptr<scalar_t>(a.out), a.s.numel(), num_groups, a.est, eps, norm_by_std,
        cuda::stream())));
  });
  return a.out;
}

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CUDA, m) {
  m.impl("group_advantages", TORCH_BOX(&group_advantages_cuda));
  m.impl("group_advantages_backward", TORCH_BOX(&group_advantages_backward_cuda));
}

}  // namespace ppokernels
#endif  // PPK_KERNELS_ONLY
