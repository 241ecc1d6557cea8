// addmm_fp32 on CPU: out (M, N) fp32 = beta out + a (M, K) @ b (K, N) for bf16 / fp16 operands,
// accumulated and written in fp32 (the logits are never rounded to half; docs/design.md
// section 4). torch's CPU mm has no fp32 output for half operands (aten::mm.dtype is CUDA-only),
// and upcasting the operands runs fp32 GEMMs about 4x slower than the half ones. The MKL that
// x86-64 torch builds link exports cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (half operands,
// fp32 accumulation and output): found at run time, with an upcasting fallback where absent.

#include <ATen/ATen.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <limits>

namespace fastkd {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values
using HalfGemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*,
                          int, float, float*, int);

HalfGemm find_gemm(at::ScalarType dtype) {
  static const auto bf16 =
      reinterpret_cast<HalfGemm>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  static const auto fp16 =
      reinterpret_cast<HalfGemm>(dlsym(RTLD_DEFAULT, "cblas_gemm_f16f16f32"));
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : nullptr;
}

// A matrix operand as CBLAS sees it in row-major order: transposed or not, and its leading dim.
bool as_cblas(const at::Tensor& t, int* trans, int* ld) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) {
    *trans = kNoTrans;
    *ld = static_cast<int>(t.stride(0));
    return true;
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) {
    *trans = kTrans;
    *ld = static_cast<int>(t.stride(1));
    return true;
  }
  return false;
}

void addmm_fp32_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                    double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "addmm_fp32: shapes out ", out.sizes(), ", a ", a.sizes(), ", b ", b.sizes(),
              " do not give out = a @ b");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.stride(1) == 1,
              "addmm_fp32: out must be float32 with unit-stride rows, got ", out.scalar_type(),
              " strides ", out.strides());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "addmm_fp32: a is ", a.scalar_type(),
              " but b is ", b.scalar_type());
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  if (m == 0 || n == 0) return;
  HalfGemm gemm = find_gemm(a.scalar_type());
  int trans_a = 0, trans_b = 0, lda = 0, ldb = 0;
  const int64_t limit = std::numeric_limits<int>::max();
  const bool fits = std::max({m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                              out.stride(0)}) <= limit;
  if (gemm == nullptr || k == 0 || !fits || !as_cblas(a, &trans_a, &lda) ||
      !as_cblas(b, &trans_b, &ldb)) {
    // no MKL half GEMM here (or an operand layout it cannot take): upcast
    at::Tensor result = at::mm(a.to(at::kFloat), b.to(at::kFloat));
    if (beta == 0) out.copy_(result);
    else out.mul_(beta).add_(result);
    return;
  }
  gemm(kRowMajor, trans_a, trans_b, static_cast<int>(m), static_cast<int>(n),
       static_cast<int>(k), 1.0f, a.data_ptr(), lda, b.data_ptr(), ldb,
       static_cast<float>(beta), out.data_ptr<float>(), static_cast<int>(out.stride(0)));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("addmm_fp32", &addmm_fp32_cpu); }

}  // namespace fastkd
