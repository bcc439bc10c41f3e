// CPU implementation of fastdistill::kl_div_rows (contract: fastdistill/ops/kl_div.py): one vectorized pass per row
// for the loss and the gradient; the row kernel lives in cpu_kernels_impl.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "checks.h"
#include "cpu_kernels.h"

namespace fastdistill {

cpu::Dtype cpu_dtype(at::ScalarType t);  // distill_loss_cpu.cpp
int64_t row_grain(int64_t vocab);
void advise_huge_pages(const at::Tensor& t);

namespace {

std::tuple<at::Tensor, at::Tensor> kl_div_rows_cpu(const at::Tensor& input, const at::Tensor& target,
                                                   const at::Tensor& grad_scale, bool log_target, bool need_grad) {
  FD_CHECK_CPU(input);
  FD_CHECK_FLOAT(input);
  FD_CHECK_ROWS(input);
  FD_CHECK_ROWS(target);
  FD_CHECK_SAME(input, target);
  FD_CHECK_CPU(grad_scale);
  FD_CHECK_SCALE(grad_scale);

  const int64_t n_rows = input.size(0), vocab = input.size(1);
  at::Tensor loss = at::empty({n_rows}, input.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty({n_rows, vocab}, input.options()) : at::empty({0}, input.options());
  if (n_rows == 0) return {loss, grad};
  if (need_grad) advise_huge_pages(grad);

  cpu::KlDivRowsArgs args{};
  args.input = input.data_ptr();
  args.target = target.data_ptr();
  args.input_row_stride = input.stride(0);
  args.target_row_stride = target.stride(0);
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.loss = loss.data_ptr<float>();
  args.vocab = vocab;
  args.log_target = log_target;
  args.grad_scale = grad_scale.item<double>();
  args.dtype = cpu_dtype(input.scalar_type());

  const bool avx2 = std::strcmp(cpu::active_capability(), "avx2") == 0;
  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    if (avx2) {
      cpu::cpu_avx2::kl_div_rows_range(args, begin, end);
    } else {
      cpu::cpu_default::kl_div_rows_range(args, begin, end);
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("kl_div_rows", &kl_div_rows_cpu); }

}  // namespace fastdistill
