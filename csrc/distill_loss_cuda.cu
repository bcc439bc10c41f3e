// CUDA implementation of fastdistill::distill_loss_rows for the forward KL (contract: fastdistill/ops/distill_loss.py).
//
// One block per row, two passes over it:
//   pass 1  each thread keeps an online (max, sum exp) of s' = student / T and t' = teacher / T plus the teacher-weighted
//           sum a = sum exp(t' - mt) (t' - s'), rescaled with the teacher's sum; loads are 16 bytes wide when the rows
//           are aligned. Warp shuffles then shared memory merge the per-thread states; the loss is
//           a / zt - lse_t + lse_s.
//   pass 2  grad = (ps - pt) * loss_scale / T * grad_scale[0] (the row is mostly in L2 by then).
// Accumulation in float32 (float64 for float64 inputs). grad_scale is read on the device: no host sync.
// Other divergence ids are an error here; the Python side routes only the forward KL to this kernel.
//
// Only c10/cuda headers are used (not ATen/cuda, whose context header needs the cuBLAS / cuSPARSE headers), so the
// file also compiles against a CPU build of torch for a compile-only check (tests/test_build.py).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"

namespace fastdistill {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float fd_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fd_exp(double x) { return exp(x); }
__device__ __forceinline__ float fd_log(float x) { return __logf(x); }
__device__ __forceinline__ double fd_log(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t lowest() {
  // the running max starts at the lowest finite value, not -inf: -inf logits then give exp(-inf) = 0, never
  // exp(-inf - -inf) = NaN (a fully masked lane merges as an empty sum)
  return sizeof(acc_t) == 4 ? static_cast<acc_t>(-FLT_MAX) : static_cast<acc_t>(-DBL_MAX);
}

// Online softmax state of one thread over its slice of a row pair.
template <typename acc_t>
struct RowState {
  acc_t ms, zs;     // student: running max, sum exp(s' - ms)
  acc_t mt, zt, a;  // teacher: running max, sum exp(t' - mt), sum exp(t' - mt) (t' - s')

  __device__ __forceinline__ void init() {
    ms = mt = lowest<acc_t>();
    zs = zt = a = acc_t(0);
  }

  // Adds kN elements; the sums are rescaled once per call (with the chunk's max), not per element.
  template <int kN>
  __device__ __forceinline__ void add(const acc_t (&xs)[kN], const acc_t (&xt)[kN]) {
    acc_t cs = ms, ct = mt;
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      cs = fmax(cs, xs[k]);
      ct = fmax(ct, xt[k]);
    }
    if (cs > ms) {
      zs *= fd_exp(ms - cs);
      ms = cs;
    }
    if (ct > mt) {
      const acc_t r = fd_exp(mt - ct);
      zt *= r;
      a *= r;
      mt = ct;
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      zs += fd_exp(xs[k] - ms);
      const acc_t et = fd_exp(xt[k] - mt);
      zt += et;
      a += et > acc_t(0) ? et * (xt[k] - xs[k]) : acc_t(0);  // 0 where pt == 0 (masked entries: -inf - -inf)
    }
  }

  __device__ __forceinline__ void merge(acc_t ms2, acc_t zs2, acc_t mt2, acc_t zt2, acc_t a2) {
    const acc_t ms_new = fmax(ms, ms2), mt_new = fmax(mt, mt2);
    zs = zs * fd_exp(ms - ms_new) + zs2 * fd_exp(ms2 - ms_new);
    const acc_t r1 = fd_exp(mt - mt_new), r2 = fd_exp(mt2 - mt_new);
    zt = zt * r1 + zt2 * r2;
    a = a * r1 + a2 * r2;
    ms = ms_new;
    mt = mt_new;
  }

  __device__ __forceinline__ void merge_warp() {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      merge(__shfl_xor_sync(0xffffffffu, ms, offset), __shfl_xor_sync(0xffffffffu, zs, offset),
            __shfl_xor_sync(0xffffffffu, mt, offset), __shfl_xor_sync(0xffffffffu, zt, offset),
            __shfl_xor_sync(0xffffffffu, a, offset));
    }
  }
};

// kVec elements loaded as one 16-byte (or narrower) transaction.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, typename acc_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kl_rows_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                           int64_t student_row_stride, int64_t teacher_row_stride, const int64_t* __restrict__ labels,
                           int64_t ignore_index, scalar_t* __restrict__ grad, float* __restrict__ loss,
                           const float* __restrict__ grad_scale, int64_t vocab, acc_t inv_t, acc_t loss_scale) {
  using P = Pack<scalar_t, kVec>;
  // int64 row offsets: N * V passes 2^31 for LLM vocabularies (4096 tokens x 128k entries)
  const int64_t row = blockIdx.x;
  const scalar_t* s = student + row * student_row_stride;
  const scalar_t* t = teacher + row * teacher_row_stride;
  scalar_t* g = grad != nullptr ? grad + row * vocab : nullptr;
  const int tid = threadIdx.x;
  const int n_threads = blockDim.x;
  const int64_t n_packs = vocab / kVec;  // [n_packs * kVec, vocab) is the scalar tail

  if (labels != nullptr && labels[row] == ignore_index) {
    if (tid == 0) loss[row] = 0.0f;
    if (g != nullptr) {
      for (int64_t j = tid; j < vocab; j += n_threads) g[j] = scalar_t(0);
    }
    return;
  }

  // pass 1: online max / sum-exp of both rows and the teacher-weighted sum
  RowState<acc_t> st;
  st.init();
  for (int64_t p = tid; p < n_packs; p += n_threads) {
    const P b_s = reinterpret_cast<const P*>(s)[p];  // [kVec]
    const P b_t = reinterpret_cast<const P*>(t)[p];  // [kVec]
    acc_t xs[kVec], xt[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      xs[k] = static_cast<acc_t>(b_s.v[k]) * inv_t;
      xt[k] = static_cast<acc_t>(b_t.v[k]) * inv_t;
    }
    st.template add<kVec>(xs, xt);
  }
  for (int64_t j = n_packs * kVec + tid; j < vocab; j += n_threads) {
    const acc_t xs[1] = {static_cast<acc_t>(s[j]) * inv_t};
    const acc_t xt[1] = {static_cast<acc_t>(t[j]) * inv_t};
    st.template add<1>(xs, xt);
  }

  // block reduction: warps, then the first warp over the warps' results
  __shared__ acc_t sh[5][kMaxThreads / kWarp];
  __shared__ acc_t sh_row[4];  // max and log(sum exp(x' - max)) of s' and t'
  st.merge_warp();
  const int warp = tid / kWarp, lane = tid % kWarp, n_warps = (n_threads + kWarp - 1) / kWarp;
  if (lane == 0) {
    sh[0][warp] = st.ms;
    sh[1][warp] = st.zs;
    sh[2][warp] = st.mt;
    sh[3][warp] = st.zt;
    sh[4][warp] = st.a;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane < n_warps) {
      st.ms = sh[0][lane];
      st.zs = sh[1][lane];
      st.mt = sh[2][lane];
      st.zt = sh[3][lane];
      st.a = sh[4][lane];
    } else {
      st.init();
    }
    st.merge_warp();
    if (lane == 0) {
      // KL(pt || ps) = sum pt (t' - s') - lse_t + lse_s, the maxes subtracted first (exact for close values)
      const acc_t kl = st.a / st.zt + (st.ms - st.mt) + (fd_log(st.zs) - fd_log(st.zt));
      sh_row[0] = st.ms;
      sh_row[1] = fd_log(st.zs);
      sh_row[2] = st.mt;
      sh_row[3] = fd_log(st.zt);
      loss[row] = static_cast<float>(loss_scale * kl);
    }
  }
  if (g == nullptr) return;  // uniform across the block
  __syncthreads();

  // pass 2: d loss / d student = (ps - pt) * loss_scale / T * grad_scale, with log p = (x' - max) - log(sum): x' - max
  // is exact for close values, so the error stays relative to |log p| even for logits of 1e4
  const acc_t ms = sh_row[0], log_zs = sh_row[1], mt = sh_row[2], log_zt = sh_row[3];
  const acc_t c = loss_scale * inv_t * static_cast<acc_t>(grad_scale[0]);
  for (int64_t p = tid; p < n_packs; p += n_threads) {
    const P b_s = reinterpret_cast<const P*>(s)[p];
    const P b_t = reinterpret_cast<const P*>(t)[p];
    P b_g;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t ps = fd_exp((static_cast<acc_t>(b_s.v[k]) * inv_t - ms) - log_zs);
      const acc_t pt = fd_exp((static_cast<acc_t>(b_t.v[k]) * inv_t - mt) - log_zt);
      b_g.v[k] = static_cast<scalar_t>((ps - pt) * c);
    }
    reinterpret_cast<P*>(g)[p] = b_g;
  }
  for (int64_t j = n_packs * kVec + tid; j < vocab; j += n_threads) {
    const acc_t ps = fd_exp((static_cast<acc_t>(s[j]) * inv_t - ms) - log_zs);
    const acc_t pt = fd_exp((static_cast<acc_t>(t[j]) * inv_t - mt) - log_zt);
    g[j] = static_cast<scalar_t>((ps - pt) * c);
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int threads_for(int64_t packs) {
  // about 4 packs per thread, in [128, 1024], a whole number of warps
  int threads = 128;
  while (threads < kMaxThreads && threads * 4 < packs) threads *= 2;
  return threads;
}

template <typename scalar_t>
void launch_forward_kl(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
                       int64_t ignore_index, scalar_t* grad, float* loss, const float* grad_scale, double temperature,
                       double loss_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads
  const int64_t n_rows = student.size(0), vocab = student.size(1);
  const auto* s = student.data_ptr<scalar_t>();
  const auto* t = teacher.data_ptr<scalar_t>();
  // wide loads need every row start 16-byte aligned: aligned base pointers and row strides that keep them so
  const bool vec_ok = aligned(s, 16) && aligned(t, 16) && (grad == nullptr || aligned(grad, 16)) &&
                      student.stride(0) % kVec == 0 && teacher.stride(0) % kVec == 0 && vocab % kVec == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(n_rows));
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  if (vec_ok) {
    forward_kl_rows_kernel<scalar_t, acc_t, kVec><<<grid, threads_for(vocab / kVec), 0, stream>>>(
        s, t, student.stride(0), teacher.stride(0), labels, ignore_index, grad, loss, grad_scale, vocab, inv_t,
        static_cast<acc_t>(loss_scale));
  } else {
    forward_kl_rows_kernel<scalar_t, acc_t, 1><<<grid, threads_for(vocab), 0, stream>>>(
        s, t, student.stride(0), teacher.stride(0), labels, ignore_index, grad, loss, grad_scale, vocab, inv_t,
        static_cast<acc_t>(loss_scale));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const char* divergence_name(int64_t id) {
  static const char* names[] = {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"};
  return id >= 0 && id < 6 ? names[id] : "unknown";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_rows_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double beta, double temperature, int64_t ignore_index,
    double loss_scale, bool need_grad, double ce_weight) {
  FD_CHECK_CUDA(student);
  FD_CHECK_FLOAT(student);
  FD_CHECK_ROWS(student);
  FD_CHECK_ROWS(teacher);
  FD_CHECK_SAME(student, teacher);
  FD_CHECK_SCALE(grad_scale);
  TORCH_CHECK(grad_scale.device() == student.device(), "grad_scale is on ", grad_scale.device(), " but student is on ",
              student.device(), "; expected the same device");
  const int64_t div = checked_divergence(divergence, beta, temperature);
  TORCH_CHECK(div == 0, "distill_loss_rows on CUDA implements only divergence=0 (forward_kl), got divergence=",
              divergence, " (", divergence_name(divergence), ", beta=", beta,
              "); use backend='triton' or 'torch' for it");
  // the fused cross-entropy term is implemented by the Triton, C++ CPU and torch backends only
  // (fastdistill.ops.distill_loss.resolve_backend never routes it here)
  TORCH_CHECK(ce_weight == 0.0, "distill_loss_rows on CUDA has no fused cross-entropy term: ce_weight=", ce_weight,
              "; expected 0 (use backend='triton' or 'torch' for ce_weight > 0)");
  c10::cuda::CUDAGuard guard(student.device());

  at::Tensor labels_i64;
  if (labels.has_value()) {
    FD_CHECK_LABELS(*labels, student);
    labels_i64 = labels->reshape({-1}).to(at::kLong).contiguous();
  }
  const at::Tensor scale_f32 = grad_scale.reshape({1}).to(at::kFloat).contiguous();
  const int64_t n_rows = student.size(0), vocab = student.size(1);
  at::Tensor loss = at::empty({n_rows}, student.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty({n_rows, vocab}, student.options()) : at::empty({0}, student.options());
  const at::Tensor ce_rows = at::empty({0}, student.options().dtype(at::kFloat));
  if (n_rows == 0) return {loss, grad, ce_rows};
  if (vocab == 0) return {loss.zero_(), grad, ce_rows};
  TORCH_CHECK(n_rows <= 2147483647, "student has ", n_rows, " rows; the CUDA kernel takes at most 2^31 - 1 (one block "
              "per row)");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distill_loss_rows_cuda", [&] {
    launch_forward_kl<scalar_t>(student, teacher, labels.has_value() ? labels_i64.data_ptr<int64_t>() : nullptr,
                                ignore_index, need_grad ? grad.data_ptr<scalar_t>() : nullptr,
                                loss.data_ptr<float>(), scale_f32.data_ptr<float>(), temperature, loss_scale);
  });
  return {loss, grad, ce_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) { m.impl("distill_loss_rows", &distill_loss_rows_cuda); }

}  // namespace fastdistill
