// The CPU row ops (TORCH_LIBRARY_IMPL(fastkd, CPU)): one token row per at::parallel_for task,
// the hot loops on at::vec::Vectorized lanes with a scalar tail, every formula from row_math.h.
// Same contract as kernels/kd_rows.py, kernels/multi_teacher_rows.py and kernels/sparse_rows.py
// (schemas in ops.cpp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "op_checks.h"
#include "row_math.h"

namespace fastkd {
namespace {

using at::vec::Vectorized;

// The primitives of row_math.h for one SIMD vector.
template <typename T>
struct Vec {
  using V = Vectorized<T>;
  static V exp(V x) { return x.exp(); }
  static V log(V x) { return x.log(); }
  static V log1p(V x) { return x.log1p(); }
  static V abs(V x) { return x.abs(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V xlogy(V w, V x) { return V::blendv(w * x, V(T(0)), w == V(T(0))); }
  static V expm1(V x) { return x.expm1(); }
  static V reciprocal(V d) { return d.reciprocal(); }
  static V copysign(V x, V sign) { return x.copysign(sign); }
  static V if_below(V x, V limit, V then, V otherwise) {
    return V::blendv(otherwise, then, x < limit);
  }
};

template <typename T>
struct ScalarWithLog : Scalar<T> {
  static T log(T x) { return log_(x); }
};

// A row is swept in SIMD lanes, then a scalar tail; `Lane` says which, for one formula.
template <typename T, bool SIMD>
struct Lane {
  using V = Vectorized<T>;
  using M = Vec<T>;
  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, V v) { v.store(p); }
};

template <typename T>
struct Lane<T, false> {
  using V = T;
  using M = ScalarWithLog<T>;
  static T load(const T* p) { return *p; }
  static void store(T* p, T v) { *p = v; }
};

template <typename T, typename Body>
void sweep(int64_t n, Body&& body) {
  constexpr int64_t width = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + width <= n; j += width) body(Lane<T, true>{}, j);
  for (; j < n; ++j) body(Lane<T, false>{}, j);
}

// A running sum (or max) kept per SIMD lane and for the scalar tail, reduced at the end.
template <typename T>
struct Sum {
  Vectorized<T> lanes{T(0)};
  T tail{0};
  void add(Vectorized<T> x) { lanes = lanes + x; }
  void add(T x) { tail += x; }
  void rescale(T alpha) {
    lanes = lanes * Vectorized<T>(alpha);
    tail *= alpha;
  }
  // (this - shift * weights) * alpha: a sum of w_j x_j whose x_j all moved by -shift
  void shift_rescale(const Sum& weights, T shift, T alpha) {
    lanes = (lanes - Vectorized<T>(shift) * weights.lanes) * Vectorized<T>(alpha);
    tail = (tail - shift * weights.tail) * alpha;
  }
  T total() const {
    return at::vec::vec_reduce_all<T>([](Vectorized<T> a, Vectorized<T> b) { return a + b; },
                                      lanes) + tail;
  }
};

template <typename T>
T nan_max(T a, T b) {
  return std::isnan(a) || a > b ? a : b;
}

template <typename T>
T finite_or_zero(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// Elements per block of the row's first pass: two blocks of logits stay in L1.
constexpr int64_t kBlock = 2048;

template <typename T>
struct Max {
  Vectorized<T> lanes{-std::numeric_limits<T>::infinity()};
  T tail{-std::numeric_limits<T>::infinity()};
  void add(Vectorized<T> x) { lanes = at::vec::maximum(lanes, x); }
  void add(T x) { tail = std::isnan(x) || x > tail ? x : tail; }
  T total() const {
    T lane_max = at::vec::vec_reduce_all<T>(
        [](Vectorized<T> a, Vectorized<T> b) { return at::vec::maximum(a, b); }, lanes);
    return std::isnan(tail) || tail > lane_max ? tail : lane_max;
  }
};

// First index of the row's largest value m.
template <typename T>
int64_t first_index_of(const T* z, int64_t n, T m) {
  constexpr int64_t width = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + width <= n; j += width) {
    if ((Vectorized<T>::loadu(z + j) == Vectorized<T>(m)).zero_mask() != (1 << width) - 1) break;
  }
  for (; j < n; ++j) {
    if (z[j] == m) return j;
  }
  return 0;  // a NaN row: no element equals its max
}

struct KDOptions {
  int divergence;
  double beta, temperature, soft_weight, hard_weight;
};

// The hard CE term's untempered log-softmax: m_z = max z and log l_z, l_z = sum e^{z - m_z}.
template <typename T>
struct RawLse {
  T m, log_l;
};

template <typename T>
RawLse<T> raw_lse(const T* z, int64_t n, T m_z, T l_s, T temperature) {
  if (temperature == T(1)) return {m_z, log_(l_s)};
  Sum<T> l_z;
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    l_z.add(L::M::exp(L::load(z + j) - typename L::V(m_z)));
  });
  return {m_z, log_(l_z.total())};
}

// hard_weight (LSE(z) - z[label]); z[label] is read before any gradient is written (g may
// alias z).
template <typename T>
T hard_ce(T z_label, RawLse<T> lse, T hard_weight) {
  return hard_weight > 0 ? hard_weight * (lse.log_l - (z_label - lse.m)) : T(0);
}

// Loss of one counted row; writes d loss / d z_s into g (n) when g is given. g may be z itself:
// every z_j is read before g_j is written, and nothing reads z after the gradient pass.
template <typename T>
T kd_row(const T* z, const T* zt, int64_t n, int64_t label, const KDOptions& o, T* g,
         T* spare) {
  const T inv_t = T(1) / T(o.temperature);
  const bool hard = o.hard_weight > 0, raw_sum = hard && o.temperature != 1;
  const T z_label = hard ? z[label] : T(0);
  // kl without a tempered hard term keeps pass 1's exps for the gradient: e^{ds} in g, e^{dt}
  // in spare, each block's shifts beside them (q - p then costs no exp)
  const bool keep_exps = o.divergence == KL && !raw_sum && g != nullptr && spare != nullptr;
  std::vector<T> block_shift_s, block_shift_t;
  // pass 1, block by block: the block's maxima first (it stays in L1), then its exps against
  // the running maxima; a block that raises a maximum by d rescales the running sums by e^-d.
  // The divergence sum a is of e^{dt} (dt - ds) (kl) or e^{ds} (ds - dt) (reverse_kl) with
  // shifted values, so it also moves by d_t - d_s times the sum it weights.
  T m_z = -std::numeric_limits<T>::infinity(), m_t = m_z;  // raw z max; tempered teacher max
  // The sums' shifts: the running maxima (z's, s = z / T's, t's), 0 while one is -inf (its
  // elements so far are all -inf, and no sum has a term yet).
  T shift_z = 0, shift_s = 0, shift_t = 0;
  Sum<T> l_s, l_t, l_z, a;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const T* zb = z + start;
    const T* tb = zt + start;
    Max<T> block_z, block_t;
    sweep<T>(len, [&](auto lane, int64_t j) {
      using L = decltype(lane);
      block_z.add(L::load(zb + j));
      block_t.add(L::load(tb + j));
    });
    const T new_z = nan_max(m_z, block_z.total()), new_t = nan_max(m_t, block_t.total() * inv_t);
    if (new_z != m_z || new_t != m_t) {
      const T next_z = finite_or_zero(new_z), next_s = next_z * inv_t;
      const T next_t = finite_or_zero(new_t);
      const T d_s = next_s - shift_s, d_t = next_t - shift_t;
      if (o.divergence == KL) a.shift_rescale(l_t, d_t - d_s, exp_(-d_t));
      if (o.divergence == REVERSE_KL) a.shift_rescale(l_s, d_s - d_t, exp_(-d_s));
      l_s.rescale(exp_(-d_s));
      l_t.rescale(exp_(-d_t));
      if (raw_sum) l_z.rescale(exp_(shift_z - next_z));
      shift_z = next_z;
      shift_s = next_s;
      shift_t = next_t;
      m_z = new_z;
      m_t = new_t;
    }
    sweep<T>(len, [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using M = typename L::M;
      using V = typename L::V;
      V zj = L::load(zb + j);
      V ds = zj * V(inv_t) - V(shift_s), dt = L::load(tb + j) * V(inv_t) - V(shift_t);
      V e_s = M::exp(ds), e_t = M::exp(dt);
      l_s.add(e_s);
      l_t.add(e_t);
      if (o.divergence != JSD) a.add(divergence_term<M>(o.divergence, ds, dt, e_s, e_t));
      if (raw_sum) l_z.add(M::exp(zj - V(shift_z)));
      if (keep_exps) {  // z_j, zt_j were read above
        L::store(g + start + j, e_s);
        L::store(spare + start + j, e_t);
      }
    });
    if (keep_exps) {  // a -inf max: its exps are all 0, and so is their factor later
      const T minus_inf = -std::numeric_limits<T>::infinity();
      block_shift_s.push_back(m_z == minus_inf ? minus_inf : shift_s);
      block_shift_t.push_back(m_t == minus_inf ? minus_inf : shift_t);
    }
  }
  const T m_s = shift_s;  // the later passes shift by the sums' values (NaN for a NaN row)
  auto shifted = [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using V = typename L::V;
    return std::make_pair(L::load(z + j) * V(inv_t) - V(m_s),
                          L::load(zt + j) * V(inv_t) - V(shift_t));
  };
  const T log_l_s = log_(l_s.total()), log_l_t = log_(l_t.total());
  const T mean_ds_dt = a.total() / l_s.total();  // reverse_kl: E_q[ds - dt]
  const JsdConstants<T> jsd = jsd_constants<T>(o.beta);

  T divergence, eq_sp = 0;
  if (o.divergence == JSD) {  // pass 2b: E_q[softplus(x)], E_p[softplus(-x)]
    Sum<T> eq, ep;
    sweep<T>(n, [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using M = typename L::M;
      using V = typename L::V;
      auto [ds, dt] = shifted(lane, j);
      V log_q = ds - V(log_l_s), log_p = dt - V(log_l_t);
      V x = jsd_x(log_q, log_p, V(jsd.log_odds_beta));
      eq.add(M::xlogy(M::exp(log_q), softplus<M>(x)));
      ep.add(M::xlogy(M::exp(log_p), softplus<M>(V(0) - x)));
    });
    eq_sp = eq.total();
    divergence = jsd_from_sums(jsd, eq_sp, ep.total());
  } else {
    divergence = one_pass_divergence(o.divergence, a.total(), l_s.total(), l_t.total());
  }
  const T hard_weight = T(o.hard_weight);
  const RawLse<T> lse{shift_z, log_(raw_sum ? l_z.total() : l_s.total())};
  const T loss = T(o.soft_weight) * divergence + hard_ce(z_label, lse, hard_weight);
  if (g == nullptr) return loss;
  const T coef = T(o.soft_weight) * inv_t;
  if (keep_exps) {  // g = soft_weight / T (q - p) + hard_weight q (T = 1), q and p from pass 1
    for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
      const T to_q = exp_(block_shift_s[b] - shift_s - log_l_s);
      const T to_p = exp_(block_shift_t[b] - shift_t - log_l_t);
      sweep<T>(std::min(kBlock, n - start), [&](auto lane, int64_t j) {
        using L = decltype(lane);
        using V = typename L::V;
        V q = L::load(g + start + j) * V(to_q), p = L::load(spare + start + j) * V(to_p);
        L::store(g + start + j, V(coef) * (q - p) + V(hard_weight) * q);
      });
    }
    if (hard) g[label] -= hard_weight;
    return loss;
  }
  const int64_t top = o.divergence != KL ? first_index_of(z, n, m_z) : -1;

  // pass 3: g = soft_weight / T d div / d s + hard_weight softmax(z) (the onehot after)
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using M = typename L::M;
    using V = typename L::V;
    auto [ds, dt] = shifted(lane, j);
    V grad = V(coef) * divergence_grad<M>(o.divergence, ds - V(log_l_s), dt - V(log_l_t), ds,
                                          dt, V(mean_ds_dt), V(jsd.one_minus_beta),
                                          V(jsd.log_odds_beta), V(eq_sp));
    if (hard_weight > 0) grad = grad + V(hard_weight) * hard_grad<M>(L::load(z + j), V(lse.m),
                                                                      V(lse.log_l));
    L::store(g + j, grad);
  });
  if (hard_weight > 0) g[label] -= hard_weight;
  if (top >= 0) {
    // Rows sum to zero (softmax is shift invariant). At the top student logit the reverse-KL
    // and JSD formulas cancel when q is near one-hot, so that entry is -(sum of the others).
    g[top] = T(0);
    Sum<T> others;
    sweep<T>(n, [&](auto lane, int64_t j) { others.add(decltype(lane)::load(g + j)); });
    g[top] = -others.total();
  }
  return loss;
}

// ---- the model's logit transforms (row_math.h): a row op with a transform runs on f(z) in
// per-thread scratch rows, then the chain rule multiplies its gradient, d loss / d f, by f'(z).
// The row ops' top-entry rewrite (rows of d loss / d f sum to zero) thus comes before the
// chain rule, as it must. Without a transform the row op reads the logits themselves.

// f(z) of a row of n raw logits into out (n).
template <typename T>
void transform_into(const T* z, int64_t n, const LogitTransform<T>& f, T* out) {
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    L::store(out + j, transformed<typename L::M>(f, L::load(z + j)));
  });
}

// f(z) of a row of n raw logits, in `out` (resized); z itself for the identity.
template <typename T>
const T* transformed_row(const T* z, int64_t n, const LogitTransform<T>& f, std::vector<T>& out) {
  if (f.identity()) return z;
  out.resize(n);
  transform_into(z, n, f, out.data());
  return out.data();
}

// f'(z) of a capped row into `out`, read before the gradient (which may alias z) is written.
template <typename T>
void save_slopes(const T* z, int64_t n, const LogitTransform<T>& f, std::vector<T>& out) {
  if (f.softcap == T(0)) return;  // f' is the constant scale
  out.resize(n);
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    L::store(out.data() + j, transform_slope<typename L::M>(f, L::load(z + j)));
  });
}

// g (n) *= f'(z): `slopes` from save_slopes, or the scale without a cap.
template <typename T>
void chain_rule(T* g, int64_t n, const LogitTransform<T>& f, const std::vector<T>& slopes) {
  if (f.identity()) return;
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using V = typename L::V;
    V slope = f.softcap == T(0) ? V(f.scale) : L::load(slopes.data() + j);
    L::store(g + j, L::load(g + j) * slope);
  });
}

// kd_row on the model's logits f_s(z), f_t(zt); d loss / d z into g.
template <typename T>
T transformed_kd_row(const T* z, const T* zt, int64_t n, int64_t label, const KDOptions& o,
                     const LogitTransform<T>& fs, const LogitTransform<T>& ft, T* g, T* spare) {
  if (fs.identity() && ft.identity()) return kd_row(z, zt, n, label, o, g, spare);
  thread_local std::vector<T> student, teacher, slopes;
  if (g != nullptr) save_slopes(z, n, fs, slopes);
  const T loss = kd_row(transformed_row(z, n, fs, student), transformed_row(zt, n, ft, teacher),
                        n, label, o, g, spare);
  if (g != nullptr) chain_rule(g, n, fs, slopes);
  return loss;
}

struct MultiTeacherOptions {
  std::vector<double> log_priors;
  double temperature, entropy_tau, soft_weight, hard_weight;
  int weighting, fusion;
};

// Loss of one row against K teachers (rows zt + k * teacher_stride); writes the mixing weights
// w (K) always and d loss / d z_s into g (n) when the row counts and g is given.
template <typename T>
T multi_teacher_row(const T* z, const T* zt, int64_t teacher_stride, int64_t n, int64_t label,
                    bool counted, const MultiTeacherOptions& o, float* w, T* g) {
  const int64_t K = static_cast<int64_t>(o.log_priors.size());
  const T inv_t = T(1) / T(o.temperature);
  Max<T> max_z;
  std::vector<Max<T>> max_t(K);
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    max_z.add(L::load(z + j));
    for (int64_t k = 0; k < K; ++k) max_t[k].add(L::load(zt + k * teacher_stride + j));
  });
  const T m_z = max_z.total(), m_s = m_z * inv_t;
  std::vector<T> m_t(K);
  for (int64_t k = 0; k < K; ++k) m_t[k] = max_t[k].total() * inv_t;

  // pass 2: l_s; per teacher l_k, b_k = sum e^{dt_k} dt_k (entropy), a_k = sum e^{dt_k}(dt_k - ds)
  Sum<T> l_s;
  std::vector<Sum<T>> l_t(K), b(K), a(K);
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using M = typename L::M;
    using V = typename L::V;
    V ds = L::load(z + j) * V(inv_t) - V(m_s);
    l_s.add(M::exp(ds));
    for (int64_t k = 0; k < K; ++k) {
      V dt = L::load(zt + k * teacher_stride + j) * V(inv_t) - V(m_t[k]);
      V e_t = M::exp(dt);
      l_t[k].add(e_t);
      b[k].add(M::xlogy(e_t, dt));
      if (o.fusion == WEIGHTED_KL) a[k].add(M::xlogy(e_t, dt - ds));
    }
  });
  const T log_l_s = log_(l_s.total());
  std::vector<T> log_l_t(K), weight(K);
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) {  // w = softmax_k(log pi_k - H_k / tau), or pi
    log_l_t[k] = log_(l_t[k].total());
    weight[k] = T(o.log_priors[k]);
    if (o.weighting == ENTROPY)
      weight[k] -= entropy_from_sums(l_t[k].total(), b[k].total()) / T(o.entropy_tau);
    top = std::isnan(weight[k]) || weight[k] > top ? weight[k] : top;
  }
  T weight_sum = 0;
  for (int64_t k = 0; k < K; ++k) weight_sum += (weight[k] = exp_(weight[k] - top));
  for (int64_t k = 0; k < K; ++k) w[k] = static_cast<float>(weight[k] /= weight_sum);
  if (!counted) return T(0);

  // The mixture P = sum_k w_k p_k at one element.
  auto mixture = [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using V = typename L::V;
    V p(T(0));
    for (int64_t k = 0; k < K; ++k) {
      V dt = L::load(zt + k * teacher_stride + j) * V(inv_t) - V(m_t[k]);
      p = p + V(weight[k]) * L::M::exp(dt - V(log_l_t[k]));
    }
    return p;
  };
  T divergence = 0;
  if (o.fusion == MIXTURE) {  // pass 3: KL(P || q) = sum P (log P - log q)
    Sum<T> kl;
    sweep<T>(n, [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using V = typename L::V;
      V p = mixture(lane, j);
      V log_q = L::load(z + j) * V(inv_t) - V(m_s) - V(log_l_s);
      kl.add(L::M::xlogy(p, L::M::log(p) - log_q));
    });
    divergence = kl.total();
  } else {  // sum_k w_k KL(p_k || q)
    for (int64_t k = 0; k < K; ++k)
      divergence += weight[k] * (a[k].total() / l_t[k].total() - log_l_t[k] + log_l_s);
  }
  const T hard_weight = T(o.hard_weight);
  const RawLse<T> lse = hard_weight > 0 ? raw_lse(z, n, m_z, l_s.total(), T(o.temperature))
                                        : RawLse<T>{};
  const T loss = T(o.soft_weight) * divergence + hard_ce(z[label], lse, hard_weight);
  if (g == nullptr) return loss;

  const T coef = T(o.soft_weight) * inv_t;  // pass 4: g = soft_weight / T (q - P) + hard
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using M = typename L::M;
    using V = typename L::V;
    V zj = L::load(z + j);
    V grad = V(coef) * (M::exp(zj * V(inv_t) - V(m_s) - V(log_l_s)) - mixture(lane, j));
    if (hard_weight > 0) grad = grad + V(hard_weight) * hard_grad<M>(zj, V(lse.m), V(lse.log_l));
    L::store(g + j, grad);
  });
  if (hard_weight > 0) g[label] -= hard_weight;
  return loss;
}

// multi_teacher_row on the model's logits: f_s(z) and teacher k's f_k(zt_k) (the K rows in
// one scratch block of stride n when any teacher is transformed); ft holds K transforms.
template <typename T>
T transformed_multi_teacher_row(const T* z, const T* zt, int64_t teacher_stride, int64_t n,
                                int64_t label, bool counted, const MultiTeacherOptions& o,
                                const LogitTransform<T>& fs,
                                const std::vector<LogitTransform<T>>& ft, float* w, T* g) {
  const bool teachers_identity =
      std::all_of(ft.begin(), ft.end(), [](const LogitTransform<T>& f) { return f.identity(); });
  if (fs.identity() && teachers_identity)
    return multi_teacher_row(z, zt, teacher_stride, n, label, counted, o, w, g);
  thread_local std::vector<T> student, teachers, slopes;
  if (!teachers_identity) {
    teachers.resize(ft.size() * n);
    for (size_t k = 0; k < ft.size(); ++k)
      transform_into(zt + k * teacher_stride, n, ft[k], teachers.data() + k * n);
  }
  if (g != nullptr) save_slopes(z, n, fs, slopes);
  const T loss = multi_teacher_row(transformed_row(z, n, fs, student),
                                   teachers_identity ? zt : teachers.data(),
                                   teachers_identity ? teacher_stride : n, n, label, counted, o,
                                   w, g);
  if (g != nullptr) chain_rule(g, n, fs, slopes);
  return loss;
}

struct SparseOptions {
  bool bucket, reverse;
  double temperature, soft_weight, hard_weight;
};

// Loss of one counted row of student logits z (n) against a sparse teacher: ids (k), its raw
// logits zt (k, double) and full LSE; writes d loss / d z_s into g (n) when given (g may be z
// itself: the row's support values, label value and top index are read first). docs/sparse.md.
template <typename T>
T sparse_row(const T* z, const int64_t* ids, const double* zt, double lse, int64_t n,
             int64_t k, int64_t label, const SparseOptions& o, T* g) {
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  const T inv_t = T(1) / T(o.temperature);
  const bool hard = o.hard_weight > 0;
  thread_local std::vector<double> log_p;
  thread_local std::vector<T> z_ids, work;
  log_p.resize(k);
  z_ids.resize(k);
  work.resize(n);
  // the teacher, in double over the k entries: x_i = t_i - LSE_t (bucket) or t_i
  double m_x = -HUGE_VAL, sum_x = 0;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "sparse_kd_rows: id ", ids[i], " outside [0, ", n,
                ")");
    log_p[i] = zt[i] / o.temperature - (o.bucket ? lse : 0.0);
    m_x = std::max(m_x, log_p[i]);
  }
  if (m_x > -HUGE_VAL)
    for (int64_t i = 0; i < k; ++i) sum_x += std::exp(log_p[i] - m_x);
  const double lse_x = m_x + std::log(sum_x);
  const T log_tail = T(o.bucket ? floored_log_p(log1mexp(lse_x), o.reverse) : -HUGE_VAL);
  for (int64_t i = 0; i < k; ++i)
    log_p[i] = floored_log_p(o.bucket ? log_p[i] : log_p[i] - lse_x, o.reverse);

  // the student: s off S in `work` (-inf on S), its own max and sum; the k values on S apart
  Max<T> max_z, max_off;
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using V = typename L::V;
    V zj = L::load(z + j);
    max_z.add(zj);
    L::store(work.data() + j, zj * V(inv_t));
  });
  T m_ids = minus_inf;
  for (int64_t i = 0; i < k; ++i) {
    z_ids[i] = z[ids[i]];
    m_ids = std::max(m_ids, z_ids[i] * inv_t);
    work[ids[i]] = minus_inf;
  }
  sweep<T>(n, [&](auto lane, int64_t j) { max_off.add(decltype(lane)::load(work.data() + j)); });
  const T m_z = max_z.total(), m_off = max_off.total();
  Sum<T> sum_off;
  if (m_off > minus_inf)
    sweep<T>(n, [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using V = typename L::V;
      sum_off.add(L::M::exp(L::load(work.data() + j) - V(m_off)));
    });
  T l_ids = 0;
  for (int64_t i = 0; i < k; ++i) l_ids += exp_(z_ids[i] * inv_t - m_ids);
  const T l_off = sum_off.total(), m_s = std::max(m_off, m_ids);
  const T l_s = (l_off > 0 ? l_off * exp_(m_off - m_s) : T(0)) + l_ids * exp_(m_ids - m_s);
  const T log_l_s = log_(l_s), log_l_off = log_(l_off);
  // log q_i = s_i - shift: the full row's LSE (bucket) or the ids' (renormalize)
  const T shift = o.bucket ? m_s + log_l_s : m_ids + log_(l_ids);
  const bool has_tail = o.bucket && l_off > 0;  // k = V leaves no tail bucket
  const T log_q_tail = (m_off - m_s) + (log_l_off - log_l_s);

  T divergence = 0;
  for (int64_t i = 0; i < k; ++i)
    divergence += sparse_term<Scalar<T>>(o.reverse, T(log_p[i]), z_ids[i] * inv_t - shift);
  if (has_tail) divergence += sparse_term<Scalar<T>>(o.reverse, log_tail, log_q_tail);
  const T hard_weight = T(o.hard_weight);
  const RawLse<T> lse_z = hard ? raw_lse(z, n, m_z, l_s, T(o.temperature)) : RawLse<T>{};
  const T loss = T(o.soft_weight) * divergence + hard_ce(hard ? z[label] : T(0), lse_z,
                                                         hard_weight);
  if (g == nullptr) return loss;

  // reverse: the entry of the student's mode, rewritten last (the top logit; on S for
  // renormalize)
  int64_t top = -1;
  if (o.reverse && o.bucket) top = first_index_of(z, n, m_z);
  if (o.reverse && !o.bucket)
    top = ids[std::max_element(z_ids.begin(), z_ids.end()) - z_ids.begin()];
  const T coef = T(o.soft_weight) * inv_t;
  // every entry by the off-S formula (renormalize: 0) plus the hard term; S is rewritten below
  sweep<T>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using M = typename L::M;
    using V = typename L::V;
    V zj = L::load(z + j);
    V grad(T(0));
    if (o.bucket) {
      V s = zj * V(inv_t);
      V log_q = s - V(m_s) - V(log_l_s), log_pt = V(log_tail) + (s - V(m_off)) - V(log_l_off);
      grad = V(coef) * sparse_grad<M>(o.reverse, log_pt, log_q, V(divergence));
    }
    if (hard) grad = grad + V(hard_weight) * hard_grad<M>(zj, V(lse_z.m), V(lse_z.log_l));
    L::store(g + j, grad);
  });
  for (int64_t i = 0; i < k; ++i) {
    T grad = coef * sparse_grad<Scalar<T>>(o.reverse, T(log_p[i]), z_ids[i] * inv_t - shift,
                                           divergence);
    if (hard) grad += hard_weight * hard_grad<Scalar<T>>(z_ids[i], lse_z.m, lse_z.log_l);
    g[ids[i]] = grad;
  }
  if (hard) g[label] -= hard_weight;
  if (top >= 0) {  // rows sum to zero: that entry is -(sum of the others), as kd_row's
    g[top] = T(0);
    Sum<T> others;
    sweep<T>(n, [&](auto lane, int64_t j) { others.add(decltype(lane)::load(g + j)); });
    g[top] = -others.total();
  }
  return loss;
}

// sparse_row on the student's logits f_s(z) (a sparse teacher signal is already the teacher's
// emitted logits).
template <typename T>
T transformed_sparse_row(const T* z, const int64_t* ids, const double* zt, double lse,
                         int64_t n, int64_t k, int64_t label, const SparseOptions& o,
                         const LogitTransform<T>& fs, T* g) {
  if (fs.identity()) return sparse_row(z, ids, zt, lse, n, k, label, o, g);
  thread_local std::vector<T> student, slopes;
  if (g != nullptr) save_slopes(z, n, fs, slopes);
  const T loss = sparse_row(transformed_row(z, n, fs, student), ids, zt, lse, n, k, label, o, g);
  if (g != nullptr) chain_rule(g, n, fs, slopes);
  return loss;
}

// ---- the ops: one row per task

// A row whose label is ignore_index.
constexpr int64_t IGNORED = std::numeric_limits<int64_t>::min();

// Per-row labels as int64: IGNORED where the label is ignore_index, -1 for every row without
// labels (no hard term then).
std::vector<int64_t> row_labels(const std::optional<at::Tensor>& labels, int64_t rows,
                                 int64_t vocab, int64_t ignore_index, bool hard, const char* op) {
  std::vector<int64_t> out(rows, -1);
  const std::optional<at::Tensor> flat = int64_labels(labels, rows, hard, op);
  if (!flat.has_value()) return out;
  const int64_t* values = flat->data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = values[r] == ignore_index ? IGNORED : values[r];
    TORCH_CHECK(!hard || out[r] == IGNORED ||
                    (out[r] >= 0 && out[r] < vocab),
                op, ": label ", values[r], " at row ", r, " lies outside [0, ", vocab, ")");
  }
  return out;
}

// Runs row(r, g_row, spare) for every row in parallel. g_row is grad_out's row when grad_out
// has the math dtype T (it may alias the logits: the row functions allow it), else a
// per-thread scratch row converted into grad_out's dtype afterwards; null without grad_out.
// spare is one more per-thread row for the row function's use (null without grad_out). A row
// that does not count (row returns false) gets a zero gradient row.
template <typename T, typename RowFn>
void for_each_row(int64_t rows, int64_t vocab, const std::optional<at::Tensor>& grad_out,
                  RowFn&& row) {
  const bool direct =
      grad_out.has_value() && grad_out->scalar_type() == c10::CppTypeToScalarType<T>::value;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(grad_out.has_value() && !direct ? vocab : 0);
    std::vector<T> spare(grad_out.has_value() ? vocab : 0);  // a row the row op may use
    for (int64_t r = begin; r < end; ++r) {
      T* g = !grad_out.has_value() ? nullptr
             : direct ? grad_out->data_ptr<T>() + r * grad_out->stride(0)
                      : scratch.data();
      if (!row(r, g, spare.empty() ? nullptr : spare.data()) && g != nullptr)
        std::fill(g, g + vocab, T(0));
      if (g == nullptr || direct) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, grad_out->scalar_type(), "fastkd_grad_store", [&] {
            scalar_t* dst = grad_out->data_ptr<scalar_t>() + r * grad_out->stride(0);
            at::vec::convert(g, dst, vocab);
          });
    }
  });
}

at::Tensor kd_rows_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                       const std::optional<at::Tensor>& labels,
                       const std::optional<at::Tensor>& grad_out, c10::string_view divergence,
                       double beta, double temperature, double soft_weight, double hard_weight,
                       int64_t ignore_index, double student_softcap, double student_scale,
                       double teacher_softcap, double teacher_scale) {
  check_kd_rows(student_logits, teacher_logits, grad_out);
  check_transform("kd_rows", "the student", student_softcap, student_scale);
  check_transform("kd_rows", "the teacher", teacher_softcap, teacher_scale);
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const KDOptions options{divergence_id(divergence), beta, temperature, soft_weight,
                          hard_weight};
  const auto label = row_labels(labels, rows, vocab, ignore_index, hard_weight > 0, "kd_rows");
  const at::ScalarType math = math_dtype(student_logits);
  const at::Tensor z = math_logits(student_logits, math), zt = math_logits(teacher_logits, math);
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  AT_DISPATCH_FLOATING_TYPES(math, "fastkd_kd_rows", [&] {
    scalar_t* out = loss.data_ptr<scalar_t>();
    const auto fs = logit_transform<scalar_t>(student_softcap, student_scale);
    const auto ft = logit_transform<scalar_t>(teacher_softcap, teacher_scale);
    for_each_row<scalar_t>(rows, vocab, grad_out, [&](int64_t r, scalar_t* g, scalar_t* spare) {
      out[r] = 0;
      if (label[r] == IGNORED) return false;
      out[r] = transformed_kd_row(z.data_ptr<scalar_t>() + r * z.stride(0),
                                  zt.data_ptr<scalar_t>() + r * zt.stride(0), vocab, label[r],
                                  options, fs, ft, g, spare);
      return true;
    });
  });
  return loss;
}

at::Tensor multi_teacher_rows_cpu(const at::Tensor& student_logits,
                                  const at::Tensor& teacher_logits,
                                  const std::optional<at::Tensor>& labels,
                                  const std::optional<at::Tensor>& grad_out,
                                  const at::Tensor& weights_out, at::ArrayRef<double> priors,
                                  double temperature, c10::string_view weighting,
                                  double entropy_tau, c10::string_view fusion, double soft_weight,
                                  double hard_weight, int64_t ignore_index,
                                  double student_softcap, double student_scale,
                                  at::ArrayRef<double> teacher_softcaps,
                                  at::ArrayRef<double> teacher_scales) {
  const char* op = "multi_teacher_rows";
  check_multi_teacher_rows(student_logits, teacher_logits, grad_out, weights_out, priors.size(),
                           weighting, fusion);
  check_transform(op, "the student", student_softcap, student_scale);
  check_teacher_transforms(op, teacher_softcaps, teacher_scales, priors.size());
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  MultiTeacherOptions options{{}, temperature, entropy_tau, soft_weight, hard_weight,
                              weighting == "entropy" ? ENTROPY : STATIC,
                              fusion == "mixture" ? MIXTURE : WEIGHTED_KL};
  for (double prior : priors) options.log_priors.push_back(std::log(prior));
  const auto label = row_labels(labels, rows, vocab, ignore_index, hard_weight > 0, op);
  const at::ScalarType math = math_dtype(student_logits);
  const at::Tensor z = math_logits(student_logits, math);
  const at::Tensor zt = math_logits(teacher_logits, math).contiguous();
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  AT_DISPATCH_FLOATING_TYPES(math, "fastkd_multi_teacher_rows", [&] {
    scalar_t* out = loss.data_ptr<scalar_t>();
    float* weights = weights_out.data_ptr<float>();
    const auto fs = logit_transform<scalar_t>(student_softcap, student_scale);
    std::vector<LogitTransform<scalar_t>> ft;
    for (size_t k = 0; k < teacher_softcaps.size(); ++k)
      ft.push_back(logit_transform<scalar_t>(teacher_softcaps[k], teacher_scales[k]));
    for_each_row<scalar_t>(rows, vocab, grad_out, [&](int64_t r, scalar_t* g, scalar_t*) {
      const bool counted = label[r] != IGNORED;
      out[r] = transformed_multi_teacher_row(
          z.data_ptr<scalar_t>() + r * z.stride(0), zt.data_ptr<scalar_t>() + r * vocab,
          rows * vocab, vocab, label[r], counted, options, fs, ft,
          weights + r * weights_out.stride(0), counted ? g : nullptr);
      return counted;
    });
  });
  return loss;
}

at::Tensor sparse_kd_rows_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                              const at::Tensor& teacher_logits, const at::Tensor& teacher_lse,
                              const std::optional<at::Tensor>& labels,
                              const std::optional<at::Tensor>& grad_out, c10::string_view tail,
                              c10::string_view divergence, double temperature,
                              double soft_weight, double hard_weight, int64_t ignore_index,
                              double student_softcap, double student_scale) {
  const char* op = "sparse_kd_rows";
  check_sparse_kd_rows(student_logits, teacher_ids, teacher_logits, teacher_lse, grad_out, tail,
                       divergence);
  check_transform(op, "the student", student_softcap, student_scale);
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const int64_t k = teacher_ids.size(1);
  const SparseOptions options{tail == "bucket", divergence == "reverse_kl", temperature,
                              soft_weight, hard_weight};
  const auto label = row_labels(labels, rows, vocab, ignore_index, hard_weight > 0, op);
  const at::ScalarType math = math_dtype(student_logits);
  const at::Tensor z = math_logits(student_logits, math);
  const at::Tensor ids = teacher_ids.contiguous();
  const at::Tensor zt = teacher_logits.to(at::kDouble).contiguous();
  const at::Tensor lse = teacher_lse.to(at::kDouble).contiguous();
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  AT_DISPATCH_FLOATING_TYPES(math, "fastkd_sparse_kd_rows", [&] {
    scalar_t* out = loss.data_ptr<scalar_t>();
    const auto fs = logit_transform<scalar_t>(student_softcap, student_scale);
    for_each_row<scalar_t>(rows, vocab, grad_out, [&](int64_t r, scalar_t* g, scalar_t*) {
      out[r] = 0;
      if (label[r] == IGNORED) return false;
      out[r] = transformed_sparse_row(z.data_ptr<scalar_t>() + r * z.stride(0),
                                      ids.data_ptr<int64_t>() + r * k,
                                      zt.data_ptr<double>() + r * k, lse.data_ptr<double>()[r],
                                      vocab, k, label[r], options, fs, g);
      return true;
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_rows", &kd_rows_cpu);
  m.impl("multi_teacher_rows", &multi_teacher_rows_cpu);
  m.impl("sparse_kd_rows", &sparse_kd_rows_cpu);
}

}  // namespace fastkd
