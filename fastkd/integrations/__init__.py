"""Adapters that put fastkd's fused losses into other libraries' trainers.

`fastkd.integrations.trl`: TRL's GKD trainer with its generalized JSD computed by
`fastkd.fused_kd_loss` (needs the `trl` extra: `pip install 'fastkd[trl]'`).
"""
