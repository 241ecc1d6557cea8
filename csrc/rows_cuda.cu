// The CUDA row ops (TORCH_LIBRARY_IMPL(fastkd, CUDA)): one thread block per token row, each
// thread striding over the vocabulary, block reductions between the passes of row_math.h.
// Same contract as rows_cpu.cpp. The logit transforms (row_math.h) apply as the raw logits are
// read (zs(j), zt_(j) below: f(z)), and the gradient's store multiplies d loss / d f by f'(z);
// the top entry's -(sum of the others) is of d loss / d f, before its own f'. Compiled with
// -DFASTKD_KERNELS_ONLY the file holds only the kernels and needs no torch: the CPU machines
// compile it to an sm_90 cubin that way.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "row_math.h"

namespace fastkd {

constexpr int kMaxTeachers = 8;
// Threads per row: 512, and 256 for fp64 math, whose multi-teacher state (5 x kMaxTeachers
// doubles) would spill at 512 threads' 128-register limit.
// A kernel with logit transforms (TRANSFORM) runs half as many: the inlined tanh and sech^2
// would spill at 512 threads' 128 registers (256 threads' 255 for fp64).
template <typename T, bool TRANSFORM = false>
constexpr int kThreads = sizeof(T) == 8 || TRANSFORM ? 256 : 512;
// kd_rows' blocks per multiprocessor, __launch_bounds__' second argument (0: ptxas chooses).
// The fp64 kernel with transforms asks for 2, as many threads as the fp64 default runs (its 256
// threads then get up to 128 registers; it takes 112): left to itself ptxas held it to 80
// registers, 3 blocks, and spilled 60 bytes at sm_90.
template <typename T, bool TRANSFORM>
constexpr int kKDMinBlocks = sizeof(T) == 8 && TRANSFORM ? 2 : 0;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -__int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000LL);
}

// Block-wide sum and max (every thread gets the result); `shared` holds THREADS / 32 values.
template <int THREADS, typename T>
__device__ T block_sum(T x, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < THREADS / 32 ? shared[threadIdx.x] : T(0);
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Max that keeps NaN (a NaN row must give a NaN loss).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

template <int THREADS, typename T>
__device__ T block_max(T x, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2)
    x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  __syncthreads();
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < THREADS / 32 ? shared[threadIdx.x] : neg_inf<T>();
  for (int offset = 16; offset > 0; offset /= 2)
    x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Smallest index j with z[j] == m (the first top logit); 0 when none (a NaN row).
template <int THREADS>
__device__ int64_t block_first_index(int64_t j, int64_t* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    long long other = __shfl_xor_sync(0xffffffffu, static_cast<long long>(j), offset);
    j = other < j ? other : j;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = j;
  __syncthreads();
  j = threadIdx.x < THREADS / 32 ? shared[threadIdx.x] : INT64_MAX;
  for (int offset = 16; offset > 0; offset /= 2) {
    long long other = __shfl_xor_sync(0xffffffffu, static_cast<long long>(j), offset);
    j = other < j ? other : j;
  }
  return j == INT64_MAX ? 0 : j;
}

template <typename G>
__device__ __forceinline__ G to_grad(float x);
template <>
__device__ __forceinline__ float to_grad<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_grad<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half to_grad<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ double to_grad<double>(float x) { return x; }  // fp32 math

template <typename G, typename T>
__device__ __forceinline__ G store_value(T x) {
  if constexpr (sizeof(T) == sizeof(double) && sizeof(G) == sizeof(double)) return x;
  else return to_grad<G>(static_cast<float>(x));
}

// The kernels' logit transform: the argument's (TRANSFORM), else the identity as a constant,
// which folds every transform away. The kernels call this at every use (fs(), ft() below), and
// the host computes scale / softcap: the fp64 kernels then read the fields from the parameters
// instead of holding them in registers, which would spill.
template <bool TRANSFORM, typename T>
__device__ __forceinline__ LogitTransform<T> transform_or_identity(
    const LogitTransform<double>& f) {
  if constexpr (TRANSFORM) return {T(f.scale), T(f.softcap), T(f.scale_over_cap)};
  else return {T(1), T(0), T(0)};
}

// The row's loss and, with parts (C, 2; null without parts_out), its unweighted divergence and
// CE (0 where it is not computed); thread 0 writes them.
template <typename T>
__device__ __forceinline__ void store_row(T* loss, T* parts, int64_t stride_p, int64_t row,
                                          T value, T divergence, T ce) {
  if (threadIdx.x != 0) return;
  loss[row] = value;
  if (parts == nullptr) return;
  parts[row * stride_p] = divergence;
  parts[row * stride_p + 1] = ce;
}

struct KDArgs {
  int64_t vocab, stride_s, stride_t, stride_g, stride_p, ignore_index;
  double beta, temperature, soft_weight, hard_weight, alpha;
  int divergence;
  bool has_labels;
};

// The logit transforms travel as a kernel parameter of their own: in KDArgs they would change
// the default kernels' register allocation.
struct KDTransforms {
  LogitTransform<double> student, teacher;
};

// Loss of one row; g (stride_g) receives d loss / d z_s when given, parts (stride_p) the row's
// divergence and CE when given; f: the logit transforms (read with TRANSFORM only). T: the math
// (and logits) dtype, G: the gradient's.
template <typename T, typename G, bool TRANSFORM>
__global__ void __launch_bounds__(kThreads<T, TRANSFORM>, kKDMinBlocks<T, TRANSFORM>)
kd_rows_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
               const int64_t* __restrict__ labels, G* grad, T* __restrict__ loss,
               T* __restrict__ parts, KDArgs o, KDTransforms f) {
  using M = Scalar<T>;
  constexpr int THREADS = kThreads<T, TRANSFORM>;
  __shared__ T shared[THREADS / 32];
  __shared__ int64_t shared_index[THREADS / 32];
  const int64_t row = blockIdx.x, V = o.vocab;
  const T* z = student + row * o.stride_s;
  const T* zt = teacher + row * o.stride_t;
  const int64_t label = o.has_labels ? labels[row] : -1;
  G* g = grad == nullptr ? nullptr : grad + row * o.stride_g;
  if (o.has_labels && label == o.ignore_index) {
    store_row(loss, parts, o.stride_p, row, T(0), T(0), T(0));
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = store_value<G>(T(0));
    return;
  }
  // the CE: for the hard term, or for parts (with labels)
  const bool ce = o.hard_weight > 0 || (parts != nullptr && o.has_labels);
  const T inv_t = T(1) / T(o.temperature);
  // the models' logits f(z) at j, from the raw ones
  auto fs = [&] { return transform_or_identity<TRANSFORM, T>(f.student); };
  auto ft = [&] { return transform_or_identity<TRANSFORM, T>(f.teacher); };
  auto zs = [&](int64_t j) { return transformed<M>(fs(), z[j]); };
  auto zt_ = [&](int64_t j) { return transformed<M>(ft(), zt[j]); };
  T max_z = neg_inf<T>(), max_t = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    max_z = nan_max(max_z, zs(j));
    max_t = nan_max(max_t, zt_(j));
  }
  const T m_z = block_max<THREADS>(max_z, shared), m_s = m_z * inv_t;
  const T m_t = block_max<THREADS>(max_t, shared) * inv_t;

  T l_s = 0, l_t = 0, l_z = 0, a = 0;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    const T zj = zs(j);
    T ds = zj * inv_t - m_s, dt = zt_(j) * inv_t - m_t;
    T e_s = M::exp(ds), e_t = M::exp(dt);
    l_s += e_s;
    l_t += e_t;
    if (o.divergence == KL || o.divergence == REVERSE_KL)
      a += divergence_term<M>(o.divergence, ds, dt, e_s, e_t);
    if (ce) l_z += M::exp(zj - m_z);
  }
  // f(z[label]) is read by every thread before the block sums below: after them, g (which may
  // alias z) is written without another barrier
  const T z_label = ce ? zs(label) : T(0);
  l_s = block_sum<THREADS>(l_s, shared);
  l_t = block_sum<THREADS>(l_t, shared);
  a = block_sum<THREADS>(a, shared);
  const T log_l_s = log_(l_s), log_l_t = log_(l_t);
  const T log_l_z = log_(block_sum<THREADS>(l_z, shared));
  const JsdConstants<T> jsd = jsd_constants<T>(o.beta);
  const SkewConstants<T> skew = skew_constants<T>(o.alpha);
  const bool score = has_score_gradient(o.divergence);

  T divergence, eq_sp = 0, center_a = 0, center_b = 0;
  if (o.divergence == JSD) {
    T eq = 0, ep = 0;
    for (int64_t j = threadIdx.x; j < V; j += THREADS) {
      T log_q = zs(j) * inv_t - m_s - log_l_s, log_p = zt_(j) * inv_t - m_t - log_l_t;
      T x = jsd_x(log_q, log_p, jsd.log_odds_beta);
      eq += M::xlogy(M::exp(log_q), softplus<M>(x));
      ep += M::xlogy(M::exp(log_p), softplus<M>(-x));
    }
    eq_sp = block_sum<THREADS>(eq, shared);
    divergence = jsd_from_sums(jsd, eq_sp, block_sum<THREADS>(ep, shared));
  } else if (score) {  // tvd, skew_kl, skew_reverse_kl: the sum of the terms, centering sums
    T terms = 0, sum_a = 0, sum_b = 0;
    for (int64_t j = threadIdx.x; j < V; j += THREADS) {
      T log_q = zs(j) * inv_t - m_s - log_l_s, log_p = zt_(j) * inv_t - m_t - log_l_t;
      T q = M::exp(log_q);
      ScoreTerm<T> e = score_term<M>(o.divergence, log_q, log_p, skew);
      terms += e.term;
      sum_a += center_sum_a<M>(o.divergence, q, e.h);
      sum_b += center_sum_b(o.divergence, q, e.h);
    }
    divergence = block_sum<THREADS>(terms, shared);
    center_a = block_sum<THREADS>(sum_a, shared);
    center_b = block_sum<THREADS>(sum_b, shared);
  } else {
    divergence = one_pass_divergence(o.divergence, a, l_s, l_t);
  }
  if (threadIdx.x == 0) {
    const T cross_entropy = ce ? log_l_z - (z_label - m_z) : T(0);
    T value = T(o.soft_weight) * divergence;
    if (o.hard_weight > 0) value += T(o.hard_weight) * cross_entropy;
    store_row(loss, parts, o.stride_p, row, value, divergence, cross_entropy);
  }
  if (g == nullptr) return;

  // The top student logit's entry is written last as -(sum of the others) for reverse_kl and
  // jsd, where the formulas cancel when q is near one-hot (row_math.h, rows_cpu.cpp).
  int64_t top = -1;
  if (o.divergence != KL) {
    int64_t first = INT64_MAX;
    for (int64_t j = threadIdx.x; j < V; j += THREADS)
      if (zs(j) == m_z && j < first) first = j;
    top = block_first_index<THREADS>(first, shared_index);
  }
  const T coef = T(o.soft_weight) * inv_t, mean_ds_dt = a / l_s;
  T others = 0;  // of d loss / d f
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    const T zj = zs(j);
    T ds = zj * inv_t - m_s, dt = zt_(j) * inv_t - m_t;
    T log_q = ds - log_l_s, log_p = dt - log_l_t;
    T value = coef * (score ? score_grad<M>(o.divergence, log_q, log_p, skew, center_a, center_b)
                            : divergence_grad<M>(o.divergence, log_q, log_p, ds, dt, mean_ds_dt,
                                                 jsd.one_minus_beta, jsd.log_odds_beta, eq_sp));
    if (o.hard_weight > 0)
      value += T(o.hard_weight) * (hard_grad<M>(zj, m_z, log_l_z) - (j == label ? T(1) : T(0)));
    if (j == top) continue;
    others += value;
    // z[j] is read before g[j] is written: g may alias the student logits
    g[j] = store_value<G>(grad_through<M>(fs(), value, z[j]));
  }
  others = block_sum<THREADS>(others, shared);
  // no thread writes g[top] in the loop, so z[top] is still the logit here
  if (top >= 0 && threadIdx.x == 0)
    g[top] = store_value<G>(grad_through<M>(fs(), -others, z[top]));
}

struct MultiTeacherArgs {
  int64_t vocab, stride_s, stride_g, stride_p, teacher_stride, ignore_index;
  double log_priors[kMaxTeachers];
  double temperature, entropy_tau, soft_weight, hard_weight;
  int teachers, weighting, fusion;
  bool has_labels;
};

struct MultiTeacherTransforms {  // a kernel parameter, as KDTransforms
  LogitTransform<double> student, teachers[kMaxTeachers];  // identities: none
};

// Loss of one row against K teachers (teacher + k * teacher_stride + row * vocab); writes the
// mixing weights w (K), d loss / d z_s and (parts given) the row's divergence and CE; f: the
// logit transforms (read with TRANSFORM only).
template <typename T, typename G, bool TRANSFORM>
__global__ void __launch_bounds__(kThreads<T, TRANSFORM>)
multi_teacher_rows_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                          const int64_t* __restrict__ labels, G* grad, T* __restrict__ loss,
                          float* __restrict__ weights_out, int64_t stride_w,
                          T* __restrict__ parts, MultiTeacherArgs o,
                          MultiTeacherTransforms f) {
  using M = Scalar<T>;
  constexpr int THREADS = kThreads<T, TRANSFORM>;
  __shared__ T shared[THREADS / 32];
  const int64_t row = blockIdx.x, V = o.vocab;
  const int K = o.teachers;
  const T* z = student + row * o.stride_s;
  const T* zt = teacher + row * V;
  const int64_t label = o.has_labels ? labels[row] : -1;
  const bool counted = !(o.has_labels && label == o.ignore_index);
  G* g = grad == nullptr ? nullptr : grad + row * o.stride_g;
  const T inv_t = T(1) / T(o.temperature);
  const bool ce = o.hard_weight > 0 || (parts != nullptr && o.has_labels);
  // the models' logits f(z) at j: the student's, teacher k's
  auto fs = [&] { return transform_or_identity<TRANSFORM, T>(f.student); };
  auto zs = [&](int64_t j) { return transformed<M>(fs(), z[j]); };
  auto zt_ = [&](int k, int64_t j) {
    return transformed<M>(transform_or_identity<TRANSFORM, T>(f.teachers[k]),
                          zt[k * o.teacher_stride + j]);
  };

  T max_z = neg_inf<T>(), m_t[kMaxTeachers];
  for (int k = 0; k < K; ++k) m_t[k] = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    max_z = nan_max(max_z, zs(j));
    for (int k = 0; k < K; ++k) m_t[k] = nan_max(m_t[k], zt_(k, j));
  }
  const T m_z = block_max<THREADS>(max_z, shared), m_s = m_z * inv_t;
  for (int k = 0; k < K; ++k) m_t[k] = block_max<THREADS>(m_t[k], shared) * inv_t;

  T l_s = 0, l_z = 0, l_t[kMaxTeachers], b[kMaxTeachers], a[kMaxTeachers];
  for (int k = 0; k < K; ++k) l_t[k] = b[k] = a[k] = T(0);
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    const T zj = zs(j);
    T ds = zj * inv_t - m_s;
    l_s += M::exp(ds);
    if (ce) l_z += M::exp(zj - m_z);
    for (int k = 0; k < K; ++k) {
      T dt = zt_(k, j) * inv_t - m_t[k];
      T e_t = M::exp(dt);
      l_t[k] += e_t;
      b[k] += M::xlogy(e_t, dt);
      if (o.fusion == WEIGHTED_KL) a[k] += M::xlogy(e_t, dt - ds);
    }
  }
  const T z_label = ce && counted ? zs(label) : T(0);  // before the block sums (see kd_rows)
  l_s = block_sum<THREADS>(l_s, shared);
  const T log_l_s = log_(l_s), log_l_z = log_(block_sum<THREADS>(l_z, shared));
  T log_l_t[kMaxTeachers], w[kMaxTeachers], top = neg_inf<T>(), w_sum = 0;
  for (int k = 0; k < K; ++k) {  // w = softmax_k(log pi_k - H_k / tau), or pi
    l_t[k] = block_sum<THREADS>(l_t[k], shared);
    b[k] = block_sum<THREADS>(b[k], shared);
    a[k] = block_sum<THREADS>(a[k], shared);
    log_l_t[k] = log_(l_t[k]);
    w[k] = T(o.log_priors[k]);
    if (o.weighting == ENTROPY) w[k] -= entropy_from_sums(l_t[k], b[k]) / T(o.entropy_tau);
    top = nan_max(top, w[k]);
  }
  for (int k = 0; k < K; ++k) w_sum += (w[k] = M::exp(w[k] - top));
  for (int k = 0; k < K; ++k) w[k] /= w_sum;
  if (threadIdx.x < K)
    weights_out[row * stride_w + threadIdx.x] = static_cast<float>(w[threadIdx.x]);
  if (!counted) {
    store_row(loss, parts, o.stride_p, row, T(0), T(0), T(0));
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = store_value<G>(T(0));
    return;
  }
  auto mixture = [&](int64_t j) {  // P = sum_k w_k p_k
    T p = 0;
    for (int k = 0; k < K; ++k)
      p += w[k] * M::exp(zt_(k, j) * inv_t - m_t[k] - log_l_t[k]);
    return p;
  };
  T divergence = 0;
  if (o.fusion == MIXTURE) {
    for (int64_t j = threadIdx.x; j < V; j += THREADS) {
      T p = mixture(j);
      divergence += M::xlogy(p, log_(p) - (zs(j) * inv_t - m_s - log_l_s));
    }
    divergence = block_sum<THREADS>(divergence, shared);
  } else {
    for (int k = 0; k < K; ++k) divergence += w[k] * (a[k] / l_t[k] - log_l_t[k] + log_l_s);
  }
  if (threadIdx.x == 0) {
    const T cross_entropy = ce ? log_l_z - (z_label - m_z) : T(0);
    T value = T(o.soft_weight) * divergence;
    if (o.hard_weight > 0) value += T(o.hard_weight) * cross_entropy;
    store_row(loss, parts, o.stride_p, row, value, divergence, cross_entropy);
  }
  if (g == nullptr) return;
  const T coef = T(o.soft_weight) * inv_t;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    const T zj = zs(j);
    T value = coef * (M::exp(zj * inv_t - m_s - log_l_s) - mixture(j));
    if (o.hard_weight > 0)
      value += T(o.hard_weight) * (hard_grad<M>(zj, m_z, log_l_z) - (j == label ? T(1) : T(0)));
    g[j] = store_value<G>(grad_through<M>(fs(), value, z[j]));  // z[j] read before g[j] written
  }
}

struct SparseArgs {
  int64_t vocab, k, stride_s, stride_g, stride_p, ignore_index;
  double temperature, soft_weight, hard_weight;
  bool bucket, reverse, has_labels;
};

// Loss of one row against a sparse teacher: ids and its raw logits zt (k, double), its full LSE;
// g receives d loss / d z_s; log_p_scratch (C, k) holds the teacher's bucket log-probabilities.
// The row's support is a bit mask in dynamic shared memory ((V + 31) / 32 words). Every formula from row_math.h, as rows_cpu.cpp's sparse_row.
template <typename T, typename G, bool TRANSFORM>
__global__ void __launch_bounds__(kThreads<T, TRANSFORM>, 1)
sparse_kd_rows_kernel(const T* __restrict__ student, const int64_t* __restrict__ teacher_ids,
                      const double* __restrict__ teacher, const double* __restrict__ teacher_lse,
                      const int64_t* __restrict__ labels, G* grad, T* __restrict__ loss,
                      T* __restrict__ log_p_scratch, T* __restrict__ parts, SparseArgs o,
                      LogitTransform<double> student_transform) {
  using M = Scalar<T>;
  constexpr int THREADS = kThreads<T, TRANSFORM>;
  extern __shared__ uint32_t support[];
  __shared__ T shared[THREADS / 32];
  __shared__ double shared_d[THREADS / 32];
  __shared__ int64_t shared_index[THREADS / 32];
  const int64_t row = blockIdx.x, V = o.vocab, K = o.k;
  const T* z = student + row * o.stride_s;
  const int64_t* ids = teacher_ids + row * K;
  const double* zt = teacher + row * K;
  const int64_t label = o.has_labels ? labels[row] : -1;
  G* g = grad == nullptr ? nullptr : grad + row * o.stride_g;
  if (o.has_labels && label == o.ignore_index) {
    store_row(loss, parts, o.stride_p, row, T(0), T(0), T(0));
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = store_value<G>(T(0));
    return;
  }
  const bool ce = o.hard_weight > 0 || (parts != nullptr && o.has_labels);
  const int64_t words = (V + 31) / 32;
  for (int64_t w = threadIdx.x; w < words; w += THREADS) support[w] = 0u;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < K; i += THREADS)  // ids are checked: in [0, V), distinct
    atomicOr(&support[ids[i] / 32], 1u << (ids[i] % 32));
  __syncthreads();
  auto in_support = [&](int64_t j) { return (support[j / 32] >> (j % 32)) & 1u; };

  // the teacher, in double over the k entries: x_i = t_i - LSE_t (bucket) or t_i
  const double lse_t = o.bucket ? teacher_lse[row] : 0.0;
  double m_x = -HUGE_VAL, sum_x = 0;
  for (int64_t i = threadIdx.x; i < K; i += THREADS)
    m_x = nan_max(m_x, zt[i] / o.temperature - lse_t);
  m_x = block_max<THREADS>(m_x, shared_d);
  if (m_x > -HUGE_VAL)
    for (int64_t i = threadIdx.x; i < K; i += THREADS)
      sum_x += exp(zt[i] / o.temperature - lse_t - m_x);
  const double lse_x = m_x + log(block_sum<THREADS>(sum_x, shared_d));
  const T log_tail = T(o.bucket ? floored_log_p(log1mexp(lse_x), o.reverse) : -HUGE_VAL);
  // log p_i into the row's scratch (each thread reads back only its own entries)
  T* log_p = log_p_scratch + row * K;
  for (int64_t i = threadIdx.x; i < K; i += THREADS)
    log_p[i] = T(floored_log_p(zt[i] / o.temperature - lse_t - (o.bucket ? 0.0 : lse_x),
                               o.reverse));

  // the student (its logits f(z) at j: zs(j)): maxima and sums of s off S, of s on S, of z
  // (hard CE)
  const T inv_t = T(1) / T(o.temperature);
  auto fs = [&] { return transform_or_identity<TRANSFORM, T>(student_transform); };
  auto zs = [&](int64_t j) { return transformed<M>(fs(), z[j]); };
  T max_z = neg_inf<T>(), max_off = neg_inf<T>(), max_ids = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    const T zj = zs(j);
    max_z = nan_max(max_z, zj);
    if (!in_support(j)) max_off = nan_max(max_off, zj * inv_t);
  }
  for (int64_t i = threadIdx.x; i < K; i += THREADS) max_ids = nan_max(max_ids, zs(ids[i]) * inv_t);
  const T m_z = block_max<THREADS>(max_z, shared), m_off = block_max<THREADS>(max_off, shared);
  const T m_ids = block_max<THREADS>(max_ids, shared);
  T l_off = 0, l_z = 0, l_ids = 0;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    if (m_off > neg_inf<T>() && !in_support(j)) l_off += M::exp(zs(j) * inv_t - m_off);
    if (ce) l_z += M::exp(zs(j) - m_z);
  }
  for (int64_t i = threadIdx.x; i < K; i += THREADS) l_ids += M::exp(zs(ids[i]) * inv_t - m_ids);
  const T z_label = ce ? zs(label) : T(0);  // before the block sums (see kd_rows)
  l_off = block_sum<THREADS>(l_off, shared);
  l_ids = block_sum<THREADS>(l_ids, shared);
  const T log_l_z = log_(block_sum<THREADS>(l_z, shared));
  const T m_s = M::max(m_off, m_ids);
  const T l_s = (l_off > T(0) ? l_off * M::exp(m_off - m_s) : T(0)) + l_ids * M::exp(m_ids - m_s);
  const T log_l_s = log_(l_s), log_l_off = log_(l_off);
  const T shift = o.bucket ? m_s + log_l_s : m_ids + log_(l_ids);  // log q_i = s_i - shift
  const bool has_tail = o.bucket && l_off > T(0);  // k = V leaves no tail bucket
  const T log_q_tail = (m_off - m_s) + (log_l_off - log_l_s);

  T divergence = 0;
  for (int64_t i = threadIdx.x; i < K; i += THREADS)
    divergence += sparse_term<M>(o.reverse, log_p[i], zs(ids[i]) * inv_t - shift);
  divergence = block_sum<THREADS>(divergence, shared);
  if (has_tail) divergence += sparse_term<M>(o.reverse, log_tail, log_q_tail);
  if (threadIdx.x == 0) {
    const T cross_entropy = ce ? log_l_z - (z_label - m_z) : T(0);
    T value = T(o.soft_weight) * divergence;
    if (o.hard_weight > 0) value += T(o.hard_weight) * cross_entropy;
    store_row(loss, parts, o.stride_p, row, value, divergence, cross_entropy);
  }
  if (g == nullptr) return;

  // reverse: the entry of the student's mode last, -(sum of the others): the first top logit
  // (bucket) or the first id with the top logit on S (renormalize)
  int64_t top = -1;
  if (o.reverse) {
    int64_t first = INT64_MAX;
    if (o.bucket) {
      for (int64_t j = threadIdx.x; j < V; j += THREADS)
        if (zs(j) == m_z && j < first) first = j;
    } else {
      for (int64_t i = threadIdx.x; i < K; i += THREADS)
        if (zs(ids[i]) * inv_t == m_ids && i < first) first = i;
    }
    top = block_first_index<THREADS>(first, shared_index);
    if (!o.bucket) top = ids[top];
  }
  const T coef = T(o.soft_weight) * inv_t;
  auto hard = [&](T zj, int64_t j) {
    return o.hard_weight > 0
               ? T(o.hard_weight) * (hard_grad<M>(zj, m_z, log_l_z) - (j == label ? T(1) : T(0)))
               : T(0);
  };
  T others = 0;  // of d loss / d f
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {  // off S (renormalize: 0 but hard CE)
    if (in_support(j) || j == top) continue;
    T value = hard(zs(j), j);
    if (o.bucket) {
      T s = zs(j) * inv_t;
      value += coef * sparse_grad<M>(o.reverse, log_tail + (s - m_off) - log_l_off,
                                     s - m_s - log_l_s, divergence);
    }
    others += value;
    // z[j] is read before g[j] is written: g may alias the student logits
    g[j] = store_value<G>(grad_through<M>(fs(), value, z[j]));
  }
  for (int64_t i = threadIdx.x; i < K; i += THREADS) {  // on S: no entry is written twice
    const int64_t j = ids[i];
    if (j == top) continue;
    const T zj = zs(j);
    T value = coef * sparse_grad<M>(o.reverse, log_p[i], zj * inv_t - shift, divergence) +
              hard(zj, j);
    others += value;
    g[j] = store_value<G>(grad_through<M>(fs(), value, z[j]));
  }
  others = block_sum<THREADS>(others, shared);
  // no thread writes g[top] in the loops, so z[top] is still the logit here
  if (top >= 0 && threadIdx.x == 0)
    g[top] = store_value<G>(grad_through<M>(fs(), -others, z[top]));
}

#ifdef FASTKD_KERNELS_ONLY
// The kernels-only build (the sm_90 compile test) instantiates every variant the ops launch.
#define FASTKD_INSTANTIATE(T, G, X)                                                            \
  template __global__ void kd_rows_kernel<T, G, X>(const T*, const T*, const int64_t*, G*, T*, \
                                                   T*, KDArgs, KDTransforms);                  \
  template __global__ void multi_teacher_rows_kernel<T, G, X>(                                 \
      const T*, const T*, const int64_t*, G*, T*, float*, int64_t, T*, MultiTeacherArgs,       \
      MultiTeacherTransforms);                                                                 \
  template __global__ void sparse_kd_rows_kernel<T, G, X>(                                     \
      const T*, const int64_t*, const double*, const double*, const int64_t*, G*, T*, T*, T*,  \
      SparseArgs, LogitTransform<double>);
#define FASTKD_INSTANTIATE_BOTH(T, G) FASTKD_INSTANTIATE(T, G, false) FASTKD_INSTANTIATE(T, G, true)
FASTKD_INSTANTIATE_BOTH(float, float)
FASTKD_INSTANTIATE_BOTH(float, __nv_bfloat16)
FASTKD_INSTANTIATE_BOTH(float, __half)
FASTKD_INSTANTIATE_BOTH(float, double)
FASTKD_INSTANTIATE_BOTH(double, double)
FASTKD_INSTANTIATE_BOTH(double, float)
FASTKD_INSTANTIATE_BOTH(double, __nv_bfloat16)
FASTKD_INSTANTIATE_BOTH(double, __half)
#endif

}  // namespace fastkd

#ifndef FASTKD_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "op_checks.h"

namespace fastkd {
namespace {

// parts_out's data in the math dtype T (checked), or null without parts_out.
template <typename T>
T* parts_data(const std::optional<at::Tensor>& parts_out) {
  return parts_out.has_value() ? static_cast<T*>(parts_out->data_ptr()) : nullptr;
}

// Calls launch(T{}, G{}, std::bool_constant<transform>{}) with T the math dtype of the logits
// and G the gradient's CUDA type.
template <typename Launch>
void dispatch(at::ScalarType math, const std::optional<at::Tensor>& grad_out, bool transform,
              Launch&& launch) {
  const at::ScalarType grad = grad_out.has_value() ? grad_out->scalar_type() : math;
  auto with_transform = [&](auto t, auto g) {
    if (transform) return launch(t, g, std::true_type{});
    return launch(t, g, std::false_type{});
  };
  auto with_grad = [&](auto t) {
    using T = decltype(t);
    switch (grad) {
      case at::kFloat: return with_transform(T{}, float{});
      case at::kDouble: return with_transform(T{}, double{});
      case at::kBFloat16: return with_transform(T{}, __nv_bfloat16{});
      case at::kHalf: return with_transform(T{}, __half{});
      default: TORCH_CHECK(false, "fastkd row ops: grad_out dtype ", grad, " is not supported");
    }
  };
  if (math == at::kDouble) with_grad(double{});
  else with_grad(float{});
}

at::Tensor kd_rows_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                        const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& grad_out, c10::string_view divergence,
                        double beta, double temperature, double soft_weight, double hard_weight,
                        int64_t ignore_index, double alpha, double student_softcap,
                        double student_scale, double teacher_softcap, double teacher_scale,
                        const std::optional<at::Tensor>& parts_out) {
  check_kd_rows(student_logits, teacher_logits, grad_out);
  check_transform("kd_rows", "the student", student_softcap, student_scale);
  check_transform("kd_rows", "the teacher", teacher_softcap, teacher_scale);
  c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const at::ScalarType math = math_dtype(student_logits);
  check_parts_out("kd_rows", parts_out, rows, math);
  const at::Tensor z = math_logits(student_logits, math), zt = math_logits(teacher_logits, math);
  const auto label = int64_labels(labels, rows, hard_weight > 0, "kd_rows");
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  if (rows == 0) return loss;
  KDArgs args{vocab, z.stride(0), zt.stride(0), grad_out.has_value() ? grad_out->stride(0) : 0,
              parts_out.has_value() ? parts_out->stride(0) : 0, ignore_index, beta, temperature,
              soft_weight, hard_weight, alpha, divergence_id(divergence, alpha),
              label.has_value()};
  const KDTransforms transforms{logit_transform<double>(student_softcap, student_scale),
                                logit_transform<double>(teacher_softcap, teacher_scale)};
  const bool transform = student_softcap != 0 || student_scale != 1 || teacher_softcap != 0 ||
                         teacher_scale != 1;
  dispatch(math, grad_out, transform, [&](auto t, auto g, auto x) {
    using T = decltype(t);
    using G = decltype(g);
    constexpr bool X = decltype(x)::value;
    kd_rows_kernel<T, G, X><<<rows, kThreads<T, X>, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(z.data_ptr()), static_cast<const T*>(zt.data_ptr()),
        label.has_value() ? label->data_ptr<int64_t>() : nullptr,
        grad_out.has_value() ? static_cast<G*>(grad_out->data_ptr()) : nullptr,
        static_cast<T*>(loss.data_ptr()), parts_data<T>(parts_out), args, transforms);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor multi_teacher_rows_cuda(const at::Tensor& student_logits,
                                   const at::Tensor& teacher_logits,
                                   const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& grad_out,
                                   const at::Tensor& weights_out, at::ArrayRef<double> priors,
                                   double temperature, c10::string_view weighting,
                                   double entropy_tau, c10::string_view fusion,
                                   double soft_weight, double hard_weight,
                                   int64_t ignore_index, double student_softcap,
                                   double student_scale, at::ArrayRef<double> teacher_softcaps,
                                   at::ArrayRef<double> teacher_scales,
                                   const std::optional<at::Tensor>& parts_out) {
  check_multi_teacher_rows(student_logits, teacher_logits, grad_out, weights_out, priors.size(),
                           weighting, fusion);
  check_transform("multi_teacher_rows", "the student", student_softcap, student_scale);
  check_teacher_transforms("multi_teacher_rows", teacher_softcaps, teacher_scales,
                           priors.size());
  TORCH_CHECK(static_cast<int64_t>(priors.size()) <= kMaxTeachers,
              "multi_teacher_rows: the CUDA op takes at most ", kMaxTeachers, " teachers, got ",
              priors.size());
  c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const at::ScalarType math = math_dtype(student_logits);
  const at::Tensor z = math_logits(student_logits, math);
  const at::Tensor zt = math_logits(teacher_logits, math).contiguous();
  check_parts_out("multi_teacher_rows", parts_out, rows, math);
  const auto label = int64_labels(labels, rows, hard_weight > 0, "multi_teacher_rows");
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  if (rows == 0) return loss;
  MultiTeacherArgs args{};
  args.vocab = vocab;
  args.stride_s = z.stride(0);
  args.stride_g = grad_out.has_value() ? grad_out->stride(0) : 0;
  args.stride_p = parts_out.has_value() ? parts_out->stride(0) : 0;
  args.teacher_stride = rows * vocab;
  args.ignore_index = ignore_index;
  for (size_t k = 0; k < priors.size(); ++k) args.log_priors[k] = std::log(priors[k]);
  args.temperature = temperature;
  args.entropy_tau = entropy_tau;
  args.soft_weight = soft_weight;
  args.hard_weight = hard_weight;
  args.teachers = static_cast<int>(priors.size());
  args.weighting = weighting == "entropy" ? ENTROPY : STATIC;
  args.fusion = fusion == "mixture" ? MIXTURE : WEIGHTED_KL;
  args.has_labels = label.has_value();
  MultiTeacherTransforms transforms{};
  transforms.student = logit_transform<double>(student_softcap, student_scale);
  for (size_t k = 0; k < priors.size(); ++k)  // empty lists: no teacher is transformed
    transforms.teachers[k] = teacher_softcaps.empty()
                                 ? logit_transform<double>(0.0, 1.0)
                                 : logit_transform<double>(teacher_softcaps[k], teacher_scales[k]);
  bool transform = student_softcap != 0 || student_scale != 1;
  for (size_t k = 0; k < teacher_softcaps.size(); ++k)
    transform = transform || teacher_softcaps[k] != 0 || teacher_scales[k] != 1;
  dispatch(math, grad_out, transform, [&](auto t, auto g, auto x) {
    using T = decltype(t);
    using G = decltype(g);
    constexpr bool X = decltype(x)::value;
    multi_teacher_rows_kernel<T, G, X>
        <<<rows, kThreads<T, X>, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(z.data_ptr()), static_cast<const T*>(zt.data_ptr()),
        label.has_value() ? label->data_ptr<int64_t>() : nullptr,
        grad_out.has_value() ? static_cast<G*>(grad_out->data_ptr()) : nullptr,
        static_cast<T*>(loss.data_ptr()), weights_out.data_ptr<float>(), weights_out.stride(0),
        parts_data<T>(parts_out), args, transforms);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor sparse_kd_rows_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                               const at::Tensor& teacher_logits, const at::Tensor& teacher_lse,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad_out, c10::string_view tail,
                               c10::string_view divergence, double temperature,
                               double soft_weight, double hard_weight, int64_t ignore_index,
                               double student_softcap, double student_scale,
                               const std::optional<at::Tensor>& parts_out) {
  check_sparse_kd_rows(student_logits, teacher_ids, teacher_logits, teacher_lse, grad_out, tail,
                       divergence);
  check_transform("sparse_kd_rows", "the student", student_softcap, student_scale);
  c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const at::ScalarType math = math_dtype(student_logits);
  check_parts_out("sparse_kd_rows", parts_out, rows, math);
  const at::Tensor z = math_logits(student_logits, math);
  const at::Tensor ids = teacher_ids.contiguous();
  const at::Tensor zt = teacher_logits.to(at::kDouble).contiguous();
  const at::Tensor lse = teacher_lse.to(at::kDouble).contiguous();
  const auto label = int64_labels(labels, rows, hard_weight > 0, "sparse_kd_rows");
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  if (rows == 0) return loss;
  at::Tensor log_p = at::empty(ids.sizes(), student_logits.options().dtype(math));
  SparseArgs args{vocab, ids.size(1), z.stride(0),
                  grad_out.has_value() ? grad_out->stride(0) : 0,
                  parts_out.has_value() ? parts_out->stride(0) : 0, ignore_index, temperature,
                  soft_weight, hard_weight, tail == "bucket", divergence == "reverse_kl",
                  label.has_value()};
  const size_t mask_bytes = static_cast<size_t>((vocab + 31) / 32) * sizeof(uint32_t);
  const bool transform = student_softcap != 0 || student_scale != 1;
  dispatch(math, grad_out, transform, [&](auto t, auto g, auto x) {
    using T = decltype(t);
    using G = decltype(g);
    constexpr bool X = decltype(x)::value;
    auto kernel = sparse_kd_rows_kernel<T, G, X>;
    if (mask_bytes > 48 * 1024)  // past the default dynamic shared memory: V > 393,216
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(mask_bytes)));
    kernel<<<rows, kThreads<T, X>, mask_bytes, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(z.data_ptr()), ids.data_ptr<int64_t>(), zt.data_ptr<double>(),
        lse.data_ptr<double>(), label.has_value() ? label->data_ptr<int64_t>() : nullptr,
        grad_out.has_value() ? static_cast<G*>(grad_out->data_ptr()) : nullptr,
        static_cast<T*>(loss.data_ptr()), static_cast<T*>(log_p.data_ptr()),
        parts_data<T>(parts_out), args,
        logit_transform<double>(student_softcap, student_scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_rows", &kd_rows_cuda);
  m.impl("multi_teacher_rows", &multi_teacher_rows_cuda);
  m.impl("sparse_kd_rows", &sparse_kd_rows_cuda);
}

}  // namespace fastkd
#endif  // FASTKD_KERNELS_ONLY
