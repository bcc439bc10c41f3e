// Baseline variant of the CPU row kernels: the build's own -march flags and at::vec's generic Vectorized (its
// CPU_CAPABILITY namespace is left at the default). Runs where the AVX2 variant cannot (see kernels_avx2.cpp).
#if defined(__GNUC__) && !defined(__clang__)
// setup.py builds with -ffast-math; its reassociation would fold (x - max) - log_z back into x - lse and lose the
// precision that order keeps for large logits (see cpu_kernels_impl.h)
#pragma GCC optimize("no-associative-math")
#endif
#define FASTDISTILL_CPU_NS cpu_default
#include "cpu_kernels_impl.h"
#include "topk_kernels_impl.h"
#undef FASTDISTILL_CPU_NS

#include <cstdlib>
#include <cstring>

namespace fastdistill::cpu {

const char* active_capability() {
  // FASTDISTILL_CPU_CAPABILITY=default forces the baseline kernels (tests use it to cover both variants); read on
  // every call so a test can change it in-process.
  const char* forced = std::getenv("FASTDISTILL_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return "default";
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool avx2 = cpu_avx2::compiled() && __builtin_cpu_supports("avx2") &&
                           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return avx2 ? "avx2" : "default";
#else
  return "default";
#endif
}

}  // namespace fastdistill::cpu
