"""Liger-Kernel's argument names for ``fastkd.nn.FusedKDLoss``.

Liger-Kernel 0.8.5's ``LigerFusedLinearJSDLoss`` (liger_kernel/chunked_loss/jsd_loss.py, on the
base class in fused_linear_distillation.py) computes, per token with q = softmax(z_s / T) and
p = softmax(z_t / T)::

    weight_soft_loss * JSD_beta(p, q) + weight_hard_loss * CE(z_s, label)

JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q; beta = 0 is
KL(p || q) and beta = 1 KL(q || p); the CE untempered; no T^2 factor; both terms summed over
the tokens whose label is not ``ignore_index`` and divided by their count (at least 1). That
is ``fused_kd_loss(divergence="jsd", beta=beta, temperature=T, soft_weight=weight_soft_loss,
hard_weight=weight_hard_loss, ignore_index=...)`` with ``reduction="mean"``, term for term.
"""

from __future__ import annotations

from typing import Any

# Liger-Kernel's name -> fastkd's (the same meaning). beta, temperature, ignore_index and
# chunk_size (tokens per chunk; speed only) are spelled alike in both. return_soft_hard_loss's
# (loss, soft, hard) are return_parts's: the unweighted JSD and CE, each a mean over the counted
# tokens.
RENAMED = {"weight_hard_loss": "hard_weight", "weight_soft_loss": "soft_weight",
           "return_soft_hard_loss": "return_parts"}
# Accepted and without effect: Liger wraps its chunk step in torch.compile; fastkd's row ops
# are Triton / C++ kernels that need no compiling per call.
IGNORED = ("compiled",)
# LigerFusedLinearJSDLoss.forward's keyword names -> FusedKDLoss.forward's (the positional
# order is the same: student, student weight, teacher, teacher weight, labels, the biases).
FORWARD_RENAMED = {"student_input": "student_hidden", "teacher_input": "teacher_hidden",
                   "true_labels": "labels"}
# LigerFusedLinearJSDLoss's defaults where they differ from fused_kd_loss's.
LIGER_DEFAULTS = {"divergence": "jsd", "hard_weight": 0.5, "soft_weight": 0.5}


def from_liger_names(owner: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with Liger-Kernel's names translated to fastkd's.

    When any Liger-only name is present (weight_hard_loss, weight_soft_loss,
    return_soft_hard_loss, compiled), the
    options not given take LigerFusedLinearJSDLoss's defaults (divergence "jsd", both weights
    0.5), so that the module computes Liger's loss; without one they are fastkd's own. A fastkd
    name given with its Liger spelling (hard_weight and weight_hard_loss) is a TypeError
    naming both. ``owner`` names the module in the messages.
    """
    liger_style = any(name in options for name in (*RENAMED, *IGNORED))
    translated = {}
    for name, value in options.items():
        if name in IGNORED:
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
            continue
        fastkd_name = RENAMED.get(name, name)
        if name in RENAMED and fastkd_name in options:
            raise TypeError(f"{owner}: {name!r} (Liger-Kernel's name) and {fastkd_name!r} "
                            "(fastkd's) set the same option; pass one of them")
        translated[fastkd_name] = value
    if liger_style:
        translated = {**LIGER_DEFAULTS, **translated}
    return translated


def liger_forward_names(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """A forward pre-hook (``with_kwargs=True``): Liger's keyword names in a forward call
    (``student_input=``, ``teacher_input=``, ``true_labels=``) renamed to fastkd's; both
    spellings of one argument are a TypeError naming both."""
    renamed = {}
    for name, value in kwargs.items():
        fastkd_name = FORWARD_RENAMED.get(name, name)
        if name in FORWARD_RENAMED and fastkd_name in kwargs:
            raise TypeError(f"{type(module).__name__}.forward: {name!r} (Liger-Kernel's name) "
                            f"and {fastkd_name!r} (fastkd's) are the same argument; pass one")
        renamed[fastkd_name] = value
    return args, renamed
