"""Text features: the sentence embedding fused with the embedding of its target phrase.

- `noun_phrase` mode (the released code): t = r * E(s) + (1 - r) * E(NP), r = 0.5.
- `context` mode (the paper's context tokens): t = gamma * E(s) + (1 - gamma) * E(N_O + N_C).

For the spatial guidance, each expression also gets the mean embedding of "a photo of <other noun>"
over the other noun phrases it names, and the GEM prompt "a photo of a <noun phrase>.".

E is CLIP's raw text embedding (no prompt template, not normalised before mixing), as in the
reference. All strings of an image's expressions go through the text encoder in one batched call,
and embeddings are cached by string, because noun phrases repeat a lot across a dataset.

A string longer than the text encoder's context (77 tokens for CLIP, start and end tokens included)
is truncated by open_clip's tokenizer: the encoder sees its first 75 tokens and the end token. This
happens with a warning, once per expression, naming the expression's start and its token count
(`check_context`). The reference's `clip.tokenize` would stop with an error instead; no RefCOCO or
PhraseCut expression is that long.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import warnings
from typing import Any

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

    def __contains__(self, text: object) -> bool:
        return text in self._store

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


# The expressions already warned about (`check_context`): once per expression string and process.
_WARNED_LONG: set[str] = set()


def token_count(tokenizer: Any, text: str) -> int | None:
    """How many tokens `text` takes in the text encoder's context (start and end tokens included), or
    None for a tokenizer this cannot count for (then nothing is checked)."""
    if getattr(tokenizer, "reduction_fn", None) is None and hasattr(tokenizer, "sot_token_id") \
            and callable(getattr(tokenizer, "encode", None)):  # open_clip's SimpleTokenizer (CLIP's BPE)
        return len(tokenizer.encode(text)) + 2
    inner, clean = getattr(tokenizer, "tokenizer", None), getattr(tokenizer, "clean_fn", None)
    if callable(inner) and callable(clean):  # open_clip's HFTokenizer
        return len(inner(clean(text))["input_ids"])
    return None


def check_context(backbone: ClipBackbone, sentence: str, texts: Sequence[str]) -> None:
    """Warn, once per expression `sentence`, when it or a string made from it (`texts`: its phrase,
    prompts) is longer than `backbone`'s text context, so that the tokenizer cuts it."""
    if sentence in _WARNED_LONG:
        return
    tokenizer = getattr(backbone, "tokenizer", None)  # a wrapped or custom backbone may have none
    context = getattr(tokenizer, "context_length", None)
    if not context:
        return
    counts = [(n, t) for t in dict.fromkeys([sentence, *texts]) if (n := token_count(tokenizer, t))]
    over = [(n, t) for n, t in counts if n > context]
    if not over:
        return
    _WARNED_LONG.add(sentence)
    n, longest = max(over, key=lambda x: x[0])
    def start(text: str) -> str:
        return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."

    what = f"has {n} tokens" if longest == sentence else f"gives the text {start(longest)} of {n} tokens"
    warnings.warn(f"expression {start(sentence)} {what}, more than the text encoder's context of {context} "
                  f"tokens ({backbone.model_name}; start and end tokens included): it is truncated, only its first "
                  f"{context - 2} word tokens are encoded.", UserWarning, stacklevel=3)


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
    for i, p in enumerate(parsed):  # only strings not encoded before: a cached one was checked then
        if p.sentence not in cache:
            own = [targets[i], *(f"a photo of {noun}" for noun in p.other_nouns)]
            check_context(backbone, p.sentence, own + ([gem_prompts[i]] if shared_gem and gem_prompts else []))
            if gem_backbone is not None and not shared_gem:
                check_context(gem_backbone, p.sentence, gem_prompts[i:i + 1])
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
