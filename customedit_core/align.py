"""Token alignment between a source and a target prompt for Prompt-to-Prompt.

replace (word swap): prompts with the same number of words; unchanged words map one to
one, a swapped word's tokens share the source word's attention (mass-preserving when the
two words have different token counts). refine (added words): a global alignment of the
two token sequences (match +1, mismatch -1, gap 0); target tokens with no source partner
keep their own attention. Both map the end token onto the source's end token; after it, replace
maps the padding tails onto each other, refine maps position j to source column j (the reference's
rule for refinement).
"""
from __future__ import annotations

import torch

from .errors import InputError
from .tokens import PromptTokens


def replace_mapper(src: PromptTokens, tgt: PromptTokens) -> torch.Tensor:
    """M[L, L] with target_probs[..., n] = sum_w source_probs[..., w] * M[w, n]."""
    if len(src.words) != len(tgt.words):
        raise InputError("target_prompt", f"a replace edit needs the same number of words in both prompts, "
                                          f"but the source has {len(src.words)} ({list(src.words)}) and the "
                                          f"target {len(tgt.words)} ({list(tgt.words)}); use mode 'refine' "
                                          "for prompts that add or remove words")
    L = len(src.ids)
    m = torch.zeros(L, L)
    m[0, 0] = 1.0
    for s_span, t_span in zip(src.spans, tgt.spans):
        if len(s_span) == len(t_span):
            for s, t in zip(s_span, t_span):
                m[s, t] = 1.0
        else:
            for t in t_span:
                for s in s_span:
                    m[s, t] = 1.0 / len(t_span)
    for j, s in _tail(src, tgt):
        m[s, j] = 1.0
    return m


def refine_mapper(src: PromptTokens, tgt: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(index[L], alpha[L]): target position j takes source column index[j] where alpha[j] = 1."""
    a = src.ids[1:src.length - 1]
    b = tgt.ids[1:tgt.length - 1]
    pairs = _global_align(a, b)
    L = len(tgt.ids)
    index = torch.zeros(L, dtype=torch.long)
    alpha = torch.zeros(L)
    index[0], alpha[0] = 0, 1.0
    for i, j in pairs:
        index[j + 1], alpha[j + 1] = i + 1, 1.0
    # the end token onto the source's end token; past it, position j takes source column j, as the
    # reference's seq_aligner.get_mapper does (not shifted by the number of inserted tokens)
    index[tgt.length - 1], alpha[tgt.length - 1] = src.length - 1, 1.0
    index[tgt.length:] = torch.arange(tgt.length, L)
    alpha[tgt.length:] = 1.0
    return index, alpha


def _tail(src: PromptTokens, tgt: PromptTokens):
    """(target position, source position) for the end token and the padding after it."""
    L = len(tgt.ids)
    for j in range(tgt.length - 1, L):
        yield j, min(src.length - 1 + (j - (tgt.length - 1)), L - 1)


def _global_align(a, b):
    """Needleman-Wunsch with match +1, mismatch -1, gap 0; returns matched index pairs."""
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if a[i - 1] == b[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:  # a mismatch on the diagonal (never better than two gaps, kept for completeness)
            i, j = i - 1, j - 1
    return list(reversed(pairs))
