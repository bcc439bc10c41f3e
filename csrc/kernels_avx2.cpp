// AVX2 + FMA + F16C variant of the CPU row kernels, chosen at run time when the CPU has them.
//
// The build targets a portable baseline (setup.py: -march=x86-64-v2), so this file turns the extra instructions on
// for the kernels only (#pragma GCC target) and compiles ATen's vec headers with CPU_CAPABILITY=AVX2, which puts
// the AVX2 Vectorized in its own namespace (at::vec::AVX2) as ATen does for its own kernels. Standard and c10
// headers are included before the pragma so their inline functions are compiled for the baseline: a copy the linker
// might share with other files never holds AVX2 instructions.
#include "cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // a lambda in vec256_bfloat16.h returns __m256 (unused here)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// setup.py builds with -ffast-math; its reassociation would fold (x - max) - log_z back into x - lse and lose the
// precision that order keeps for large logits (see cpu_kernels_impl.h)
#pragma GCC optimize("no-associative-math")
// g++ does not define the ISA macros for a target pragma (C does); ATen's vec headers and sleef.h test them
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTDISTILL_CPU_NS cpu_avx2
#include "cpu_kernels_impl.h"
#include "topk_kernels_impl.h"
#pragma GCC pop_options
#pragma GCC diagnostic pop

namespace fastdistill::cpu::cpu_avx2 {
bool compiled() { return true; }
}  // namespace fastdistill::cpu::cpu_avx2

#else  // no GCC target pragmas (clang, MSVC, other architectures): only the baseline kernels exist

#include <cstdlib>

namespace fastdistill::cpu::cpu_avx2 {
bool compiled() { return false; }
void distill_loss_rows_range(const DistillRowsArgs&, int64_t, int64_t) { std::abort(); }
void kl_div_rows_range(const KlDivRowsArgs&, int64_t, int64_t) { std::abort(); }
void topk_targets_rows_range(const TopkTargetsArgs&, int64_t, int64_t) { std::abort(); }
}  // namespace fastdistill::cpu::cpu_avx2

#endif
