// Raw CPU row kernels: plain pointers and sizes, no at::Tensor.
//
// Every kernel is compiled twice (see kernels_default.cpp and kernels_avx2.cpp): once with the build's baseline flags
// and once with AVX2 + FMA + F16C enabled, each inside its own at::vec CPU_CAPABILITY namespace. The op glue
// (distill_loss_cpu.cpp, kl_div_cpu.cpp) checks the tensors, allocates outputs, picks the variant the CPU supports
// and splits rows over threads.
#pragma once

#include <cstdint>

#include "divergences.h"  // generated from fastdistill/divergences.py: the divergence ids (kForwardKL, ...)

namespace fastdistill::cpu {

enum class Dtype : int { kFloat, kDouble, kBFloat16, kHalf };

// distill_rows_typed dispatches on every id of the table: a divergence added there fails here until it has a kernel
static_assert(kNumDivergences == 6 && kForwardKL == 0 && kReverseKL == 1 && kJSD == 2 && kTVD == 3 &&
                  kSkewForwardKL == 4 && kSkewReverseKL == 5,
              "csrc/divergences.h changed: update the kernels' dispatch in cpu_kernels_impl.h");

struct DistillRowsArgs {
  const void* student;  // [N, Vs] rows, unit stride inside a row
  const void* teacher;  // [N, Vt] rows, Vt >= vocab_common; only the first vocab_common entries are read
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  const int64_t* labels;  // [N] or nullptr
  int64_t ignore_index;
  void* grad;    // [N, V] contiguous, student dtype; nullptr: no gradient work
  float* loss;   // [N]
  int64_t vocab;         // Vs: the student's row (the gradient's width and the cross-entropy's softmax)
  int64_t vocab_common;  // Vc <= Vs: the divergence's softmaxes span [0, Vc) of both rows; the gradient of the
                         // columns [Vc, Vs) is the cross-entropy's alone (0 without it)
  int64_t divergence;
  double beta;
  double inv_temperature;
  double loss_scale;
  double grad_scale;  // grad_scale[0]: multiplies both terms' gradients (batchmean's 1 / n_valid)
  double soft_scale;  // the divergence's gradient is grad_scale * soft_scale * d loss_rows / d student
  Dtype dtype;
  // hard (cross-entropy) term (temperature 1, target labels[i]): ce_rows[i] = lse(s) - s[label], and
  // grad_scale * ce_scale * (softmax(s) - onehot(label)) added to the gradient; ce_rows == nullptr: off
  float* ce_rows;  // [N] or nullptr
  double ce_scale;
};

struct KlDivRowsArgs {
  const void* input;   // [N, V] log-probabilities
  const void* target;  // [N, V] probabilities (log-probabilities when log_target)
  int64_t input_row_stride;
  int64_t target_row_stride;
  void* grad;   // [N, V] contiguous, input dtype; nullptr: no gradient work
  float* loss;  // [N]
  int64_t vocab;
  bool log_target;
  double grad_scale;
  Dtype dtype;
};

// The teacher's top-k targets of float32 logit rows (contract: fastdistill/train/targets.py, topk_from_hidden).
struct TopkTargetsArgs {
  const float* logits;  // [N, V] rows, unit stride inside a row
  int64_t row_stride;
  int64_t vocab;
  int64_t k;                        // 1 <= k <= vocab
  const double* inv_temperatures;   // [n_temps]
  int64_t n_temps;
  int64_t* indices;   // [N, k] out, ascending in a row
  float* top_logits;  // [N, k] out, the logits at indices
  float* lse;         // [N, n_temps] out, log-sum-exp of logits / t
  float* log_tail;    // [N, n_temps] out, log of the mass outside the top k at temperature t
};

// Rows [begin, end) of the contract in fastdistill/ops/distill_loss.py and fastdistill/ops/kl_div.py.
namespace cpu_default {
void distill_loss_rows_range(const DistillRowsArgs& args, int64_t begin, int64_t end);
void kl_div_rows_range(const KlDivRowsArgs& args, int64_t begin, int64_t end);
void topk_targets_rows_range(const TopkTargetsArgs& args, int64_t begin, int64_t end);
}  // namespace cpu_default

namespace cpu_avx2 {
bool compiled();  // false when the compiler could not build the AVX2 variant (then the functions below abort)
void distill_loss_rows_range(const DistillRowsArgs& args, int64_t begin, int64_t end);
void kl_div_rows_range(const KlDivRowsArgs& args, int64_t begin, int64_t end);
void topk_targets_rows_range(const TopkTargetsArgs& args, int64_t begin, int64_t end);
}  // namespace cpu_avx2

// "avx2" when this CPU runs the AVX2 variant and FASTDISTILL_CPU_CAPABILITY is not "default", else "default".
const char* active_capability();

}  // namespace fastdistill::cpu
