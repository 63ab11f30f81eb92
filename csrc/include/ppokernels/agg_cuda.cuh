// The aggregation's finalize step on CUDA, shared by the two losses: defined in
// cuda/ppo_policy_loss.cu, called by it and by cuda/value_loss.cu (the CUDA side of agg.h).
// Plain CUDA: compiles without torch headers.
#pragma once
#include "ppokernels/cuda_utils.cuh"
#include "ppokernels/ppo_policy_loss.h"

namespace ppokernels {
namespace cuda {

// Second step of both forwards: one block reduces the rows' K partial sums (part [rows, K]) in a
// fixed order, in double, and applies the aggregation weights. K = kPolicyK: the policy loss
// (loss of row b = wp part[kPLoss] + w (kl_coef part[kPKL] - entropy_coef part[kPEntropy]), w the
// aggregation weight, wp policy_surrogate_scale(pmode, w); rowv [rows, 3] = (ra, rb, unused);
// metrics [kPolicyMetrics]; row_stats [rows, kPolicyRowStats] = (w, ra, wp, rb)). K = 3: the
// value loss (part = (n, loss, clipped); metrics [1] = clipfrac; row_stats [rows] = weight; rowv
// null, pmode ignored).
template <typename A, int K>
cudaError_t ppo_loss_finalize(const A* part, const A* rowv, int64_t rows, int64_t width,
                              AggMode mode, PolicyMode pmode, double num_tokens, double num_seqs,
                              double kl_coef, double entropy_coef, A* loss, A* metrics,
                              A* row_stats, cudaStream_t stream);

}  // namespace cuda
}  // namespace ppokernels
