// Argument checks and dtype plumbing shared by the CPU and CUDA row ops (with torch).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "row_math.h"

namespace fastkd {

inline void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got ",
              t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, " rows must be unit-stride, got strides ",
              t.strides());
}

// Logits in the math dtype (fp64 stays fp64, everything else fp32), rows unit-stride.
inline at::Tensor math_logits(const at::Tensor& logits, at::ScalarType math) {
  at::Tensor out = logits.scalar_type() == math ? logits : logits.to(math);
  return out.stride(-1) == 1 ? out : out.contiguous();
}

// Labels (C,) as contiguous int64 on their device, or none; hard_weight > 0 needs them.
inline std::optional<at::Tensor> int64_labels(const std::optional<at::Tensor>& labels,
                                              int64_t rows, bool hard, const char* op) {
  TORCH_CHECK(labels.has_value() || !hard, op, ": hard_weight > 0 needs labels");
  if (!labels.has_value()) return std::nullopt;
  TORCH_CHECK(labels->dim() == 1 && labels->size(0) == rows, op, ": labels shape ",
              labels->sizes(), " must be (", rows, ",)");
  TORCH_CHECK(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels->scalar_type());
  return labels->to(at::kLong).contiguous();
}

inline void check_grad_out(const char* op, const std::optional<at::Tensor>& grad_out,
                    const at::Tensor& student) {
  if (!grad_out.has_value()) return;
  check_rows(op, "grad_out", *grad_out, 2);
  TORCH_CHECK(grad_out->sizes() == student.sizes(), op, ": grad_out shape ", grad_out->sizes(),
              " must equal student_logits shape ", student.sizes());
}

// The tensors of kd_rows: student and teacher logits (C, V), grad_out (C, V) or none.
inline void check_kd_rows(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& grad_out) {
  check_rows("kd_rows", "student_logits", student, 2);
  check_rows("kd_rows", "teacher_logits", teacher, 2);
  TORCH_CHECK(teacher.sizes() == student.sizes(), "kd_rows: teacher_logits ", teacher.sizes(),
              " must match student_logits ", student.sizes());
  check_grad_out("kd_rows", grad_out, student);
}

// The tensors and options of multi_teacher_rows: teacher logits (K, C, V), weights_out (C, K)
// fp32, one prior per teacher, the weighting and fusion names.
inline void check_multi_teacher_rows(const at::Tensor& student, const at::Tensor& teacher,
                                     const std::optional<at::Tensor>& grad_out,
                                     const at::Tensor& weights_out, size_t priors,
                                     c10::string_view weighting, c10::string_view fusion) {
  const char* op = "multi_teacher_rows";
  check_rows(op, "student_logits", student, 2);
  check_rows(op, "teacher_logits", teacher, 3);
  const int64_t rows = student.size(0), vocab = student.size(1), teachers = teacher.size(0);
  TORCH_CHECK(teacher.size(1) == rows && teacher.size(2) == vocab, op, ": teacher_logits ",
              teacher.sizes(), " must be (K, ", rows, ", ", vocab, ")");
  TORCH_CHECK(static_cast<int64_t>(priors) == teachers, op, ": ", priors, " priors for ",
              teachers, " teachers");
  TORCH_CHECK(weights_out.scalar_type() == at::kFloat && weights_out.dim() == 2 &&
                  weights_out.size(0) == rows && weights_out.size(1) == teachers &&
                  weights_out.stride(1) == 1,
              op, ": weights_out must be float32 (", rows, ", ", teachers,
              ") with unit-stride rows, got ", weights_out.scalar_type(), " ",
              weights_out.sizes());
  TORCH_CHECK(weighting == "entropy" || weighting == "static", op,
              ": weighting must be entropy or static, got ", weighting);
  TORCH_CHECK(fusion == "mixture" || fusion == "weighted_kl", op,
              ": fusion must be mixture or weighted_kl, got ", fusion);
  check_grad_out(op, grad_out, student);
}

// The tensors and options of sparse_kd_rows: ids (C, k) int64, logits (C, k), lse (C,).
inline void check_sparse_kd_rows(const at::Tensor& student, const at::Tensor& ids,
                                 const at::Tensor& logits, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& grad_out,
                                 c10::string_view tail, c10::string_view divergence) {
  const char* op = "sparse_kd_rows";
  check_rows(op, "student_logits", student, 2);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == student.size(0) && ids.scalar_type() == at::kLong,
              op, ": teacher_ids must be int64 (", student.size(0), ", k), got ",
              ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(logits.sizes() == ids.sizes(), op, ": teacher_logits ", logits.sizes(),
              " must match teacher_ids ", ids.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == student.size(0), op, ": teacher_lse ",
              lse.sizes(), " must be (", student.size(0), ",)");
  TORCH_CHECK(tail == "bucket" || tail == "renormalize", op,
              ": tail must be bucket or renormalize, got ", tail);
  TORCH_CHECK(divergence == "kl" || divergence == "reverse_kl", op,
              ": divergence must be kl or reverse_kl, got ", divergence);
  check_grad_out(op, grad_out, student);
}

// A logit transform (row_math.h): softcap 0 (none) or finite > 0, scale finite > 0.
inline void check_transform(const char* op, const char* who, double softcap, double scale) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": ", who,
              " softcap must be 0 (none) or a finite number > 0, got ", softcap);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": ", who,
              " scale must be a finite number > 0, got ", scale);
}

// multi_teacher_rows' teacher transforms: none, or one softcap and one scale per teacher.
inline void check_teacher_transforms(const char* op, at::ArrayRef<double> softcaps,
                                     at::ArrayRef<double> scales, size_t teachers) {
  TORCH_CHECK(softcaps.size() == scales.size() && (softcaps.empty() || softcaps.size() == teachers),
              op, ": teacher_softcaps (", softcaps.size(), ") and teacher_scales (",
              scales.size(), ") must both be empty or hold one value per teacher (", teachers,
              ")");
  for (size_t k = 0; k < softcaps.size(); ++k) check_transform(op, "a teacher", softcaps[k],
                                                               scales[k]);
}

// fp64 logits keep fp64 math; every other dtype computes in fp32.
inline at::ScalarType math_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline int divergence_id(c10::string_view name) {
  if (name == "kl") return KL;
  if (name == "reverse_kl") return REVERSE_KL;
  TORCH_CHECK(name == "jsd", "kd_rows: divergence must be kl, reverse_kl or jsd, got ", name);
  return JSD;
}

}  // namespace fastkd
