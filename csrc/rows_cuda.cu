// The CUDA row ops (TORCH_LIBRARY_IMPL(fastkd, CUDA)): one thread block per token row, each
// thread striding over the vocabulary, block reductions between the passes of row_math.h.
// Same contract as rows_cpu.cpp. Compiled with -DFASTKD_KERNELS_ONLY the file holds only the
// kernels and needs no torch: the CPU machines compile it to an sm_90 cubin that way.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "row_math.h"

namespace fastkd {

constexpr int kMaxTeachers = 8;
// Threads per row: 512, and 256 for fp64 math, whose multi-teacher state (5 x kMaxTeachers
// doubles) would spill at 512 threads' 128-register limit.
template <typename T>
constexpr int kThreads = sizeof(T) == 8 ? 256 : 512;

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

template <typename G, typename T>
__device__ __forceinline__ G store_value(T x) {
  if constexpr (sizeof(T) == sizeof(double) && sizeof(G) == sizeof(double)) return x;
  else return to_grad<G>(static_cast<float>(x));
}

struct KDArgs {
  int64_t vocab, stride_s, stride_t, stride_g, ignore_index;
  double beta, temperature, soft_weight, hard_weight;
  int divergence;
  bool has_labels;
};

// Loss of one row; g (stride_g) receives d loss / d z_s when given. T: the math (and logits)
// dtype, G: the gradient's.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads<T>)
kd_rows_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
               const int64_t* __restrict__ labels, G* grad, T* __restrict__ loss, KDArgs o) {
  using M = Scalar<T>;
  constexpr int THREADS = kThreads<T>;
  __shared__ T shared[THREADS / 32];
  __shared__ int64_t shared_index[THREADS / 32];
  const int64_t row = blockIdx.x, V = o.vocab;
  const T* z = student + row * o.stride_s;
  const T* zt = teacher + row * o.stride_t;
  const int64_t label = o.has_labels ? labels[row] : -1;
  G* g = grad == nullptr ? nullptr : grad + row * o.stride_g;
  if (o.has_labels && label == o.ignore_index) {
    if (threadIdx.x == 0) loss[row] = T(0);
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = store_value<G>(T(0));
    return;
  }
  const T inv_t = T(1) / T(o.temperature);
  T max_z = neg_inf<T>(), max_t = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    max_z = nan_max(max_z, z[j]);
    max_t = nan_max(max_t, zt[j]);
  }
  const T m_z = block_max<THREADS>(max_z, shared), m_s = m_z * inv_t;
  const T m_t = block_max<THREADS>(max_t, shared) * inv_t;

  T l_s = 0, l_t = 0, l_z = 0, a = 0;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    T ds = z[j] * inv_t - m_s, dt = zt[j] * inv_t - m_t;
    T e_s = M::exp(ds), e_t = M::exp(dt);
    l_s += e_s;
    l_t += e_t;
    if (o.divergence != JSD) a += divergence_term<M>(o.divergence, ds, dt, e_s, e_t);
    if (o.hard_weight > 0) l_z += M::exp(z[j] - m_z);
  }
  l_s = block_sum<THREADS>(l_s, shared);
  l_t = block_sum<THREADS>(l_t, shared);
  a = block_sum<THREADS>(a, shared);
  const T log_l_s = log_(l_s), log_l_t = log_(l_t);
  const T log_l_z = log_(block_sum<THREADS>(l_z, shared));
  const JsdConstants<T> jsd = jsd_constants<T>(o.beta);

  T divergence, eq_sp = 0;
  if (o.divergence == JSD) {
    T eq = 0, ep = 0;
    for (int64_t j = threadIdx.x; j < V; j += THREADS) {
      T log_q = z[j] * inv_t - m_s - log_l_s, log_p = zt[j] * inv_t - m_t - log_l_t;
      T x = jsd_x(log_q, log_p, jsd.log_odds_beta);
      eq += M::xlogy(M::exp(log_q), softplus<M>(x));
      ep += M::xlogy(M::exp(log_p), softplus<M>(-x));
    }
    eq_sp = block_sum<THREADS>(eq, shared);
    divergence = jsd_from_sums(jsd, eq_sp, block_sum<THREADS>(ep, shared));
  } else {
    divergence = one_pass_divergence(o.divergence, a, l_s, l_t);
  }
  if (threadIdx.x == 0) {
    T value = T(o.soft_weight) * divergence;
    if (o.hard_weight > 0) value += T(o.hard_weight) * (log_l_z - (z[label] - m_z));
    loss[row] = value;
  }
  if (g == nullptr) return;

  // The top student logit's entry is written last as -(sum of the others) for reverse_kl and
  // jsd, where the formulas cancel when q is near one-hot (row_math.h, rows_cpu.cpp).
  int64_t top = -1;
  if (o.divergence != KL) {
    int64_t first = INT64_MAX;
    for (int64_t j = threadIdx.x; j < V; j += THREADS)
      if (z[j] == m_z && j < first) first = j;
    top = block_first_index<THREADS>(first, shared_index);
  }
  const T coef = T(o.soft_weight) * inv_t, mean_ds_dt = a / l_s;
  T others = 0;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    T ds = z[j] * inv_t - m_s, dt = zt[j] * inv_t - m_t;
    T value = coef * divergence_grad<M>(o.divergence, ds - log_l_s, dt - log_l_t, ds, dt,
                                        mean_ds_dt, jsd.one_minus_beta, jsd.log_odds_beta,
                                        eq_sp);
    if (o.hard_weight > 0)
      value += T(o.hard_weight) * (hard_grad<M>(z[j], m_z, log_l_z) - (j == label ? T(1) : T(0)));
    if (j == top) continue;
    others += value;
    g[j] = store_value<G>(value);  // z[j] was read above: g may alias the student logits
  }
  others = block_sum<THREADS>(others, shared);
  if (top >= 0 && threadIdx.x == 0) g[top] = store_value<G>(-others);
}

struct MultiTeacherArgs {
  int64_t vocab, stride_s, stride_g, teacher_stride, ignore_index;
  double log_priors[kMaxTeachers];
  double temperature, entropy_tau, soft_weight, hard_weight;
  int teachers, weighting, fusion;
  bool has_labels;
};

// Loss of one row against K teachers (teacher + k * teacher_stride + row * vocab); writes the
// mixing weights w (K) and d loss / d z_s.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads<T>)
multi_teacher_rows_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                          const int64_t* __restrict__ labels, G* grad, T* __restrict__ loss,
                          float* __restrict__ weights_out, int64_t stride_w,
                          MultiTeacherArgs o) {
  using M = Scalar<T>;
  constexpr int THREADS = kThreads<T>;
  __shared__ T shared[THREADS / 32];
  const int64_t row = blockIdx.x, V = o.vocab;
  const int K = o.teachers;
  const T* z = student + row * o.stride_s;
  const T* zt = teacher + row * V;
  const int64_t label = o.has_labels ? labels[row] : -1;
  const bool counted = !(o.has_labels && label == o.ignore_index);
  G* g = grad == nullptr ? nullptr : grad + row * o.stride_g;
  const T inv_t = T(1) / T(o.temperature);

  T max_z = neg_inf<T>(), m_t[kMaxTeachers];
  for (int k = 0; k < K; ++k) m_t[k] = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    max_z = nan_max(max_z, z[j]);
    for (int k = 0; k < K; ++k) m_t[k] = nan_max(m_t[k], zt[k * o.teacher_stride + j]);
  }
  const T m_z = block_max<THREADS>(max_z, shared), m_s = m_z * inv_t;
  for (int k = 0; k < K; ++k) m_t[k] = block_max<THREADS>(m_t[k], shared) * inv_t;

  T l_s = 0, l_z = 0, l_t[kMaxTeachers], b[kMaxTeachers], a[kMaxTeachers];
  for (int k = 0; k < K; ++k) l_t[k] = b[k] = a[k] = T(0);
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    T ds = z[j] * inv_t - m_s;
    l_s += M::exp(ds);
    if (o.hard_weight > 0) l_z += M::exp(z[j] - m_z);
    for (int k = 0; k < K; ++k) {
      T dt = zt[k * o.teacher_stride + j] * inv_t - m_t[k];
      T e_t = M::exp(dt);
      l_t[k] += e_t;
      b[k] += M::xlogy(e_t, dt);
      if (o.fusion == WEIGHTED_KL) a[k] += M::xlogy(e_t, dt - ds);
    }
  }
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
    if (threadIdx.x == 0) loss[row] = T(0);
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = store_value<G>(T(0));
    return;
  }
  auto mixture = [&](int64_t j) {  // P = sum_k w_k p_k
    T p = 0;
    for (int k = 0; k < K; ++k)
      p += w[k] * M::exp(zt[k * o.teacher_stride + j] * inv_t - m_t[k] - log_l_t[k]);
    return p;
  };
  T divergence = 0;
  if (o.fusion == MIXTURE) {
    for (int64_t j = threadIdx.x; j < V; j += THREADS) {
      T p = mixture(j);
      divergence += M::xlogy(p, log_(p) - (z[j] * inv_t - m_s - log_l_s));
    }
    divergence = block_sum<THREADS>(divergence, shared);
  } else {
    for (int k = 0; k < K; ++k) divergence += w[k] * (a[k] / l_t[k] - log_l_t[k] + log_l_s);
  }
  if (threadIdx.x == 0) {
    T value = T(o.soft_weight) * divergence;
    if (o.hard_weight > 0) value += T(o.hard_weight) * (log_l_z - (z[label] - m_z));
    loss[row] = value;
  }
  if (g == nullptr) return;
  const T coef = T(o.soft_weight) * inv_t;
  for (int64_t j = threadIdx.x; j < V; j += THREADS) {
    T value = coef * (M::exp(z[j] * inv_t - m_s - log_l_s) - mixture(j));
    if (o.hard_weight > 0)
      value += T(o.hard_weight) * (hard_grad<M>(z[j], m_z, log_l_z) - (j == label ? T(1) : T(0)));
    g[j] = store_value<G>(value);
  }
}

#ifdef FASTKD_KERNELS_ONLY
// The kernels-only build (the sm_90 compile test) instantiates every variant the ops launch.
#define FASTKD_INSTANTIATE(T, G)                                                              \
  template __global__ void kd_rows_kernel<T, G>(const T*, const T*, const int64_t*, G*, T*,    \
                                                KDArgs);                                       \
  template __global__ void multi_teacher_rows_kernel<T, G>(                                    \
      const T*, const T*, const int64_t*, G*, T*, float*, int64_t, MultiTeacherArgs);
FASTKD_INSTANTIATE(float, float)
FASTKD_INSTANTIATE(float, __nv_bfloat16)
FASTKD_INSTANTIATE(float, __half)
FASTKD_INSTANTIATE(double, double)
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

// Calls launch(T{}, G{}) with T the math dtype of the logits and G the gradient's CUDA type.
template <typename Launch>
void dispatch(at::ScalarType math, const std::optional<at::Tensor>& grad_out, Launch&& launch) {
  const at::ScalarType grad = grad_out.has_value() ? grad_out->scalar_type() : math;
  auto with_grad = [&](auto t) {
    using T = decltype(t);
    switch (grad) {
      case at::kFloat: return launch(T{}, float{});
      case at::kDouble: return launch(T{}, double{});
      case at::kBFloat16: return launch(T{}, __nv_bfloat16{});
      case at::kHalf: return launch(T{}, __half{});
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
                        int64_t ignore_index) {
  check_kd_rows(student_logits, teacher_logits, grad_out);
  c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const at::ScalarType math = math_dtype(student_logits);
  const at::Tensor z = math_logits(student_logits, math), zt = math_logits(teacher_logits, math);
  const auto label = int64_labels(labels, rows, hard_weight > 0, "kd_rows");
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  if (rows == 0) return loss;
  KDArgs args{vocab, z.stride(0), zt.stride(0), grad_out.has_value() ? grad_out->stride(0) : 0,
              ignore_index, beta, temperature, soft_weight, hard_weight,
              divergence_id(divergence), label.has_value()};
  dispatch(math, grad_out, [&](auto t, auto g) {
    using T = decltype(t);
    using G = decltype(g);
    kd_rows_kernel<T, G><<<rows, kThreads<T>, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(z.data_ptr()), static_cast<const T*>(zt.data_ptr()),
        label.has_value() ? label->data_ptr<int64_t>() : nullptr,
        grad_out.has_value() ? static_cast<G*>(grad_out->data_ptr()) : nullptr,
        static_cast<T*>(loss.data_ptr()), args);
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
                                   int64_t ignore_index) {
  check_multi_teacher_rows(student_logits, teacher_logits, grad_out, weights_out, priors.size(),
                           weighting, fusion);
  TORCH_CHECK(static_cast<int64_t>(priors.size()) <= kMaxTeachers,
              "multi_teacher_rows: the CUDA op takes at most ", kMaxTeachers, " teachers, got ",
              priors.size());
  c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t rows = student_logits.size(0), vocab = student_logits.size(1);
  const at::ScalarType math = math_dtype(student_logits);
  const at::Tensor z = math_logits(student_logits, math);
  const at::Tensor zt = math_logits(teacher_logits, math).contiguous();
  const auto label = int64_labels(labels, rows, hard_weight > 0, "multi_teacher_rows");
  at::Tensor loss = at::empty({rows}, student_logits.options().dtype(math));
  if (rows == 0) return loss;
  MultiTeacherArgs args{};
  args.vocab = vocab;
  args.stride_s = z.stride(0);
  args.stride_g = grad_out.has_value() ? grad_out->stride(0) : 0;
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
  dispatch(math, grad_out, [&](auto t, auto g) {
    using T = decltype(t);
    using G = decltype(g);
    multi_teacher_rows_kernel<T, G><<<rows, kThreads<T>, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(z.data_ptr()), static_cast<const T*>(zt.data_ptr()),
        label.has_value() ? label->data_ptr<int64_t>() : nullptr,
        grad_out.has_value() ? static_cast<G*>(grad_out->data_ptr()) : nullptr,
        static_cast<T*>(loss.data_ptr()), weights_out.data_ptr<float>(), weights_out.stride(0),
        args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("kd_rows", &kd_rows_cuda);
  m.impl("multi_teacher_rows", &multi_teacher_rows_cuda);
}

}  // namespace fastkd
#endif  // FASTKD_KERNELS_ONLY
