"""Text features: the sentence embedding fused with the embedding of its target phrase.

- `noun_phrase` mode (the released code): t = r * E(s) + (1 - r) * E(NP), r = 0.5.
- `context` mode (the paper's context tokens): t = gamma * E(s) + (1 - gamma) * E(N_O + N_C).

E is CLIP's raw text embedding (no prompt template, not normalised before mixing), as in the
reference. All strings of an image's expressions go through the text encoder in one batched call,
and embeddings are cached by string, because noun phrases repeat a lot across a dataset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from copatch.backbone import ClipBackbone
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


def text_features(backbone: ClipBackbone, parsed: Sequence[ParsedExpression], mode: str = "noun_phrase",
                  gamma: float = 0.5, cache: TextFeatureCache | None = None) -> torch.Tensor:
    """Fused text embeddings `[E, D] float32` for the E parsed expressions of one image."""
    cache = cache if cache is not None else TextFeatureCache()
    sentences = [p.sentence for p in parsed]
    targets = [target_text(p, mode) for p in parsed]
    emb = cache.encode(backbone, sentences + targets)
    n = len(parsed)
    return gamma * emb[:n] + (1 - gamma) * emb[n:]
