// Raw CPU row kernels: plain pointers and sizes, no at::Tensor.
//
// Every kernel is compiled twice (see kernels_default.cpp and kernels_avx2.cpp): once with the build's baseline flags
// and once with AVX2 + FMA + F16C enabled, each inside its own at::vec CPU_CAPABILITY namespace. The op glue
// (distill_loss_cpu.cpp, kl_div_cpu.cpp) checks the tensors, allocates outputs, picks the variant the CPU supports
// and splits rows over threads.
#pragma once

#include <cstdint>

namespace fastdistill::cpu {

enum class Dtype : int { kFloat, kDouble, kBFloat16, kHalf };

// Divergence ids: the same numbering as fastdistill.reference.DIVERGENCES (part of the kernel ABI).
enum Divergence : int64_t {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kTVD = 3,
  kSkewForwardKL = 4,
  kSkewReverseKL = 5,
};

struct DistillRowsArgs {
  const void* student;  // [N, V] rows, unit stride inside a row
  const void* teacher;  // [N, V]
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  const int64_t* labels;  // [N] or nullptr
  int64_t ignore_index;
  void* grad;    // [N, V] contiguous, student dtype; nullptr: no gradient work
  float* loss;   // [N]
  int64_t vocab;
  int64_t divergence;
  double beta;
  double inv_temperature;
  double loss_scale;
  double grad_scale;  // loss_scale / T * grad_scale[0] is applied to the gradient
  Dtype dtype;
  // fused cross-entropy term (temperature 1, target labels[i]): ce_rows[i] = lse(s) - s[label], and
  // grad_scale * ce_weight * (softmax(s) - onehot(label)) added to the gradient; ce_rows == nullptr: off
  float* ce_rows;  // [N] or nullptr
  double ce_weight;
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

// Rows [begin, end) of the contract in fastdistill/ops/distill_loss.py and fastdistill/ops/kl_div.py.
namespace cpu_default {
void distill_loss_rows_range(const DistillRowsArgs& args, int64_t begin, int64_t end);
void kl_div_rows_range(const KlDivRowsArgs& args, int64_t begin, int64_t end);
}  // namespace cpu_default

namespace cpu_avx2 {
bool compiled();  // false when the compiler could not build the AVX2 variant (then the functions below abort)
void distill_loss_rows_range(const DistillRowsArgs& args, int64_t begin, int64_t end);
void kl_div_rows_range(const KlDivRowsArgs& args, int64_t begin, int64_t end);
}  // namespace cpu_avx2

// "avx2" when this CPU runs the AVX2 variant and FASTDISTILL_CPU_CAPABILITY is not "default", else "default".
const char* active_capability();

}  // namespace fastdistill::cpu
