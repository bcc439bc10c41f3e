// CPU implementation of fastdistill::topk_targets_rows (contract: fastdistill/train/targets.py, topk_from_hidden):
// input checks, outputs, and rows split over threads; the row kernel lives in topk_kernels_impl.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace fastdistill {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_targets_rows_cpu(const at::Tensor& logits, int64_t k,
                                                                                 at::ArrayRef<double> temperatures) {
  FD_CHECK_CPU(logits);
  FD_CHECK_ROWS(logits);
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "logits has dtype ", logits.scalar_type(), "; expected Float");
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "k=", k, ": expected 1 <= k <= V=", vocab);
  TORCH_CHECK(!temperatures.empty(), "temperatures is empty; expected at least one temperature");
  std::vector<double> inv_t;
  for (double t : temperatures) {
    TORCH_CHECK(t > 0, "temperatures has ", t, "; expected every temperature > 0");
    inv_t.push_back(1.0 / t);
  }
  const int64_t nt = static_cast<int64_t>(inv_t.size());
  auto f32 = logits.options();
  at::Tensor indices = at::empty({n_rows, k}, f32.dtype(at::kLong));
  at::Tensor top = at::empty({n_rows, k}, f32);
  at::Tensor lse = at::empty({n_rows, nt}, f32);
  at::Tensor log_tail = at::empty({n_rows, nt}, f32);
  if (n_rows == 0) return {indices, top, lse, log_tail};

  cpu::TopkTargetsArgs args{};
  args.logits = logits.data_ptr<float>();
  args.row_stride = logits.stride(0);
  args.vocab = vocab;
  args.k = k;
  args.inv_temperatures = inv_t.data();
  args.n_temps = nt;
  args.indices = indices.data_ptr<int64_t>();
  args.top_logits = top.data_ptr<float>();
  args.lse = lse.data_ptr<float>();
  args.log_tail = log_tail.data_ptr<float>();

  const bool avx2 = std::strcmp(cpu::active_capability(), "avx2") == 0;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    if (avx2) {
      cpu::cpu_avx2::topk_targets_rows_range(args, begin, end);
    } else {
      cpu::cpu_default::topk_targets_rows_range(args, begin, end);
    }
  });
  return {indices, top, lse, log_tail};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("topk_targets_rows", &topk_targets_rows_cpu); }

}  // namespace fastdistill
