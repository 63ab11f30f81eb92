// Host-side setup of the linear_logprobs family, shared by the CPU (cpu/linear_logprobs.cpp) and
// CUDA (cuda/linear_logprobs.cu) front ends: argument checks, contiguity, the compaction of
// ignored rows and the row-chunk plan. The chunk loop itself is linear_logprobs_chunks.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <optional>

#include "ppokernels/linear_logprobs.h"
#include "ppokernels/stable.h"

namespace ppokernels {

inline constexpr int64_t kVocabBlock = 4096;  // columns per matmul; fixed, never derived from N
inline constexpr int64_t kRowAlign = 16;      // row chunks are zero-padded to a multiple of this
inline constexpr int64_t kDefaultBudget = 16 << 20;  // bytes of the [R, block] fp32 logits (in L3)

struct LinearLogprobsPlan {
  Tensor hidden, weight, labels;  // contiguous
  Tensor rows;            // [n] int64, ascending: the rows whose label is not ignore_index
  int64_t H, V, R;            // hidden size, local vocabulary, rows per chunk (padded)
};

// The device's list of valid rows: the ascending indices i with labels[i] != ignore_index, as a
// [n] int64 tensor on the labels' device (labels contiguous int64; CpuDev / CudaDev::valid_rows).
using ValidRowsFn = Tensor (*)(const Tensor& labels, int64_t ignore_index);

inline LinearLogprobsPlan linear_logprobs_plan(const char* op, const Tensor& hidden_,
                                               const Tensor& weight_, const Tensor& labels_,
                                               const std::optional<Tensor>& bias,
                                               int64_t ignore_index, int64_t chunk_size,
                                               ValidRowsFn valid_rows) {
  LinearLogprobsPlan p;
  p.hidden = as_contiguous(hidden_);
  p.weight = as_contiguous(weight_);
  p.labels = as_contiguous(labels_);
  const auto &hidden = p.hidden, &weight = p.weight, &labels = p.labels;
  PPK_CHECK(hidden.dim() == 2 && weight.dim() == 2, op, ": hidden and weight must be 2-D");
  PPK_CHECK(hidden.size(1) == weight.size(1), op, ": hidden and weight disagree on H");
  PPK_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op,
            ": labels must be [N] with N = hidden.size(0)");
  PPK_CHECK(labels.scalar_type() == kLong, op, ": labels must be int64");
  PPK_CHECK(hidden.scalar_type() == weight.scalar_type(), op,
            ": hidden and weight must have the same dtype");
  if (bias) {
    PPK_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [V]");
  }
  p.H = hidden.size(1);
  p.V = weight.size(0);
  PPK_CHECK(same_device(weight, hidden) && same_device(labels, hidden), op,
            ": hidden, weight and labels must be on one device");
  p.rows = valid_rows(labels, ignore_index);  // one host sync on CUDA
  const int64_t n = p.rows.numel();
  const int64_t block = std::max<int64_t>(1, std::min(kVocabBlock, p.V));
  int64_t r = chunk_size > 0 ? chunk_size : kDefaultBudget / (4 * block);
  r = std::min(r, n);
  p.R = std::max<int64_t>(kRowAlign, (r + kRowAlign - 1) / kRowAlign * kRowAlign);
  return p;
}

}  // namespace ppokernels
