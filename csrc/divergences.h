// GENERATED from fastdistill/divergences.py by `python -m fastdistill.divergences`; do not edit.
// The divergence and reduction ids the kernels share with Python (tests/test_divergence_table.py checks that
// this file matches the table).
#pragma once

#include <cstdint>

namespace fastdistill {

enum Divergence : int64_t {
  kForwardKL = 0,  // KL(pt || ps)
  kReverseKL = 1,  // KL(ps || pt)
  kJSD = 2,  // beta KL(pt || m) + (1 - beta) KL(ps || m), m = (1-beta) ps + beta pt
  kTVD = 3,  // 0.5 sum |ps - pt|
  kSkewForwardKL = 4,  // KL(pt || beta pt + (1 - beta) ps)
  kSkewReverseKL = 5,  // KL(ps || beta ps + (1 - beta) pt)
};
constexpr int64_t kNumDivergences = 6;
constexpr const char* kDivergenceNames = "0 forward_kl, 1 reverse_kl, 2 jsd, 3 tvd, 4 skew_forward_kl, 5 skew_reverse_kl";

enum Reduction : int64_t {
  kReductionNone = 0,
  kReductionSum = 1,
  kReductionBatchmean = 2,
  kReductionMean = 3,
};

// The id the kernels run for (divergence, beta): the table's conventions at beta = 0 and beta = 1.
constexpr int64_t canonical_divergence(int64_t divergence, double beta) {
  if (divergence == kJSD && beta == 0.0) return kForwardKL;
  if (divergence == kJSD && beta == 1.0) return kReverseKL;
  if (divergence == kSkewForwardKL && beta == 0.0) return kForwardKL;
  if (divergence == kSkewReverseKL && beta == 0.0) return kReverseKL;
  return divergence;
}

}  // namespace fastdistill
