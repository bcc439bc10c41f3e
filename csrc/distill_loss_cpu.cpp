// CPU implementation of fastdistill::distill_loss_rows (contract: fastdistill/ops/distill_loss.py): input checks,
// outputs, and rows split over threads; the row kernels live in cpu_kernels_impl.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu_kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastdistill {

cpu::Dtype cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::Dtype::kFloat;
    case at::kDouble: return cpu::Dtype::kDouble;
    case at::kBFloat16: return cpu::Dtype::kBFloat16;
    default: return cpu::Dtype::kHalf;
  }
}

// Rows per task: enough work per thread to be worth a fork even for short rows.
int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

// Asks Linux to back a large, freshly allocated output with transparent huge pages (THP in "madvise" mode, the
// common default). The kernels write every byte of the gradient once, and first-touch faults on 4 KiB pages cost
// about as much as the kernel itself for [4096, 32000] float32 (measured: 150 ms of page faults to fill 0.5 GB on a
// 2-core VM); 2 MiB pages cut that several-fold. Best effort: errors (THP off, not mmap-backed) are ignored.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_rows_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double beta, double temperature, int64_t ignore_index,
    double loss_scale, bool need_grad, double ce_scale, double soft_scale, int64_t v_common) {
  FD_CHECK_CPU(student);
  FD_CHECK_FLOAT(student);
  FD_CHECK_ROWS(student);
  FD_CHECK_ROWS(teacher);
  FD_CHECK_SAME_ROWS(student, teacher);
  const int64_t vocab_common = checked_common_width(v_common, student.size(1), teacher.size(1));
  FD_CHECK_CPU(grad_scale);
  FD_CHECK_SCALE(grad_scale);
  const int64_t div = checked_divergence(divergence, beta, temperature);
  at::Tensor labels_i64;
  if (labels.has_value()) {
    FD_CHECK_LABELS(*labels, student);
    labels_i64 = labels->reshape({-1}).to(at::kLong).contiguous();
  }

  TORCH_CHECK(std::isfinite(soft_scale), "soft_scale=", soft_scale, " is not finite; expected a finite value");
  TORCH_CHECK(std::isfinite(ce_scale), "ce_scale=", ce_scale, " is not finite; expected a finite value");
  const bool with_ce = ce_scale != 0.0;
  TORCH_CHECK(!with_ce || labels.has_value(), "ce_scale=", ce_scale,
              " needs labels (the cross-entropy targets), got labels=None");

  const int64_t n_rows = student.size(0), vocab = student.size(1);
  if (with_ce) {
    // the kernel indexes the row with the label: out-of-range targets would read outside it
    const at::Tensor bad = labels_i64.ne(ignore_index).logical_and(labels_i64.lt(0).logical_or(labels_i64.ge(vocab)));
    TORCH_CHECK(!bad.any().item<bool>(), "labels has a value outside [0, ", vocab, ") (and != ignore_index=",
                ignore_index, "); expected class indices of student's last dimension for ce_scale != 0");
  }
  at::Tensor loss = at::empty({n_rows}, student.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty({n_rows, vocab}, student.options()) : at::empty({0}, student.options());
  at::Tensor ce_rows = at::empty({with_ce ? n_rows : 0}, student.options().dtype(at::kFloat));
  if (n_rows == 0) return {loss, grad, ce_rows};
  if (need_grad) advise_huge_pages(grad);

  cpu::DistillRowsArgs args{};
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_row_stride = student.stride(0);
  args.teacher_row_stride = teacher.stride(0);
  args.labels = labels.has_value() ? labels_i64.data_ptr<int64_t>() : nullptr;
  args.ignore_index = ignore_index;
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.loss = loss.data_ptr<float>();
  args.vocab = vocab;
  args.vocab_common = vocab_common;
  args.divergence = div;
  args.beta = beta;
  args.inv_temperature = 1.0 / temperature;
  args.loss_scale = loss_scale;
  args.grad_scale = grad_scale.item<double>();  // a CPU scalar: no device sync
  args.soft_scale = soft_scale;
  args.dtype = cpu_dtype(student.scalar_type());
  args.ce_rows = with_ce ? ce_rows.data_ptr<float>() : nullptr;
  args.ce_scale = ce_scale;

  const bool avx2 = std::strcmp(cpu::active_capability(), "avx2") == 0;
  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    if (avx2) {
      cpu::cpu_avx2::distill_loss_rows_range(args, begin, end);
    } else {
      cpu::cpu_default::distill_loss_rows_range(args, begin, end);
    }
  });
  return {loss, grad, ce_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("distill_loss_rows", &distill_loss_rows_cpu); }

}  // namespace fastdistill
