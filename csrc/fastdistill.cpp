// fastdistill._C: the schemas of the extension's ops and the Python module that loads them.
//
// Only the row kernels are defined here. The Python package defines its own ops in the same namespace
// (fastdistill::distill_loss, fastdistill::kl_div) with torch.library.custom_op, which registers FRAGMENTs, so this
// must stay the namespace's single TORCH_LIBRARY block. Implementations: distill_loss_cpu.cpp, kl_div_cpu.cpp, topk_targets_cpu.cpp (CPU;
// GPUs run the Triton kernels). Fake (meta) implementations: fastdistill/ops/_extension_fakes.py.
#include <torch/extension.h>

#include <string>

#include "cpu_kernels.h"

TORCH_LIBRARY(fastdistill, m) {
  m.def(
      "distill_loss_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, int divergence, "
      "float beta, float temperature, int ignore_index, float loss_scale, bool need_grad, float ce_scale=0.0, "
      "float soft_scale=1.0, int v_common=-1) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_div_rows(Tensor input, Tensor target, Tensor grad_scale, bool log_target, bool need_grad) "
      "-> (Tensor, Tensor)");
  m.def("topk_targets_rows(Tensor logits, int k, float[] temperatures) -> (Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdistill C++ CPU kernels; the ops are under torch.ops.fastdistill";
  m.def(
      "cpu_capability", [] { return std::string(fastdistill::cpu::active_capability()); },
      "Which CPU kernel variant runs: 'avx2' or 'default' (FASTDISTILL_CPU_CAPABILITY=default forces the latter).");
}
