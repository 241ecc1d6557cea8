// The row math of the vocabulary distillation losses, shared by the CPU (rows_cpu.cpp) and the
// CUDA (rows_cuda.cu) row ops. No torch: the CUDA file compiles to a cubin without it.
//
// One token row: raw student logits z (V), tempered s = z / T, teacher t = z_t / T. A row op
// makes three passes (docs/design.md section 3):
//   1. maxima m_s, m_t (and m_z of the untempered z for the hard CE term);
//   2. sums of the shifted values ds = s - m_s, dt = t - m_t: l = sum e^d, and the divergence's
//      own sum a (jsd: a second sum pass, once log q and log p are known);
//   3. the gradient d loss / d z_s, element by element.
// The row max and the log-sum are kept apart (log q = ds - log l_s, never s - LSE_s in fp32):
// at logit spreads of 30 that keeps the gradient about 40x more accurate.
//
// Every element formula is a template over V, a scalar (float, double) or a SIMD vector, and M,
// the primitives for it (Scalar below; the CPU file's Vec for at::vec::Vectorized): one formula,
// written once, runs in the CPU's vector loop, its scalar tail and the CUDA kernel.
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

namespace fastkd {

enum Divergence : int { KL = 0, REVERSE_KL = 1, JSD = 2 };
enum Weighting : int { ENTROPY = 0, STATIC = 1 };
enum Fusion : int { MIXTURE = 0, WEIGHTED_KL = 1 };

FASTKD_HD float exp_(float x) { return expf(x); }
FASTKD_HD double exp_(double x) { return exp(x); }
FASTKD_HD float log_(float x) { return logf(x); }
FASTKD_HD double log_(double x) { return log(x); }
FASTKD_HD float log1p_(float x) { return log1pf(x); }
FASTKD_HD double log1p_(double x) { return log1p(x); }
FASTKD_HD float expm1_(float x) { return expm1f(x); }
FASTKD_HD double expm1_(double x) { return expm1(x); }
FASTKD_HD float copysign_(float x, float sign) { return copysignf(x, sign); }
FASTKD_HD double copysign_(double x, double sign) { return copysign(x, sign); }

// The primitives for one scalar of type T.
template <typename T>
struct Scalar {
  static FASTKD_HD T exp(T x) { return exp_(x); }
  static FASTKD_HD T log1p(T x) { return log1p_(x); }
  static FASTKD_HD T abs(T x) { return x < T(0) ? -x : x; }
  static FASTKD_HD T max(T a, T b) { return a > b ? a : b; }
  static FASTKD_HD T xlogy(T w, T x) { return w == T(0) ? T(0) : w * x; }  // 0 * log 0 = 0
  static FASTKD_HD T expm1(T x) { return expm1_(x); }
  static FASTKD_HD T copysign(T x, T sign) { return copysign_(x, sign); }
  static FASTKD_HD T if_below(T x, T limit, T then, T otherwise) {
    return x < limit ? then : otherwise;
  }
  // 1 / d for d in [1, 2] (the transform's 1 + e^{-2|x|}; NaN stays NaN). On the GPU without a
  // division, whose slow-path call makes the kernels spill registers: a float seed (error
  // under 2 ulp of float) and Newton steps r + r (1 - d r), each squaring the relative error
  // (one for float, two for double), exact to an ulp or so.
  static FASTKD_HD T reciprocal(T d) {
#ifdef __CUDA_ARCH__
    T r = T(__fdividef(1.0f, static_cast<float>(d)));
    r = fma(r, fma(-d, r, T(1)), r);
    if (sizeof(T) == 8) r = fma(r, fma(-d, r, T(1)), r);
    return r;
#else
    return T(1) / d;
#endif
  }
};

// ---- the model's logit transform, applied to the raw logits z as they are read:
//   f(z) = c tanh(a z / c)   (a = scale, c = softcap; no cap, c = 0 here: f(z) = a z)
// s = f(z_s) / T, t = f(z_t) / T, the hard CE on f(z_s), and the gradient by the chain rule,
// d loss / d z = d loss / d f * f'(z) with f'(z) = a sech^2(a z / c) (docs/design.md). With
// x = a z / c and e = e^{-2|x|}:
//   tanh(x) = sign(x) (-expm1(-2|x|)) / (1 + e)    (1 - e would cancel at small |x|)
//   sech^2(x) = 4 e / (1 + e)^2                    (1 - tanh^2 is 0 in fp32 once |x| > 9)
// and at |x| < small_x, f(z) = a z: tanh(x) = x to within half an ulp there, so a huge cap is
// no cap and an underflowing a / c (or a flushed denormal x) cannot zero the logits.
template <typename T>
struct LogitTransform {
  T scale, softcap, scale_over_cap;
  FASTKD_HD bool identity() const { return softcap == T(0) && scale == T(1); }
};

template <typename T>
FASTKD_HD LogitTransform<T> logit_transform(double softcap, double scale) {
  return {T(scale), T(softcap), T(softcap > 0 ? scale / softcap : 0.0)};
}

// tanh(x)^2 / x^2 = 1 - 2 x^2 / 3 + ...: x^2 / 3 below half an ulp (2^-24 fp32, 2^-53 fp64)
template <typename T>
FASTKD_HD T small_x() {
  return sizeof(T) == 8 ? T(7.450580596923828125e-9) : T(2.44140625e-4);  // 2^-27, 2^-12
}

template <typename M, typename V, typename T>
FASTKD_HD V transformed(const LogitTransform<T>& f, V z) {
  if (f.softcap == T(0)) return f.scale == T(1) ? z : z * V(f.scale);
  V x = z * V(f.scale_over_cap), abs_x = M::abs(x), minus_two_abs = V(T(-2)) * abs_x;
  V tanh_abs = (V(T(0)) - M::expm1(minus_two_abs)) * M::reciprocal(V(T(1)) + M::exp(minus_two_abs));
  return M::if_below(abs_x, V(small_x<T>()), z * V(f.scale),
                     M::copysign(V(f.softcap) * tanh_abs, x));
}

// f'(z): a sech^2(a z / c) = 4 a e / (1 + e)^2, or a without a cap.
template <typename M, typename V, typename T>
FASTKD_HD V transform_slope(const LogitTransform<T>& f, V z) {
  if (f.softcap == T(0)) return V(f.scale);
  V e = M::exp(V(T(-2)) * M::abs(z * V(f.scale_over_cap))), r = M::reciprocal(V(T(1)) + e);
  return V(T(4) * f.scale) * e * (r * r);
}

// d loss / d z = d loss / d f * f'(z) at raw logit z (the identity leaves the gradient as is).
template <typename M, typename V, typename T>
FASTKD_HD V grad_through(const LogitTransform<T>& f, V grad, V z) {
  return f.identity() ? grad : grad * transform_slope<M>(f, z);
}

// log(1 + e^x), exact for every x: max(x, 0) + log1p(e^{-|x|}).
template <typename M, typename V>
FASTKD_HD V softplus(V x) {
  return M::max(x, V(0)) + M::log1p(M::exp(V(0) - M::abs(x)));
}

// ---- pass 2: the divergence's sum term, from the shifted values ds, dt and their exps.
// kl:         a = sum e^{dt} (dt - ds)    KL(p || q) = a / l_t - log l_t + log l_s
// reverse_kl: a = sum e^{ds} (ds - dt)    KL(q || p) = a / l_s - log l_s + log l_t
template <typename M, typename V>
FASTKD_HD V divergence_term(int divergence, V ds, V dt, V e_s, V e_t) {
  return divergence == KL ? M::xlogy(e_t, dt - ds) : M::xlogy(e_s, ds - dt);
}

template <typename T>
FASTKD_HD T one_pass_divergence(int divergence, T a, T l_s, T l_t) {
  return divergence == KL ? a / l_t - log_(l_t) + log_(l_s) : a / l_s - log_(l_s) + log_(l_t);
}

// ---- jsd: with M = beta p + (1 - beta) q and x = log(beta p / ((1 - beta) q)),
// log q - log M = -log(1 - beta) - softplus(x), log p - log M = -log beta - softplus(-x), so
//   JSD = H(beta) - beta E_p[softplus(-x)] - (1 - beta) E_q[softplus(x)]
// and its gradient (1 - beta) q (E_q[softplus(x)] - softplus(x)) has no constant to cancel.
// beta's constants, computed in double whatever T is: as a float, beta = 1 - 1e-7 rounds to
// 1 - 1.19e-7, which would put a 19% error on 1 - beta and on the whole divergence.
template <typename T>
struct JsdConstants {
  T beta, one_minus_beta, log_odds_beta, binary_entropy;
};

template <typename T>
FASTKD_HD JsdConstants<T> jsd_constants(double beta) {
  const double binary_entropy = -beta * log(beta) - (1.0 - beta) * log1p(-beta);
  return {T(beta), T(1.0 - beta), T(log(beta) - log1p(-beta)), T(binary_entropy)};
}

template <typename V>
FASTKD_HD V jsd_x(V log_q, V log_p, V log_odds_beta) {
  return log_odds_beta + log_p - log_q;
}

template <typename T>
FASTKD_HD T jsd_from_sums(const JsdConstants<T>& c, T eq_sp, T ep_sp) {
  return c.binary_entropy - c.beta * ep_sp - c.one_minus_beta * eq_sp;
}

// ---- pass 3: d divergence / d s at one element (the caller multiplies by soft_weight / T).
// kl: q - p; reverse_kl: q (log q - log p - KL) = q (ds - dt - a / l_s); jsd: as above.
template <typename M, typename V>
FASTKD_HD V divergence_grad(int divergence, V log_q, V log_p, V ds, V dt, V mean_ds_dt,
                            V one_minus_beta, V log_odds_beta, V eq_sp) {
  V q = M::exp(log_q);
  if (divergence == KL) return q - M::exp(log_p);
  if (divergence == REVERSE_KL) return M::xlogy(q, ds - dt - mean_ds_dt);
  return one_minus_beta * M::xlogy(q, eq_sp - softplus<M>(jsd_x(log_q, log_p, log_odds_beta)));
}

// ---- the hard CE term at T = 1: d CE / d z_j = softmax(z)_j - onehot(label)_j; this is the
// softmax part, from the untempered max m_z and log l_z (the caller subtracts the onehot).
template <typename M, typename V>
FASTKD_HD V hard_grad(V z, V m_z, V log_l_z) {
  return M::exp(z - m_z - log_l_z);
}

// ---- multi-teacher: teacher k's entropy from its sums, H_k = log l_k - b_k / l_k with
// b_k = sum e^{dt_k} dt_k; the weighted-KL term KL(p_k || q) = a_k / l_k - log l_k + log l_s.
template <typename T>
FASTKD_HD T entropy_from_sums(T l, T b) {
  return log_(l) - b / l;
}

// ---- sparse (top-k) teacher, docs/sparse.md. One token has k ids S with the teacher's bucket
// log-probabilities log p_i (and log p_tail for tail="bucket"), computed in double over the k
// entries; the student's log q comes from the full row. Every divergence is the dense one
// against the implied teacher p~ (p_i on S, p_tail q_j / q_tail off S).

// log 2^-126, the smallest normal float: reverse KL floors the teacher's log-probabilities here
// (a zero probability would make KL(q || p) infinite and its gradient NaN).
constexpr double kLogPFloor = -87.33654475055310898657;

// log(1 - e^x) for x <= 0 (a rounding excess x > 0 counts as 0): expm1 near 0, log1p far.
FASTKD_HD double log1mexp(double x) {
  if (x >= 0) return -HUGE_VAL;
  return x > -0.6931471805599453 ? log(-expm1(x)) : log1p(-exp(x));
}

FASTKD_HD double floored_log_p(double log_p, bool reverse) {
  return reverse && !(log_p >= kLogPFloor) ? kLogPFloor : log_p;
}

// One bucket's term of the divergence: kl p (log p - log q), reverse q (log q - log p).
template <typename M, typename V>
FASTKD_HD V sparse_term(bool reverse, V log_p, V log_q) {
  return reverse ? M::xlogy(M::exp(log_q), log_q - log_p)
                 : M::xlogy(M::exp(log_p), log_p - log_q);
}

// d D / d s_j against the implied teacher log p~_j: kl q - p~, reverse q (log q - log p~ - D).
template <typename M, typename V>
FASTKD_HD V sparse_grad(bool reverse, V log_p, V log_q, V divergence) {
  V q = M::exp(log_q);
  return reverse ? M::xlogy(q, log_q - log_p - divergence) : q - M::exp(log_p);
}

}  // namespace fastkd
