"""Tests for copatch.text.parsing: the spaCy rule on the real small model, the stanza rule on
hand-built constituency trees (no stanza models are needed)."""

from __future__ import annotations

import pytest

from copatch.text.parsing import (
    RELATION_WORDS,
    ExpressionParser,
    ParsedExpression,
    ParserUnavailableError,
    SpacyParser,
    StanzaParser,
    build_parser,
    parse_stanza_document,
    parse_stanza_words,
)

spacy = pytest.importorskip("spacy")
stanza = pytest.importorskip("stanza")
from stanza.models.common.doc import Document  # noqa: E402
from stanza.models.constituency.parse_tree import Tree  # noqa: E402

CONTEXT_POS = {"NOUN", "PROPN", "ADJ", "NUM"}


# ------------------------------------------------------------------------------------ spaCy
def _expected_from_doc(doc) -> tuple[str, str, tuple[str, ...]]:
    """Independent re-derivation of the reference rule: via dep_ labels and token-index sets."""
    root = [t for t in doc if t.dep_ == "ROOT"][0]
    chunk_of = {t.i: c for c in doc.noun_chunks for t in c}
    children = list(root.lefts) + list(root.rights)
    chunk = chunk_of.get(root.i) or (chunk_of.get(children[0].i) if children else None)
    if chunk is None:  # the reference returns the whole sentence as the NP and as the head noun
        return doc.text, doc.text, ()
    ctx = tuple(t.text for t in doc if t.i >= chunk.end and t.pos_ in CONTEXT_POS)
    return chunk.text, chunk.root.text, ctx


EXPRESSIONS = [
    "the man in red behind the woman",
    "Man's hat on the LEFT",
    "top-left giraffe",
    "giraffe",
    "man standing on left",  # root 'left' is outside any chunk; its first child 'man' is in one
    "on the left",  # root 'on' and its first child 'left' are outside chunks: whole sentence
    "guy  in  white   shirt",
]


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_spacy_matches_independent_derivation(spacy_parser, text):
    (parsed,) = spacy_parser.parse([text])
    doc = spacy_parser._load()(parsed.sentence)  # the helpers see the re-joined sentence
    noun_phrase, head, context = _expected_from_doc(doc)
    assert parsed.noun_phrase == parsed.target == noun_phrase
    assert parsed.head_noun == head
    assert parsed.context == context
    assert parsed.context_phrase == " ".join([noun_phrase, *context])
    other = tuple(
        c.text for c in doc.noun_chunks if c.text != noun_phrase and c.root.text not in RELATION_WORDS
    )
    assert parsed.other_nouns == other


def test_spacy_hand_checked(spacy_parser):
    out = spacy_parser.parse(EXPRESSIONS)
    man, hat, giraffe_tl, giraffe, standing, on_left, guy = out
    assert man == ParsedExpression(
        sentence="the man in red behind the woman", noun_phrase="the man", target="the man",
        context=("red", "woman"), head_noun="man", other_nouns=("red", "the woman"),
        other_roots=("red", "woman"), relation="up", direction="none",  # "behind" is an UP keyword
    )
    assert man.context_phrase == "the man red woman"
    assert hat.sentence == "man 's hat on the left"
    assert (hat.target, hat.head_noun, hat.context) == ("man 's hat", "hat", ("left",))
    assert giraffe_tl.sentence == "top - left giraffe"
    assert giraffe_tl.head_noun == "giraffe" and giraffe_tl.context == ()
    assert (giraffe.sentence, giraffe.target, giraffe.head_noun) == ("giraffe",) * 3
    assert (standing.target, standing.context) == ("man", ("left",))  # first-child rule
    assert (on_left.target, on_left.head_noun, on_left.context) == ("on the left", "on the left", ())
    # Only tokens that are exactly " " are dropped: the 3-space run leaves the token "  " in the join.
    assert guy.sentence == "guy in white    shirt"


@pytest.mark.parametrize("text, joined", [
    ("man   left", "man    left"),  # spaCy: "man", "  ", "left"; the "  " token stays
    ("man\tleft", "man \t left"),  # a tab is its own token and stays
    ("man \t left", "man \t  left"),  # "man" (trailing space), "\t ", "left"
    ("man\n\nleft", "man \n\n left"),
    ("the  man", "the man"),  # a two-space gap: one token " ", dropped
    (" the man ", "the man"),  # a leading " " token is dropped, the trailing space is not a token
])
def test_spacy_drops_only_single_space_tokens(spacy_parser, text, joined):
    (parsed,) = spacy_parser.parse([text])
    assert parsed.sentence == joined
    # Every other helper parses that joined string: the parse is the one of `joined` itself.
    doc = spacy_parser._load()(joined)
    assert parsed.noun_phrase == _expected_from_doc(doc)[0]


def test_spacy_fallback_head_noun_is_the_sentence(spacy_parser):
    # "on the left": the root "on" and its first child "left" are in no noun chunk.
    doc = spacy_parser._load()("on the left")
    root = next(t for t in doc if t.head.i == t.i)
    chunk_tokens = {t.i for c in doc.noun_chunks for t in c}
    assert root.i not in chunk_tokens and next(root.children).i not in chunk_tokens
    (p,) = spacy_parser.parse(["On the left"])
    assert p.noun_phrase == p.target == p.head_noun == "on the left"
    assert p.context == ()


def test_spacy_other_nouns_drop_np_text_and_relation_roots(spacy_parser):
    (p,) = spacy_parser.parse(["the zebra to the left of the zebra"])
    assert p.target == "the zebra"
    assert p.other_nouns == ()  # "the left": relation root; "the zebra": same text as the NP


def test_spacy_two_batched_pipe_passes(spacy_parser, monkeypatch):
    nlp = spacy_parser._load()
    calls = []
    real_pipe = nlp.pipe

    def spy(texts, **kwargs):
        texts = list(texts)
        calls.append(texts)
        return real_pipe(texts, **kwargs)

    monkeypatch.setattr(nlp, "pipe", spy)
    spacy_parser.parse(["A Dog", "top-left cat", "man"])
    assert calls == [["a dog", "top-left cat", "man"], ["a dog", "top - left cat", "man"]]


def test_spacy_missing_model():
    with pytest.raises(ParserUnavailableError, match="no_such_model_xyz") as info:
        SpacyParser(model="no_such_model_xyz").parse(["a dog"])
    assert 'pip install "copatch[spacy]"' in str(info.value) and "`model`" in str(info.value)


# ----------------------------------------------------------------------------------- stanza
def T(label: str, *children) -> Tree:
    """Tree from nested calls; a str child of a preterminal becomes its leaf."""
    return Tree(label=label, children=[Tree(c) if isinstance(c, str) else c for c in children])


def make_doc(words: list[str], upos: list[str], tree: Tree) -> Document:
    doc = Document([[{"id": i + 1, "text": w, "upos": u} for i, (w, u) in enumerate(zip(words, upos))]])
    doc.sentences[0].constituency = tree
    return doc


MAN_IN_RED = (
    "the man in red behind the woman".split(),
    ["DET", "NOUN", "ADP", "ADJ", "ADP", "DET", "NOUN"],
    T("ROOT", T("NP",
        T("NP", T("DT", "the"), T("NN", "man")),
        T("PP", T("IN", "in"), T("NP", T("NN", "red"))),
        T("PP", T("IN", "behind"), T("NP", T("DT", "the"), T("NN", "woman"))))),
)


def test_stanza_flat_np():
    p = parse_stanza_words(["The", "man"], ["DET", "NOUN"], T("ROOT", T("NP", T("DT", "the"), T("NN", "man"))))
    assert p == ParsedExpression("the man", "the man", "the man", (), "man", ())


def test_stanza_lowest_left_np_wins():
    p = parse_stanza_words(*MAN_IN_RED)
    assert (p.head_noun, p.target, p.context) == ("man", "the man", ("red", "woman"))
    assert p.noun_phrase == p.target and p.other_nouns == ("red", "the woman")
    # The top NP's rightmost NN would be 'hat'; the lowest NP inside the possessive gives 'cat'.
    words, upos = "the cat 's hat".split(), ["DET", "NOUN", "PART", "NOUN"]
    tree = T("ROOT", T("NP", T("NP", T("DT", "the"), T("NN", "cat"), T("POS", "'s")), T("NN", "hat")))
    p = parse_stanza_words(words, upos, tree)
    assert (p.head_noun, p.target, p.context) == ("cat", "the cat", ("hat",))


def test_stanza_skips_lowest_np_without_nn():
    # 'dogs' is NNS, so DFS moves on to the next lowest NP: its NN 'left' (no relation filter here).
    words, upos = "two dogs on the left".split(), ["NUM", "NOUN", "ADP", "DET", "NOUN"]
    tree = T("ROOT", T("NP", T("NP", T("CD", "two"), T("NNS", "dogs")),
                     T("PP", T("IN", "on"), T("NP", T("DT", "the"), T("NN", "left")))))
    p = parse_stanza_words(words, upos, tree)
    assert (p.head_noun, p.target, p.context) == ("left", "two dogs on the left", ())


def test_stanza_nns_only_falls_back_to_upos():
    words, upos = "the two dogs on left".split(), ["DET", "NUM", "NOUN", "ADP", "NOUN"]
    tree = T("ROOT", T("NP", T("NP", T("DT", "the"), T("CD", "two"), T("NNS", "dogs")),
                     T("PP", T("IN", "on"), T("NP", T("JJ", "left")))))
    p = parse_stanza_words(words, upos, tree)  # last NOUN 'left' is a relation word: skipped
    assert (p.head_noun, p.target, p.context) == ("dogs", "the two dogs", ("left",))
    assert p.other_nouns == ()  # 'the two dogs' is the target; the NP 'left' is a relation word


def test_stanza_unk_when_no_noun():
    words, upos = "on the left".split(), ["ADP", "DET", "ADJ"]
    tree = T("ROOT", T("PP", T("IN", "on"), T("NP", T("DT", "the"), T("JJ", "left"))))
    p = parse_stanza_words(words, upos, tree)
    assert (p.head_noun, p.target, p.context, p.other_nouns) == ("[UNK]", "on the left", (), ())


def test_stanza_prefix_through_last_occurrence():
    words = "the man next to the man in blue".split()
    upos = ["DET", "NOUN", "ADJ", "ADP", "DET", "NOUN", "ADP", "ADJ"]
    second = T("NP", T("NP", T("DT", "the"), T("NN", "man")), T("PP", T("IN", "in"), T("NP", T("NN", "blue"))))
    next_to = T("ADJP", T("JJ", "next"), T("PP", T("TO", "to"), second))
    tree = T("ROOT", T("NP", T("NP", T("DT", "the"), T("NN", "man")), next_to))
    p = parse_stanza_words(words, upos, tree)
    assert (p.head_noun, p.target, p.context) == ("man", "the man next to the man", ("blue",))
    assert p.context_phrase == "the man next to the man blue"


class FakePipeline:
    """Stands in for stanza.Pipeline's bulk mode: list of Documents in, list out."""

    def __init__(self, docs: dict[str, Document]) -> None:
        self.docs, self.calls = docs, []

    def __call__(self, inputs):
        self.calls.append([d.text for d in inputs])
        return [self.docs[d.text] for d in inputs]


def test_stanza_parser_with_injected_pipeline():
    man = make_doc(*MAN_IN_RED)
    fake = FakePipeline({"the man in red behind the woman": man})
    parser = StanzaParser(pipeline=fake)
    assert isinstance(parser, ExpressionParser)
    (p,) = parser.parse(["The Man in red behind the woman"])
    assert fake.calls == [["the man in red behind the woman"]]  # lowercased, one bulk call
    assert p == parse_stanza_document(man) == parse_stanza_words(*MAN_IN_RED)
    assert p.sentence == "the man in red behind the woman"


def test_stanza_missing_resources(tmp_path):
    with pytest.raises(ParserUnavailableError) as info:
        StanzaParser(resources_dir=str(tmp_path)).parse(["a dog"])
    assert str(tmp_path) in str(info.value) and "stanza.download" in str(info.value)


def test_stanza_missing_resources_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STANZA_RESOURCES_DIR", str(tmp_path / "env"))
    with pytest.raises(ParserUnavailableError, match="STANZA_RESOURCES_DIR") as info:
        StanzaParser().parse(["a dog"])
    assert str(tmp_path / "env") in str(info.value)


# ------------------------------------------------------------------------------------ shared
@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
@pytest.mark.parametrize("make", [lambda: SpacyParser(), lambda: StanzaParser(resources_dir="/nonexistent")])
def test_empty_expression_raises(make, text):
    # Raised before any model is loaded (the stanza dir does not exist).
    with pytest.raises(ValueError, match="at least one word") as info:
        make().parse(["a dog", text])
    assert repr(text) in str(info.value)


def test_build_parser():
    assert isinstance(build_parser("spacy", batch_size=8), SpacyParser)
    assert isinstance(build_parser("stanza", use_gpu=False), StanzaParser)
    with pytest.raises(ValueError, match="Unknown parser"):
        build_parser("nltk")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, relation, direction",
    [
        ("the cat to the left of the dog", "left", "left"),
        ("person in between", "within", "middle"),  # "between" is WITHIN and a middle direction word
        ("the bigger of the two elephants", "big", "none"),
        ("giraffe", "none", "none"),
        # Another noun "side"/"picture" (NULL keywords): no relation, but the direction stays.
        ("zebra on the right side of the picture", "none", "right"),
    ],
)
def test_spacy_relation_and_direction_words(spacy_parser, text, relation, direction):
    (p,) = spacy_parser.parse([text])
    assert (p.relation, p.direction) == (relation, direction)


def test_keyword_with_the_earliest_head_wins(spacy_parser):
    from copatch.text.parsing import RELATION_GROUPS, keyword_by_head

    doc = spacy_parser._load()("the man behind the car on the left")
    heads = {t.text: t.head.i for t in doc if t.text in ("behind", "left")}
    expected = "up" if heads["behind"] <= heads["left"] else "left"  # a tie keeps the earlier word
    assert keyword_by_head(doc, RELATION_GROUPS) == expected


def test_stanza_parser_takes_its_spatial_cues_from_spacy(spacy_parser):
    man = make_doc(*MAN_IN_RED)
    parser = StanzaParser(pipeline=FakePipeline({"the man in red behind the woman": man}), spatial=spacy_parser)
    (p,) = parser.parse(["the man in red behind the woman"])
    (sp,) = spacy_parser.parse(["the man in red behind the woman"])
    assert (p.target, p.context) == ("the man", ("red", "woman"))  # N_O, N_C from the constituency rule
    assert (p.relation, p.direction, p.other_nouns, p.other_roots) == \
        (sp.relation, sp.direction, sp.other_nouns, sp.other_roots) == ("up", "none", ("red", "the woman"),
                                                                        ("red", "woman"))
