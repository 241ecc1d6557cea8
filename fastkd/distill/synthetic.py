"""A seeded synthetic language with a large vocabulary and learnable structure.

Every token belongs to one of ``n_clusters`` clusters of equal size. The next token is drawn in
two stages: a successor cluster from a sparse transition table over the current token's cluster
(``branching`` successors per cluster, Zipf-weighted), then a token from that cluster's own Zipf
distribution. A model that learns cluster membership and the within-cluster frequencies reaches
the language's true entropy; a model that sees only sampled next tokens learns the rare members
of each cluster slowly, which is where the soft targets of a teacher help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MarkovLanguage:
    """Transition tables of the synthetic language.

    Attributes:
        cluster_of: (V,) cluster id of every token.
        members: (C, V // C) token ids of every cluster.
        member_probs: (C, V // C) probability of each member within its cluster.
        successors: (C, branching) successor cluster ids of every cluster.
        successor_probs: (C, branching) probability of each successor cluster.
    """

    cluster_of: torch.Tensor
    members: torch.Tensor
    member_probs: torch.Tensor
    successors: torch.Tensor
    successor_probs: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.cluster_of.numel()

    def entropy_rate(self) -> float:
        """Mean next-token entropy in nats under the uniform cluster mixture (an approximation
        of the stationary one); exp of it is the perplexity a perfect model reaches."""
        h_member = -(self.member_probs * self.member_probs.log()).sum(-1)
        h_succ = -(self.successor_probs * self.successor_probs.log()).sum(-1)
        h_next = (self.successor_probs * h_member[self.successors]).sum(-1)
        return float((h_succ + h_next).mean())


def _zipf(n: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) Zipf probabilities 1/rank^exponent in a random order."""
    p = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    return (p / p.sum())[torch.randperm(n, generator=generator)]


def make_language(
    vocab_size: int = 16384,
    n_clusters: int = 128,
    branching: int = 4,
    zipf_exponent: float = 1.1,
    seed: int = 0,
) -> MarkovLanguage:
    """Draw a language; the same arguments always give the same tables."""
    if vocab_size % n_clusters:
        raise ValueError(f"vocab_size={vocab_size} must be a multiple of n_clusters={n_clusters}")
    g = torch.Generator().manual_seed(seed)
    size = vocab_size // n_clusters
    members = torch.randperm(vocab_size, generator=g).view(n_clusters, size)
    cluster_of = torch.empty(vocab_size, dtype=torch.long)
    cluster_of[members.reshape(-1)] = torch.arange(n_clusters).repeat_interleave(size)
    member_probs = torch.stack([_zipf(size, zipf_exponent, g) for _ in range(n_clusters)])
    successors = torch.stack(
        [torch.randperm(n_clusters, generator=g)[:branching] for _ in range(n_clusters)]
    )
    successor_probs = torch.stack([_zipf(branching, 1.0, g) for _ in range(n_clusters)])
    return MarkovLanguage(cluster_of, members, member_probs, successors, successor_probs)


def sample_corpus(
    lang: MarkovLanguage, n_sequences: int, seq_len: int, seed: int
) -> torch.Tensor:
    """(n_sequences, seq_len) token ids; each sequence starts at a uniformly drawn token."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_sequences, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(lang.vocab_size, (n_sequences,), generator=g)
    rows = torch.arange(n_sequences)
    for t in range(1, seq_len):
        cur = lang.cluster_of[out[:, t - 1]]
        pick = torch.multinomial(lang.successor_probs[cur], 1, generator=g).squeeze(1)
        nxt = lang.successors[cur, pick]
        member = torch.multinomial(lang.member_probs[nxt], 1, generator=g).squeeze(1)
        out[rows, t] = lang.members[nxt, member]
    return out


def true_perplexity(lang: MarkovLanguage) -> float:
    """Perplexity of the language's own next-token distribution (the floor for any model)."""
    return math.exp(lang.entropy_rate())
