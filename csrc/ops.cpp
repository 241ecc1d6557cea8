// The schemas of fastkd's C++ and CUDA row ops: one definition, an implementation per device
// (rows_cpu.cpp, rows_cuda.cu), fake kernels in Python (fastkd/ops.py).
//
// kd_rows: per-token loss (C,) of student logits (C, V) against teacher logits (C, V); when
// grad_out (C, V) is given it receives d loss / d z_s (it may be student_logits itself).
// multi_teacher_rows: the same against K teachers (K, C, V); weights_out (C, K) receives the
// mixing weights. The loss is fp32 (fp64 for fp64 logits); ignored rows get 0 and a zero row.
// sparse_kd_rows: the same against a sparse teacher, ids and logits (C, k), lse (C,)
// (docs/sparse.md); the ids are distinct per row and in [0, V) (sparse_kd_loss checks them).
// The transform floats: the model's logits are f(z) = softcap tanh(scale z / softcap) of the raw
// logits z (softcap 0.0: scale z; row_math.h); teacher_softcaps / teacher_scales hold one value
// per teacher or none.
// addmm_fp32: out (M, N) fp32 = beta out + a (M, K) @ b (K, N) for half a, b (gemm_cpu.cpp).

#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  m.def(
      "kd_rows(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor(a!)? grad_out, str divergence, float beta, float temperature, float soft_weight, "
      "float hard_weight, int ignore_index, float student_softcap, float student_scale, "
      "float teacher_softcap, float teacher_scale) -> Tensor");
  m.def(
      "multi_teacher_rows(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor(a!)? grad_out, Tensor(b!) weights_out, float[] priors, float temperature, "
      "str weighting, float entropy_tau, str fusion, float soft_weight, float hard_weight, "
      "int ignore_index, float student_softcap, float student_scale, float[] teacher_softcaps, "
      "float[] teacher_scales) -> Tensor");
  m.def(
      "sparse_kd_rows(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logits, "
      "Tensor teacher_lse, Tensor? labels, Tensor(a!)? grad_out, str tail, str divergence, "
      "float temperature, float soft_weight, float hard_weight, int ignore_index, "
      "float student_softcap, float student_scale) -> Tensor");
  m.def("addmm_fp32(Tensor(a!) out, Tensor a, Tensor b, float beta) -> ()");
}
