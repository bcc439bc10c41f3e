// Vectorized CPU row kernels of distill_loss_rows and kl_div_rows, written once against at::vec::Vectorized.
//
// Included by kernels_default.cpp and kernels_avx2.cpp only, each time with FASTDISTILL_CPU_NS naming the namespace
// the functions land in and ATen's CPU_CAPABILITY set to match (the vec headers put Vectorized in
// at::vec::<CPU_CAPABILITY>, so the two variants never share a symbol). No include guard on purpose.
//
// Maths per row (s' = student / T, t' = teacher / T, ps = softmax(s'), pt = softmax(t')), all in float32 (float64 for
// float64 inputs):
//   pass 1   online per-lane max and sum of exp of both rows (the sum is rescaled only when a lane's max moves, so
//            there is about one exp per element); forward / reverse KL also accumulate sum exp(t' - mt) (t' - s') /
//            sum exp(s' - ms) (s' - t') with the same rescaling, which gives their loss without another pass.
//   pass 2   KL: the gradient. JSD / TVD / skew KL: the loss and S = sum_k ps_k a_k, with a = dL / dps.
//   pass 3   JSD / TVD / skew KL: the gradient dL/ds'_j = ps_j (a_j - S).
// The forward KL with a gradient (the common training case) runs forward_kl_row_cached instead: pass 1 goes block by
// block (max, then exp) and keeps its exps, so pass 2 needs no exp at all.
// Common vocabulary width (args.vocab_common = Vc <= Vs = args.vocab, a teacher narrower than the student): the passes
// above span the columns [0, Vc) of both rows; the student's columns [Vc, Vs) are in the cross-entropy only (pass 1
// adds them to its online sum, the gradient pass writes its term there) and get gradient 0 without it.
// Fused cross-entropy term (args.ce_rows != nullptr): at T == 1 (and Vc == Vs) the student's running max / sum of
// pass 1 are also the CE's log-sum-exp; otherwise pass 1 keeps one more online sum over the raw student row. The passes that write the
// gradient add ce_c softmax(s) to it and then subtract ce_c at the label (ce_c = grad_scale * ce_scale).
// log p is always formed as (x' - max) - log(sum), never x' - lse in float32, which would lose ~1e-4 for logits of
// 1e4 (the kernel files turn off -ffast-math's reassociation so the compiler keeps that order).
// Terms with a zero probability are 0 ("0 where p == 0"), so -inf at the same entries of both rows (a masked
// vocabulary) gives a finite loss and a zero gradient there. NaN or +inf anywhere in a row gives a NaN loss and a
// NaN gradient row.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace fastdistill::cpu::FASTDISTILL_CPU_NS {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp_u20: ATen's polynomial exp (max error 20 ulp, ~1e-6 relative; no Sleef call). Not NaN-preserving, which is
// why rows are checked for NaN separately.
inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

// True when any lane of a comparison result (all-ones / all-zeros lanes) is set.
template <typename T>
inline bool any_lane(const Vec<T>& mask) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_movemask_ps(mask) != 0;
  } else {
    return _mm256_movemask_pd(mask) != 0;
  }
#else
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits bits[Vec<T>::size()];
  mask.store(bits);
  Bits any = 0;
  for (int k = 0; k < Vec<T>::size(); ++k) any |= bits[k];
  return any != 0;
#endif
}

// p * x, with 0 where p == 0 (also when x is NaN or infinite there).
template <typename T>
inline Vec<T> safe_mul(const Vec<T>& p, const Vec<T>& x) {
  const Vec<T> zero(0);
  return Vec<T>::blendv(p * x, zero, p == zero);
}

template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec<acc_t>::loadu(p);
  } else {
    Vec<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// The last n < Vec::size() elements of a row, padded with `pad`.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_tail(const scalar_t* p, int64_t n, acc_t pad) {
  __at_align__ acc_t buf[Vec<acc_t>::size()];
  for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_t>(p[k]);
  for (int64_t k = n; k < Vec<acc_t>::size(); ++k) buf[k] = pad;
  return Vec<acc_t>::loadu(buf);
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, const Vec<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, static_cast<int>(n));
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(n));
  }
}

// Calls f(s_chunk, t_chunk, offset, count) over a row pair, both chunks multiplied by `scale`; the tail chunk is
// padded with -inf (zero probability, so it adds nothing to any sum).
template <typename acc_t, typename scalar_t, typename F>
inline void for_each_chunk(const scalar_t* s, const scalar_t* t, int64_t V, acc_t scale, F&& f) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> vscale(scale);
  int64_t j = 0;
  for (; j + W <= V; j += W) f(load<acc_t>(s + j) * vscale, load<acc_t>(t + j) * vscale, j, W);
  if (j < V) {
    const acc_t pad = -std::numeric_limits<acc_t>::infinity();
    f(load_tail<acc_t>(s + j, V - j, pad) * vscale, load_tail<acc_t>(t + j, V - j, pad) * vscale, j, V - j);
  }
}

// Row sums are blocked so that their rounding error does not grow with V: the vector lanes accumulate at most
// kFlushChunks chunks (2048 float32 elements with AVX2) in acc_t, then the block's total is folded into a double.
// A plain running fp32 sum over a 128k row lost ~1e-5 relative (3x torch's cascade sum) and grew with V; the fold
// costs one horizontal reduction per block.
constexpr int kFlushChunks = 256;

// sum of chunks: lanes for one block, a double across blocks
template <typename acc_t>
struct BlockedSum {
  Vec<acc_t> lanes = Vec<acc_t>(0);
  double total = 0;
  int count = 0;

  inline void add(const Vec<acc_t>& x) {
    lanes = lanes + x;
    if (++count == kFlushChunks) flush();
  }
  inline void flush() {
    total += at::vec::vec_reduce_all<acc_t>([](Vec<acc_t> x, Vec<acc_t> y) { return x + y; }, lanes);
    lanes = Vec<acc_t>(0);
    count = 0;
  }
  double finish() {
    flush();
    return total;
  }
};

// Per-lane online log-sum-exp: running max m, z = sum exp(x - m), and an optional weighted sum a = sum exp(x - m) w
// rescaled with z. m starts at the lowest finite value (not -inf) so that -inf inputs give exp(-inf) = 0, never
// exp(-inf - -inf) = NaN. Every kFlushChunks chunks the lanes' z and a are folded into a scalar (max, sum, weighted
// sum) kept in double (see BlockedSum); the lane maxima stay, so the next block rescales only when they move.
template <typename acc_t>
struct OnlineLse {
  Vec<acc_t> m = Vec<acc_t>(std::numeric_limits<acc_t>::lowest());
  Vec<acc_t> z = Vec<acc_t>(0);
  Vec<acc_t> a = Vec<acc_t>(0);
  double fold_max = -std::numeric_limits<double>::infinity(), fold_z = 0, fold_a = 0;
  int count = 0;

  // Adds x and returns exp(x - m) under the updated max. The caller adds its weighted term to `a` and then calls
  // tick() (the flush must come after that term).
  template <bool kWeighted>
  inline Vec<acc_t> add(const Vec<acc_t>& x) {
    if (any_lane(x > m)) {  // a lane's max moved: rescale (rare once the first chunks have been seen)
      const Vec<acc_t> m_new = at::vec::maximum(m, x);
      const Vec<acc_t> r = vexp(m - m_new);
      z = z * r;
      if constexpr (kWeighted) a = a * r;
      m = m_new;
    }
    const Vec<acc_t> e = vexp(x - m);
    z = z + e;
    return e;
  }
  inline void tick() {
    if (++count == kFlushChunks) flush();
  }

  // Folds the lanes into the double state and clears their sums (their maxima are kept).
  void flush() {
    constexpr int W = Vec<acc_t>::size();
    __at_align__ acc_t bm[W], bz[W], ba[W];
    m.store(bm);
    z.store(bz);
    a.store(ba);
    double mx = fold_max;
    for (int k = 0; k < W; ++k) mx = std::max(mx, static_cast<double>(bm[k]));
    const double r_old = fold_max == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(fold_max - mx);
    double zz = fold_z * r_old, aa = fold_a * r_old;
    for (int k = 0; k < W; ++k) {
      const double r = std::exp(static_cast<double>(bm[k]) - mx);
      zz += bz[k] * r;
      aa += ba[k] * r;
    }
    fold_max = mx;
    fold_z = zz;
    fold_a = aa;
    z = Vec<acc_t>(0);
    a = Vec<acc_t>(0);
    count = 0;
  }

  // max, log-sum-exp and the weighted sum divided by the sum of exp, over everything added.
  struct Result {
    double max, lse, weighted_mean;
  };
  Result finish() {
    flush();
    return {fold_max, fold_max + std::log(fold_z), fold_a / fold_z};
  }
};

template <typename scalar_t>
inline void fill_row(scalar_t* g, int64_t V, float value) {
  if (value == 0.0f) {
    std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * V);  // all-zero bits are +0 in every float type
  } else {
    std::fill(g, g + V, static_cast<scalar_t>(value));
  }
}

// dL/dps (a) and the loss term of one chunk for the divergences that need a pass for S = sum ps a.
template <typename acc_t, int64_t kDiv>
struct ThreePass {
  Vec<acc_t> beta, one_minus_beta;
  bool beta_one;  // skew KLs at beta = 1: the mixture is the distribution itself, so L = 0 and dL/dps is constant
  explicit ThreePass(double b)
      : beta(static_cast<acc_t>(b)), one_minus_beta(static_cast<acc_t>(1.0 - b)), beta_one(b == 1.0) {}

  inline void eval(const Vec<acc_t>& lps, const Vec<acc_t>& lpt, const Vec<acc_t>& ps, const Vec<acc_t>& pt,
                   Vec<acc_t>& term, Vec<acc_t>& a) const {
    const Vec<acc_t> zero(0);
    if constexpr (kDiv == kJSD) {
      // m = (1 - beta) ps + beta pt;  L = beta KL(pt || m) + (1 - beta) KL(ps || m);  dL/dps = (1 - beta) log(ps / m)
      const Vec<acc_t> lm = (one_minus_beta * ps + beta * pt).log();
      term = beta * safe_mul(pt, lpt - lm) + one_minus_beta * safe_mul(ps, lps - lm);
      a = one_minus_beta * (lps - lm);
    } else if constexpr (kDiv == kTVD) {
      // L = 0.5 sum |ps - pt|;  dL/dps = 0.5 sign(ps - pt) (0 where equal, as torch's abs)
      const Vec<acc_t> d = ps - pt;
      const Vec<acc_t> half(0.5);
      term = half * d.abs();
      a = Vec<acc_t>::blendv(Vec<acc_t>::blendv(zero, half, d > zero), zero - half, d < zero);
    } else if ((kDiv == kSkewForwardKL || kDiv == kSkewReverseKL) && beta_one) {
      term = zero;  // exactly 0, not the rounding error of log(p) - log(p)
      a = zero;
    } else if constexpr (kDiv == kSkewForwardKL) {
      // m = beta pt + (1 - beta) ps;  L = KL(pt || m);  dL/dps = -(1 - beta) pt / m
      const Vec<acc_t> mix = beta * pt + one_minus_beta * ps;
      term = safe_mul(pt, lpt - mix.log());
      a = zero - one_minus_beta * pt / mix;
    } else {
      static_assert(kDiv == kSkewReverseKL);
      // m = beta ps + (1 - beta) pt;  L = KL(ps || m);  dL/dps = log(ps / m) + 1 - beta ps / m (the +1 cancels in
      // ps (a - S) because sum ps = 1, so it is left out)
      const Vec<acc_t> mix = beta * ps + one_minus_beta * pt;
      term = safe_mul(ps, lps - mix.log());
      a = (lps - mix.log()) - beta * ps / mix;
    }
  }
};

// The raw (unscaled) student chunk at offset j of n elements, -inf padded like for_each_chunk's tail.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> raw_chunk(const scalar_t* s, int64_t j, int64_t n) {
  return n == Vec<acc_t>::size() ? load<acc_t>(s + j)
                                 : load_tail<acc_t>(s + j, n, -std::numeric_limits<acc_t>::infinity());
}

// Calls f(raw chunk, offset, count) over the student's columns [j0, j1) (the cross-entropy-only tail [Vc, Vs)).
template <typename acc_t, typename scalar_t, typename F>
inline void for_each_raw_chunk(const scalar_t* s, int64_t j0, int64_t j1, F&& f) {
  constexpr int64_t W = Vec<acc_t>::size();
  for (int64_t j = j0; j < j1; j += W) {
    const int64_t n = std::min<int64_t>(W, j1 - j);
    f(raw_chunk<acc_t>(s, j, n), j, n);
  }
}

// The label's cross-entropy lse - s[label] (in double) and the -ce_c correction of the label's gradient entry.
template <typename scalar_t>
inline void finish_ce(const DistillRowsArgs& args, const scalar_t* s, scalar_t* g, int64_t label, double lse,
                      float* ce) {
  *ce = static_cast<float>(lse - static_cast<double>(s[label]));
  if (g != nullptr) {
    g[label] = static_cast<scalar_t>(static_cast<double>(g[label]) - args.grad_scale * args.ce_scale);
  }
}

template <typename scalar_t, typename acc_t, int64_t kDiv>
void distill_row(const DistillRowsArgs& args, const scalar_t* s, const scalar_t* t, scalar_t* g, float* loss,
                 int64_t label, float* ce) {
  using V = Vec<acc_t>;
  const int64_t n_vocab = args.vocab_common;  // the divergence's columns [0, Vc)
  const int64_t n_student = args.vocab;       // the student's row [0, Vs): CE and the gradient
  const acc_t inv_t = static_cast<acc_t>(args.inv_temperature);
  const V zero(0);
  const bool with_ce = ce != nullptr;
  // then the CE's lse is the student's lse of pass 1
  const bool ce_shared = args.inv_temperature == 1.0 && n_vocab == n_student;

  // pass 1: online log-sum-exp of both rows (+ the KL's weighted sum, + the raw student's for CE at T != 1)
  OnlineLse<acc_t> os, ot, oc;
  V bad(0);  // lanes that saw a NaN
  for_each_chunk<acc_t>(s, t, n_vocab, inv_t, [&](const V& xs, const V& xt, int64_t j, int64_t n) {
    bad = bad | (xs != xs) | (xt != xt);
    if (with_ce && !ce_shared) {
      oc.template add<false>(raw_chunk<acc_t>(s, j, n));
      oc.tick();
    }
    if constexpr (kDiv == kForwardKL) {
      os.template add<false>(xs);
      const V et = ot.template add<true>(xt);
      ot.a = ot.a + safe_mul(et, xt - xs);
    } else if constexpr (kDiv == kReverseKL) {
      ot.template add<false>(xt);
      const V es = os.template add<true>(xs);
      os.a = os.a + safe_mul(es, xs - xt);
    } else {
      os.template add<false>(xs);
      ot.template add<false>(xt);
    }
    os.tick();
    ot.tick();
  });
  if (with_ce) {  // the CE-only columns [Vc, Vs) (none when Vc == Vs)
    for_each_raw_chunk<acc_t>(s, n_vocab, n_student, [&](const V& x, int64_t, int64_t) {
      bad = bad | (x != x);
      oc.template add<false>(x);
      oc.tick();
    });
  }
  const auto rs = os.finish();
  const auto rt = ot.finish();
  const double inf = std::numeric_limits<double>::infinity();
  const auto rc = with_ce && !ce_shared ? oc.finish() : rs;
  if (any_lane(bad) || rs.max == inf || rt.max == inf || std::isnan(rs.lse) || std::isnan(rt.lse) ||
      std::isnan(rc.lse)) {
    *loss = std::numeric_limits<float>::quiet_NaN();
    if (with_ce) *ce = std::numeric_limits<float>::quiet_NaN();
    if (g != nullptr) fill_row(g, n_student, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  // log p = (x' - max) - log(sum): the max is one of the inputs, so x' - max is exact when they are close, and the
  // rounding error stays relative to |log p| even for logits of 1e4 (x' - lse in float32 would lose ~1e-3)
  const V max_s(static_cast<acc_t>(rs.max)), max_t(static_cast<acc_t>(rt.max));
  const V log_z_s(static_cast<acc_t>(rs.lse - rs.max)), log_z_t(static_cast<acc_t>(rt.lse - rt.max));
  auto log_ps = [&](const V& xs) { return (xs - max_s) - log_z_s; };
  auto log_pt = [&](const V& xt) { return (xt - max_t) - log_z_t; };
  const V grad_c(static_cast<acc_t>(args.loss_scale * args.inv_temperature * args.grad_scale * args.soft_scale));
  // CE gradient ce_c softmax(s) with log softmax(s) = (s - max) - log(sum) of the raw row (or of xs when T == 1)
  const V ce_c(static_cast<acc_t>(args.grad_scale * args.ce_scale));
  const V max_c(static_cast<acc_t>(rc.max)), log_z_c(static_cast<acc_t>(rc.lse - rc.max));
  auto add_ce = [&](const V& grad, const V& xs, int64_t j, int64_t n) {
    if (!with_ce) return grad;
    const V x = ce_shared ? xs : raw_chunk<acc_t>(s, j, n);
    return grad + vexp((x - max_c) - log_z_c) * ce_c;
  };
  // the gradient of the columns [Vc, Vs): the CE's ce_c softmax(s) (the label's -ce_c comes in finish_ce), else 0
  auto write_tail = [&]() {
    if (n_student == n_vocab) return;
    if (!with_ce) {
      fill_row(g + n_vocab, n_student - n_vocab, 0.0f);
      return;
    }
    for_each_raw_chunk<acc_t>(s, n_vocab, n_student, [&](const V& x, int64_t j, int64_t n) {
      store<scalar_t>(g + j, vexp((x - max_c) - log_z_c) * ce_c, n);
    });
  };

  if constexpr (kDiv == kForwardKL || kDiv == kReverseKL) {
    // KL(pt || ps) = sum pt (t' - s') - lse_t + lse_s (and symmetrically for the reverse KL)
    const double raw = kDiv == kForwardKL ? rt.weighted_mean - rt.lse + rs.lse : rs.weighted_mean - rs.lse + rt.lse;
    *loss = static_cast<float>(args.loss_scale * raw);
    if (g == nullptr) {
      if (with_ce) finish_ce(args, s, g, label, rc.lse, ce);
      return;
    }
    const V raw_v(static_cast<acc_t>(raw));
    // pass 2: forward dL/ds' = ps - pt; reverse dL/ds' = ps (log ps - log pt - L)
    for_each_chunk<acc_t>(s, t, n_vocab, inv_t, [&](const V& xs, const V& xt, int64_t j, int64_t n) {
      V grad;
      if constexpr (kDiv == kForwardKL) {
        grad = (vexp(log_ps(xs)) - vexp(log_pt(xt))) * grad_c;
      } else {
        const V lps = log_ps(xs);
        grad = safe_mul(vexp(lps), lps - log_pt(xt) - raw_v) * grad_c;
      }
      store<scalar_t>(g + j, add_ce(grad, xs, j, n), n);
    });
    write_tail();
    if (with_ce) finish_ce(args, s, g, label, rc.lse, ce);
  } else {
    const ThreePass<acc_t, kDiv> div(args.beta);
    // pass 2: loss and S = sum ps a
    // TVD: a takes three values (+1/2, -1/2, 0), so S = (P+ - P-) / 2 with P+- the student mass where ps > pt / ps < pt.
    // a_j - S is then formed from the masses on the other sides, never as the difference of two numbers near 1/2:
    //   a = +1/2: (2 P- + P0) / 2P     a = -1/2: -(2 P+ + P0) / 2P     a = 0: (P- - P+) / 2P     (P = P+ + P- + P0)
    // (with a dominant token, 1/2 - S cancels, and the exp's rounding error in S came back several times larger)
    BlockedSum<acc_t> acc_loss, acc_pa, acc_pos, acc_neg, acc_zero;
    for_each_chunk<acc_t>(s, t, n_vocab, inv_t, [&](const V& xs, const V& xt, int64_t, int64_t) {
      const V lps = log_ps(xs), lpt = log_pt(xt);
      const V ps = vexp(lps);
      V term, a;
      div.eval(lps, lpt, ps, vexp(lpt), term, a);
      acc_loss.add(term);
      if constexpr (kDiv == kTVD) {
        acc_pos.add(V::blendv(zero, ps, a > zero));
        acc_neg.add(V::blendv(zero, ps, a < zero));
        acc_zero.add(V::blendv(zero, ps, a == zero));
      } else {
        acc_pa.add(safe_mul(ps, a));
      }
    });
    const double raw = acc_loss.finish();
    *loss = static_cast<float>(args.loss_scale * raw);
    if (g == nullptr) {
      if (with_ce) finish_ce(args, s, g, label, rc.lse, ce);
      return;
    }
    const V sum_pa(static_cast<acc_t>(acc_pa.finish()));
    const double p_pos = acc_pos.finish(), p_neg = acc_neg.finish(), p_zero = acc_zero.finish();
    const double two_p = 2 * (p_pos + p_neg + p_zero);
    const V c_pos(static_cast<acc_t>((2 * p_neg + p_zero) / two_p)), c_neg(static_cast<acc_t>(-(2 * p_pos + p_zero) / two_p));
    const V c_zero(static_cast<acc_t>((p_neg - p_pos) / two_p));
    // pass 3: dL/ds'_j = ps_j (a_j - S)
    for_each_chunk<acc_t>(s, t, n_vocab, inv_t, [&](const V& xs, const V& xt, int64_t j, int64_t n) {
      const V lps = log_ps(xs), lpt = log_pt(xt);
      const V ps = vexp(lps);
      V term, a;
      div.eval(lps, lpt, ps, vexp(lpt), term, a);
      V a_minus_s;
      if constexpr (kDiv == kTVD) {
        a_minus_s = V::blendv(V::blendv(c_zero, c_pos, a > zero), c_neg, a < zero);
      } else {
        a_minus_s = a - sum_pa;
      }
      store<scalar_t>(g + j, add_ce(safe_mul(ps, a_minus_s) * grad_c, xs, j, n), n);
    });
    write_tail();
    if (with_ce) finish_ce(args, s, g, label, rc.lse, ce);
  }
}

// Forward KL with the gradient, exps computed once: the row is cut into blocks that fit in L1; each block is swept
// for its max (no exp), then for exp(s' - block max) and exp(t' - block max), which are kept (in the gradient row
// when it is float32, else in a per-thread scratch row; both stay in L2) while the block sums are merged into the
// row's running sums. Pass 2 turns the kept values into ps - pt with two multiplies per element and no exp.
constexpr int64_t kBlock = 2048;  // elements: 8 KiB of float32 per row and block, so both blocks sit in L1

template <typename acc_t>
inline acc_t reduce_max(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t> x, Vec<acc_t> y) { return at::vec::maximum(x, y); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t> x, Vec<acc_t> y) { return x + y; }, v);
}

template <typename acc_t>
struct ScratchRows {
  std::vector<acc_t> values;
  std::vector<acc_t> block_max;
};

template <typename acc_t>
ScratchRows<acc_t>& thread_scratch() {
  thread_local ScratchRows<acc_t> scratch;  // grows to the largest row seen by this thread, reused across calls
  return scratch;
}

template <typename scalar_t, typename acc_t>
void forward_kl_row_cached(const DistillRowsArgs& args, const scalar_t* s, const scalar_t* t, scalar_t* g,
                           float* loss, int64_t label, float* ce) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t n_vocab = args.vocab_common;  // routed here only when the CE is off or Vc == Vs
  const int64_t n_blocks = (n_vocab + kBlock - 1) / kBlock;
  const V inv_t(static_cast<acc_t>(args.inv_temperature));
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();
  const acc_t pad = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kGradIsAcc = std::is_same_v<scalar_t, acc_t>;

  ScratchRows<acc_t>& scratch = thread_scratch<acc_t>();
  const size_t need = static_cast<size_t>(kGradIsAcc ? n_vocab : 2 * n_vocab);
  if (scratch.values.size() < need) scratch.values.resize(need);
  if (scratch.block_max.size() < static_cast<size_t>(2 * n_blocks)) scratch.block_max.resize(2 * n_blocks);
  acc_t* exp_s;  // [V] exp(s' - block max of s')
  acc_t* exp_t;  // [V] exp(t' - block max of t')
  if constexpr (kGradIsAcc) {
    exp_s = g;
    exp_t = scratch.values.data();
  } else {
    exp_s = scratch.values.data();
    exp_t = scratch.values.data() + n_vocab;
  }
  acc_t* block_max = scratch.block_max.data();  // [2, n_blocks]: s' then t'

  // pass 1, block by block: max sweep, then exp sweep; the block sums are merged into running (max, sum) in double
  double ms = lowest, zs = 0, mt = lowest, zt = 0, a = 0;
  V bad(0);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t j0 = b * kBlock, j1 = std::min(n_vocab, j0 + kBlock);
    auto load_pair = [&](int64_t j, V& xs, V& xt) {
      if (j + W <= j1) {
        xs = load<acc_t>(s + j) * inv_t;
        xt = load<acc_t>(t + j) * inv_t;
      } else {
        xs = load_tail<acc_t>(s + j, j1 - j, pad) * inv_t;
        xt = load_tail<acc_t>(t + j, j1 - j, pad) * inv_t;
      }
    };
    V vmax_s(lowest), vmax_t(lowest);
    for (int64_t j = j0; j < j1; j += W) {
      V xs, xt;
      load_pair(j, xs, xt);
      bad = bad | (xs != xs) | (xt != xt);
      vmax_s = at::vec::maximum(vmax_s, xs);
      vmax_t = at::vec::maximum(vmax_t, xt);
    }
    const acc_t bms = reduce_max(vmax_s), bmt = reduce_max(vmax_t);
    block_max[b] = bms;
    block_max[n_blocks + b] = bmt;
    const V vbms(bms), vbmt(bmt);
    V vzs(0), vzt(0), va(0);
    for (int64_t j = j0; j < j1; j += W) {
      V xs, xt;
      load_pair(j, xs, xt);
      const V es = vexp(xs - vbms), et = vexp(xt - vbmt);
      const int64_t n = std::min<int64_t>(W, j1 - j);
      es.store(exp_s + j, static_cast<int>(n));
      et.store(exp_t + j, static_cast<int>(n));
      vzs = vzs + es;
      vzt = vzt + et;
      va = va + safe_mul(et, xt - xs);
    }
    const double ms_new = std::max(ms, static_cast<double>(bms));
    zs = zs * std::exp(ms - ms_new) + reduce_sum(vzs) * std::exp(bms - ms_new);
    ms = ms_new;
    const double mt_new = std::max(mt, static_cast<double>(bmt));
    const double r_old = std::exp(mt - mt_new), r_block = std::exp(bmt - mt_new);
    zt = zt * r_old + reduce_sum(vzt) * r_block;
    a = a * r_old + reduce_sum(va) * r_block;
    mt = mt_new;
  }
  const double lse_s = ms + std::log(zs), lse_t = mt + std::log(zt);
  const double inf = std::numeric_limits<double>::infinity();
  if (any_lane(bad) || ms == inf || mt == inf || std::isnan(lse_s) || std::isnan(lse_t)) {
    *loss = std::numeric_limits<float>::quiet_NaN();
    if (ce != nullptr) *ce = std::numeric_limits<float>::quiet_NaN();
    fill_row(g, args.vocab, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  // KL(pt || ps) = sum pt (t' - s') - lse_t + lse_s
  *loss = static_cast<float>(args.loss_scale * (a / zt - lse_t + lse_s));

  // pass 2: grad = (exp_s * exp(bms - lse_s) - exp_t * exp(bmt - lse_t)) * loss_scale / T * grad_scale; the fused CE
  // (only routed here at T == 1, where ps is also the CE's softmax) adds grad_scale * ce_scale * ps to it
  const double c = args.loss_scale * args.inv_temperature * args.grad_scale * args.soft_scale;
  const double c_s = ce != nullptr ? c + args.grad_scale * args.ce_scale : c;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t j0 = b * kBlock, j1 = std::min(n_vocab, j0 + kBlock);
    const V cs(static_cast<acc_t>(std::exp(block_max[b] - lse_s) * c_s));
    const V ct(static_cast<acc_t>(std::exp(block_max[n_blocks + b] - lse_t) * c));
    for (int64_t j = j0; j < j1; j += W) {
      const int64_t n = std::min<int64_t>(W, j1 - j);
      const V es = n == W ? V::loadu(exp_s + j) : V::loadu(exp_s + j, static_cast<int>(n));
      const V et = n == W ? V::loadu(exp_t + j) : V::loadu(exp_t + j, static_cast<int>(n));
      store<scalar_t>(g + j, es * cs - et * ct, n);
    }
  }
  if (args.vocab > n_vocab) fill_row(g + n_vocab, args.vocab - n_vocab, 0.0f);  // no CE here: the tail's gradient is 0
  if (ce != nullptr) finish_ce(args, s, g, label, lse_s, ce);
}

template <typename scalar_t, typename acc_t>
void distill_rows_typed(const DistillRowsArgs& args, int64_t begin, int64_t end) {
  const auto* student = static_cast<const scalar_t*>(args.student);
  const auto* teacher = static_cast<const scalar_t*>(args.teacher);
  auto* grad = static_cast<scalar_t*>(args.grad);
  const int64_t n_vocab = args.vocab;
  for (int64_t i = begin; i < end; ++i) {
    // int64 offsets: N * V passes 2^31 for LLM vocabularies (4096 tokens x 128k entries)
    const scalar_t* s = student + i * args.student_row_stride;
    const scalar_t* t = teacher + i * args.teacher_row_stride;
    scalar_t* g = grad != nullptr ? grad + i * n_vocab : nullptr;
    float* loss = args.loss + i;
    float* ce = args.ce_rows != nullptr ? args.ce_rows + i : nullptr;  // labels are present when CE is on
    if ((args.labels != nullptr && args.labels[i] == args.ignore_index) || n_vocab == 0) {
      *loss = 0.0f;
      if (ce != nullptr) *ce = 0.0f;
      if (g != nullptr) fill_row(g, n_vocab, 0.0f);
      continue;
    }
    const int64_t label = ce != nullptr ? args.labels[i] : 0;
    switch (args.divergence) {
      case kForwardKL:
        // the cached kernel shares the student's exps with CE only at T == 1 over the full row; otherwise the generic
        // row keeps the raw student's extra online sum in its pass 1
        if (g != nullptr && (ce == nullptr || (args.inv_temperature == 1.0 && args.vocab_common == n_vocab))) {
          forward_kl_row_cached<scalar_t, acc_t>(args, s, t, g, loss, label, ce);
        } else {
          distill_row<scalar_t, acc_t, kForwardKL>(args, s, t, g, loss, label, ce);
        }
        break;
      case kReverseKL: distill_row<scalar_t, acc_t, kReverseKL>(args, s, t, g, loss, label, ce); break;
      case kJSD: distill_row<scalar_t, acc_t, kJSD>(args, s, t, g, loss, label, ce); break;
      case kTVD: distill_row<scalar_t, acc_t, kTVD>(args, s, t, g, loss, label, ce); break;
      case kSkewForwardKL: distill_row<scalar_t, acc_t, kSkewForwardKL>(args, s, t, g, loss, label, ce); break;
      default: distill_row<scalar_t, acc_t, kSkewReverseKL>(args, s, t, g, loss, label, ce); break;
    }
  }
}

// kl_div row: sum_j t_j (log t_j - x_j) (0 where t_j == 0) and grad_j = -grad_scale t_j, in one pass.
template <typename scalar_t, typename acc_t>
void kl_div_rows_typed(const KlDivRowsArgs& args, int64_t begin, int64_t end) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const auto* input = static_cast<const scalar_t*>(args.input);
  const auto* target = static_cast<const scalar_t*>(args.target);
  auto* grad = static_cast<scalar_t*>(args.grad);
  const int64_t n_vocab = args.vocab;
  const V neg_scale(static_cast<acc_t>(-args.grad_scale));
  // padding: target probability 0 (log-probability -inf), which adds nothing
  const acc_t target_pad = args.log_target ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* x_row = input + i * args.input_row_stride;  // int64 offsets, as above
    const scalar_t* t_row = target + i * args.target_row_stride;
    scalar_t* g_row = grad != nullptr ? grad + i * n_vocab : nullptr;
    BlockedSum<acc_t> acc;
    auto chunk = [&](const V& x, const V& tv, int64_t j, int64_t n) {
      const V t = args.log_target ? vexp(tv) : tv;
      const V log_t = args.log_target ? tv : tv.log();
      acc.add(safe_mul(t, log_t - x));
      if (g_row != nullptr) store<scalar_t>(g_row + j, t * neg_scale, n);
    };
    int64_t j = 0;
    for (; j + W <= n_vocab; j += W) chunk(load<acc_t>(x_row + j), load<acc_t>(t_row + j), j, W);
    if (j < n_vocab) {
      chunk(load_tail<acc_t>(x_row + j, n_vocab - j, acc_t(0)), load_tail<acc_t>(t_row + j, n_vocab - j, target_pad),
            j, n_vocab - j);
    }
    args.loss[i] = static_cast<float>(acc.finish());
  }
}

}  // namespace

void distill_loss_rows_range(const DistillRowsArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case Dtype::kFloat: distill_rows_typed<float, float>(args, begin, end); break;
    case Dtype::kDouble: distill_rows_typed<double, double>(args, begin, end); break;
    case Dtype::kBFloat16: distill_rows_typed<c10::BFloat16, float>(args, begin, end); break;
    case Dtype::kHalf: distill_rows_typed<c10::Half, float>(args, begin, end); break;
  }
}

void kl_div_rows_range(const KlDivRowsArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case Dtype::kFloat: kl_div_rows_typed<float, float>(args, begin, end); break;
    case Dtype::kDouble: kl_div_rows_typed<double, double>(args, begin, end); break;
    case Dtype::kBFloat16: kl_div_rows_typed<c10::BFloat16, float>(args, begin, end); break;
    case Dtype::kHalf: kl_div_rows_typed<c10::Half, float>(args, begin, end); break;
  }
}

}  // namespace fastdistill::cpu::FASTDISTILL_CPU_NS
