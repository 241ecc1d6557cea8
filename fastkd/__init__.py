"""fastkd: fused kernels for knowledge distillation of large-vocabulary language models."""

from fastkd.attention import attention_kd_loss
from fastkd.functional import fused_kd_loss, kd_loss
from fastkd.multi_teacher import multi_teacher_kd_loss
from fastkd.sparse import sparse_kd_loss

__version__ = "0.1.0"

__all__ = ["attention_kd_loss", "fused_kd_loss", "kd_loss", "multi_teacher_kd_loss",
           "sparse_kd_loss"]
