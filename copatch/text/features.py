"""Text features: the sentence embedding fused with the embedding of its target phrase.

- `noun_phrase` mode (the released code): t = r * E(s) + (1 - r) * E(NP), r = 0.5.
- `context` mode (the paper's context tokens): t = gamma * E(s) + (1 - gamma) * E(N_O + N_C).

For the spatial guidance, each expression also gets the mean embedding of "a photo of <other noun>"
over the other noun phrases it names, and the GEM prompt "a photo of a <noun phrase>.".

E is CLIP's raw text embedding (no prompt template, not normalised before mixing), as in the
reference. All strings of an image's expressions go through the text encoder in one batched call,
and embeddings are cached by string, because noun phrases repeat a lot across a dataset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from copatch.backbone import ClipBackbone
from copatch.gem import gem_text_prompt
from copatch.text.parsing import ParsedExpression


class TextFeatureCache:
    """An LRU cache of raw text embeddings keyed by string, filled by batched encoder calls."""

    def __init__(self, max_size: int = 65536) -> None:
        self.max_size = max_size
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def encode(self, backbone: ClipBackbone, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> `[T, D] float32`, encoding only the strings not seen before, in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        if missing:
            for text, emb in zip(missing, backbone.encode_text(missing).float()):
                self._store[text] = emb
        out = []
        for text in texts:
            self._store.move_to_end(text)
            out.append(self._store[text])
        while len(self._store) > self.max_size:
            self._store.popitem(last=False)
        return torch.stack(out)


def target_text(parsed: ParsedExpression, mode: str) -> str:
    """The phrase fused with the sentence: the noun phrase, or N_O followed by the context tokens."""
    if mode == "noun_phrase":
        return parsed.noun_phrase
    if mode == "context":
        return parsed.context_phrase
    raise ValueError(f"unknown text_features mode {mode!r}: use 'noun_phrase' or 'context'")


@dataclass
class ExpressionTexts:
    """Text embeddings of one image's E expressions.

    Attributes:
        fused: `[E, D]` gamma * E(s) + (1 - gamma) * E(phrase), for the mask and patch scores.
        negatives: `[E, D]` mean of E("a photo of <other noun>"), zeros when the expression names none.
        gem: `[E, D']` E("a photo of a <noun phrase>.") in the GEM model's space, or None.
    """

    fused: torch.Tensor
    negatives: torch.Tensor
    gem: torch.Tensor | None = None


def encode_expressions(backbone: ClipBackbone, parsed: Sequence[ParsedExpression], mode: str = "noun_phrase",
                       gamma: float = 0.5, cache: TextFeatureCache | None = None,
                       gem_backbone: ClipBackbone | None = None, gem_cache: TextFeatureCache | None = None
                       ) -> ExpressionTexts:
    """All text embeddings of one image's expressions.

    Every string (sentences, phrases, other-noun and GEM prompts) goes through the text encoder in one
    batched call per encoder, and only the strings the cache has not seen.
    """
    cache = cache if cache is not None else TextFeatureCache()
    n = len(parsed)
    sentences = [p.sentence for p in parsed]
    targets = [target_text(p, mode) for p in parsed]
    negatives = [f"a photo of {noun}" for p in parsed for noun in p.other_nouns]
    gem_prompts = [gem_text_prompt(p.noun_phrase) for p in parsed] if gem_backbone is not None else []
    shared_gem = gem_backbone is backbone
    emb = cache.encode(backbone, sentences + targets + negatives + (gem_prompts if shared_gem else []))
    fused = gamma * emb[:n] + (1 - gamma) * emb[n:2 * n]
    neg_emb = emb[2 * n:2 * n + len(negatives)]
    neg_rows, start = [], 0
    for p in parsed:
        k = len(p.other_nouns)
        neg_rows.append(neg_emb[start:start + k].mean(0) if k else fused.new_zeros(fused.shape[-1]))
        start += k
    gem = None
    if gem_backbone is not None:
        gem = emb[2 * n + len(negatives):] if shared_gem else \
            (gem_cache if gem_cache is not None else TextFeatureCache()).encode(gem_backbone, gem_prompts)
    return ExpressionTexts(fused, torch.stack(neg_rows) if n else fused.new_zeros(0, fused.shape[-1]), gem)
