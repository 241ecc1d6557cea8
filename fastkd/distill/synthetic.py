"""A seeded synthetic language with a large vocabulary and learnable structure.

Documents are about one topic each. The vocabulary is split into `n_function` shared
"function words" and `n_topics` disjoint topic vocabularies. Each token of a document is a
function word with probability `function_rate` (drawn from a Zipf distribution over the function
words), else a word of the document's topic (drawn from that topic's own Zipf distribution).
A model must learn which topic each word belongs to, infer the topic from the context, and learn
the frequencies of the topic's words; a model that sees only sampled next tokens learns the rare
words of each topic slowly, which is where the soft targets of a teacher help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopicLanguage:
    """Tables of the synthetic language.

    Attributes:
        function_words: (F,) ids of the function words.
        function_probs: (F,) their probabilities.
        members: (K, S) ids of the words of each topic.
        member_probs: (K, S) probability of each word within its topic.
        function_rate: probability that a token is a function word.
    """

    function_words: torch.Tensor
    function_probs: torch.Tensor
    members: torch.Tensor
    member_probs: torch.Tensor
    function_rate: float

    @property
    def vocab_size(self) -> int:
        return self.function_words.numel() + self.members.numel()

    @property
    def n_topics(self) -> int:
        return self.members.shape[0]


def _zipf(n: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) Zipf probabilities 1/rank^exponent in a random order."""
    p = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    return (p / p.sum())[torch.randperm(n, generator=generator)]


def make_language(
    vocab_size: int = 16384,
    n_topics: int = 64,
    n_function: int = 256,
    function_rate: float = 0.2,
    zipf_exponent: float = 1.1,
    seed: int = 0,
) -> TopicLanguage:
    """Draw a language; the same arguments always give the same tables."""
    if (vocab_size - n_function) % n_topics:
        raise ValueError(f"vocab_size - n_function = {vocab_size - n_function} must be a "
                         f"multiple of n_topics = {n_topics}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab_size, generator=g)
    members = ids[n_function:].view(n_topics, -1)
    member_probs = torch.stack([_zipf(members.shape[1], zipf_exponent, g)
                                for _ in range(n_topics)])
    return TopicLanguage(ids[:n_function], _zipf(n_function, 1.0, g), members, member_probs,
                         function_rate)


def sample_corpus(lang: TopicLanguage, n_documents: int, length: int, seed: int) -> torch.Tensor:
    """(n_documents, length) token ids, one topic per document."""
    g = torch.Generator().manual_seed(seed)
    topic = torch.randint(lang.n_topics, (n_documents,), generator=g)
    words = lang.members[topic.unsqueeze(1),
                         torch.multinomial(lang.member_probs[topic], length, True, generator=g)]
    shared = lang.function_words[torch.multinomial(lang.function_probs, n_documents * length,
                                                   True, generator=g)].view(n_documents, length)
    is_function = torch.rand(n_documents, length, generator=g) < lang.function_rate
    return torch.where(is_function, shared, words)


def bayes_perplexity(lang: TopicLanguage, corpus: torch.Tensor) -> float:
    """Perplexity of the exact predictive distribution on `corpus` (n, length), predicting
    tokens 1.. from their prefixes: the floor no model can beat on this data.

    Before the first topic word the topic is uniform over the K topics; after it, it is known.
    """
    v = lang.vocab_size
    topic_of = torch.full((v,), -1, dtype=torch.long)
    topic_of[lang.members.reshape(-1)] = torch.arange(lang.n_topics).repeat_interleave(
        lang.members.shape[1])
    p_word = torch.zeros(v, dtype=torch.float64)
    p_word[lang.members.reshape(-1)] = (1 - lang.function_rate) * lang.member_probs.reshape(-1)
    p_word[lang.function_words] = lang.function_rate * lang.function_probs
    topical = topic_of[corpus] >= 0
    known = topical.cumsum(1)[:, :-1] > 0  # a topic word among tokens 0..t-1
    target = corpus[:, 1:]
    prior = torch.where(topical[:, 1:] & ~known, 1.0 / lang.n_topics, 1.0)
    return math.exp(float(-(p_word[target] * prior).log().mean()))
