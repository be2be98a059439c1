import torch

from copatch.text.features import TextFeatureCache, encode_expressions
from copatch.text.parsing import ParsedExpression


def _parsed(sentence, np_, context=(), others=()):
    return ParsedExpression(sentence=sentence, noun_phrase=np_, target=np_, context=tuple(context),
                            head_noun=np_.split()[-1], other_nouns=tuple(others))


def text_features(backbone, parsed, mode="noun_phrase", gamma=0.5, cache=None):
    return encode_expressions(backbone, parsed, mode, gamma, cache).fused


class CountingBackbone:
    """Wraps the tiny backbone and counts text-encoder calls."""

    def __init__(self, backbone):
        self.backbone, self.calls = backbone, []

    def encode_text(self, texts):
        self.calls.append(list(texts))
        return self.backbone.encode_text(texts)


def test_noun_phrase_and_context_fusion(tiny_backbone):
    parsed = [_parsed("the man in red behind the woman", "the man", ["red", "woman"])]
    emb = tiny_backbone.encode_text
    t_np = text_features(tiny_backbone, parsed, "noun_phrase", 0.5)
    expected = 0.5 * emb(["the man in red behind the woman"]) + 0.5 * emb(["the man"])
    torch.testing.assert_close(t_np, expected)
    t_ctx = text_features(tiny_backbone, parsed, "context", 0.3)
    expected = 0.3 * emb(["the man in red behind the woman"]) + 0.7 * emb(["the man red woman"])
    torch.testing.assert_close(t_ctx, expected)


def test_one_batched_call_per_image_and_a_cache_by_string(tiny_backbone):
    counting = CountingBackbone(tiny_backbone)
    cache = TextFeatureCache()
    parsed = [_parsed("the red circle", "the red circle"), _parsed("a dog", "a dog")]
    text_features(counting, parsed, cache=cache)
    assert counting.calls == [["the red circle", "a dog"]]  # NP == sentence: each string encoded once
    text_features(counting, [_parsed("a dog left", "a dog")], cache=cache)
    assert counting.calls[-1] == ["a dog left"]


def test_cache_is_bounded(tiny_backbone):
    cache = TextFeatureCache(max_size=2)
    cache.encode(tiny_backbone, ["a", "b", "c"])
    assert len(cache) == 2


def test_negatives_and_gem_prompts_in_the_same_batched_call(tiny_backbone):
    counting = CountingBackbone(tiny_backbone)
    parsed = [_parsed("the cat left of the dog", "the cat", others=["the dog", "a hat"]), _parsed("a dog", "a dog")]
    texts = encode_expressions(counting, parsed, gem_backbone=counting)
    assert counting.calls == [["the cat left of the dog", "a dog", "the cat", "a photo of the dog",
                               "a photo of a hat", "a photo of a the cat.", "a photo of a a dog."]]
    emb = tiny_backbone.encode_text
    torch.testing.assert_close(texts.negatives[0], emb(["a photo of the dog", "a photo of a hat"]).mean(0))
    assert torch.equal(texts.negatives[1], torch.zeros(24))
    torch.testing.assert_close(texts.gem, emb(["a photo of a the cat.", "a photo of a a dog."]))
