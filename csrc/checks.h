// Input checks shared by the op glue: each message names the argument, what it got and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "divergences.h"

namespace fastdistill {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

}  // namespace fastdistill

#define FD_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got a tensor on ", (x).device())

#define FD_CHECK_FLOAT(x)                                                                                   \
  TORCH_CHECK(::fastdistill::is_supported_float((x).scalar_type()), #x " has dtype ", (x).scalar_type(), \
              "; expected Float, BFloat16, Half or Double")

// [N, V] with a unit stride along V (any row stride)
#define FD_CHECK_ROWS(x)                                                                                       \
  TORCH_CHECK((x).dim() == 2, #x " must be 2-D [N, V], got shape ", (x).sizes());                             \
  TORCH_CHECK((x).size(1) <= 1 || (x).stride(1) == 1, #x " must have a contiguous last dimension (stride 1), " \
              "got strides ", (x).strides())

#define FD_CHECK_SAME(a, b)                                                                                     \
  TORCH_CHECK((a).sizes() == (b).sizes(), #a " has shape ", (a).sizes(), " but " #b " has shape ", (b).sizes(), \
              "; expected the same shape");                                                                     \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " has dtype ", (a).scalar_type(), " but " #b          \
              " has dtype ", (b).scalar_type(), "; expected the same dtype");                                   \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device(),    \
              "; expected the same device")

// the same number of rows, dtype and device; the widths may differ (see checked_common_width)
#define FD_CHECK_SAME_ROWS(a, b)                                                                                \
  TORCH_CHECK((a).size(0) == (b).size(0), #a " has ", (a).size(0), " rows but " #b " has ", (b).size(0),      \
              "; expected the same number of rows");                                                          \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " has dtype ", (a).scalar_type(), " but " #b          \
              " has dtype ", (b).scalar_type(), "; expected the same dtype");                                   \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device(),    \
              "; expected the same device")

// one integer label per row, on the rows' device
#define FD_CHECK_LABELS(labels, rows)                                                                           \
  TORCH_CHECK(at::isIntegralType((labels).scalar_type(), /*includeBool=*/false), #labels " has dtype ",       \
              (labels).scalar_type(), "; expected an integer dtype");                                         \
  TORCH_CHECK((labels).numel() == (rows).size(0), #labels " has ", (labels).numel(), " elements; expected ",  \
              (rows).size(0), " (one per row of " #rows ")");                                                 \
  TORCH_CHECK((labels).device() == (rows).device(), #labels " is on ", (labels).device(), " but " #rows       \
              " is on ", (rows).device(), "; expected the same device")

// a one-element floating tensor
#define FD_CHECK_SCALE(x)                                                                                     \
  TORCH_CHECK((x).numel() == 1, #x " must have exactly one element, got shape ", (x).sizes());              \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " has dtype ", (x).scalar_type(),                   \
              "; expected a floating dtype (float32)")

namespace fastdistill {

// Validates the scalar options of distill_loss_rows and returns the divergence id the kernels run: the table's
// conventions at beta = 0 / 1 (fastdistill/divergences.py, generated into divergences.h), the same as in Python.
inline int64_t checked_divergence(int64_t divergence, double beta, double temperature) {
  TORCH_CHECK(divergence >= 0 && divergence < kNumDivergences, "divergence=", divergence,
              " is not a divergence id; expected one of ", kDivergenceNames);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "beta=", beta, " is out of range; expected a value in [0, 1]");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "temperature=", temperature,
              " is out of range; expected a finite value > 0");
  return canonical_divergence(divergence, beta);
}

// The common vocabulary width Vc of distill_loss_rows: -1 means min(Vs, Vt); otherwise 1 <= Vc <= min(Vs, Vt) (0 only
// for an empty student row).
inline int64_t checked_common_width(int64_t v_common, int64_t v_student, int64_t v_teacher) {
  const int64_t widest = std::min(v_student, v_teacher);
  if (v_common == -1) return widest;
  TORCH_CHECK(v_common >= std::min<int64_t>(1, v_student) && v_common <= widest, "v_common=", v_common,
              " is out of range; expected -1 (min of the widths) or a width in [1, min(Vs=", v_student, ", Vt=",
              v_teacher, ")]");
  return v_common;
}

}  // namespace fastdistill
