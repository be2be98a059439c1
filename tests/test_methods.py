"""Method presets (copatch.methods): configs equal the registry, and each preset's pick on a hand-computed case."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from copatch.errors import UserValueError
from copatch.methods import METHODS, HybridGLParser, method, method_arguments, method_config
from copatch.module import CoPatch, ExpressionCues
from copatch.switches import Switches
from copatch.text.parsing import ParsedExpression

CONFIGS = Path(__file__).parents[1] / "configs" / "methods"


def test_every_config_file_equals_its_preset():
    files = {p.stem: p for p in CONFIGS.glob("*.yaml")}
    assert set(files) == set(METHODS)
    for name, path in files.items():
        assert yaml.safe_load(path.read_text()) == method_config(name), name


def test_each_preset_documents_what_it_reproduces_and_where_it_was_read():
    for m in METHODS.values():
        assert m.summary and m.reproduces and m.cannot and m.verified, m.name
    assert any("Hybridgl_main.py L57-58" in v for v in method("hybridgl").verified)
    assert any("Our_method_with_free_solo.py L65-66" in v for v in method("global_local").verified)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UserValueError, match="global_local"):
        method("hybrid")


def test_from_preset_takes_a_method():
    model = CoPatch.from_preset("demo", method="hybridgl")
    assert model.hparams.alpha == 0.6 and model.switches.box_format == "xywh"
    assert not model.switches.use_comap and model.switches.spatial_guidance
    assert isinstance(model._parser, HybridGLParser)
    # The method's switches go on top of the given ones; an argument given wins over the method's.
    model = CoPatch.from_preset("demo", method="global_local", switches=Switches.paper(), alpha=0.5)
    assert model.switches == dataclasses.replace(Switches.paper(), use_comap=False, spatial_guidance=False)
    assert model.hparams.alpha == 0.5
    assert CoPatch.from_preset("demo", method="copatch_paper").switches == Switches.paper()


# ------------------------------------------------------------------------------- hand-computed picks
# An 8 x 8 image, four proposals: the column pairs 0-1, 2-3, 4-5, 6-7. Global-local logits [2, 1, 3, 0.5]:
# g = proposal 2. The GEM heat map is hot on columns 0-1 only, so the coherence weights are 4 there and 0
# elsewhere (min-max, / mean 0.25): SC = (2 - 1.8) * 4 = 0.8 for proposal 0, -1.8 * 64 / 48 = -2.4 for the
# others. The expression names no relation and no other noun: SR_a = softmax_a(sum_{j in C} sigma_a)
# = softmax_a(|C| * sigma_a) over the candidates C. CoMap clusters (given as IoUs) best match 3, 1, 0.
LOGITS = [2.0, 1.0, 3.0, 0.5]
SC = [0.8, -2.4, -2.4, -2.4]
CLUSTER_IOU = torch.tensor([[0.0, 0.0, 0.1, 0.6], [0.0, 0.5, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0]])


def _cues():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    for i in range(4):
        masks[i, :, 2 * i:2 * i + 2] = True
    boxes = torch.tensor([[2 * i, 0, 2 * i + 1, 7] for i in range(4)])
    heat = torch.zeros(8, 8)
    heat[:, :2] = 1.0
    parsed = ParsedExpression("the red circle", "the red circle", "the red circle", (), "circle", ())
    return ExpressionCues(parsed, masks, boxes, torch.tensor(LOGITS), torch.full((4,), float("nan")), heat)


def _softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def _hand_final(candidates, alpha):
    sigma = _softmax(LOGITS)
    sr = _softmax([len(candidates) * sigma[a] for a in candidates])
    return [(1 - alpha) * r + alpha * SC[a] for r, a in zip(sr, candidates)]


@pytest.mark.parametrize("name, candidates, chosen, alpha", [
    ("global_local", [2, 0, 1], 2, None),   # the best score; top-3 kept for the oracle
    ("hybridgl", [2, 0, 1], 0, 0.6),        # top-3 by score; coherence lifts proposal 0
    ("copatch", [2, 3, 1], 2, 0.7),         # [g, b_1, b_2]: proposal 0 is not a candidate
    ("copatch_paper", [2, 3, 1, 0], 0, 0.7),  # [g, b_1, b_2, b_3]
])
def test_each_preset_picks_as_computed_by_hand(tiny_config, name, candidates, chosen, alpha):
    torch.manual_seed(0)
    args = {"alpha": 0.7, **method_arguments(name)}  # 0.7: the backbone's alpha, which hybridgl replaces
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, **args)
    cues = _cues()
    iou = CLUSTER_IOU if model.switches.use_comap else CLUSTER_IOU[:0]
    selection = model.select(cues.mask_scores, iou)
    assert selection.candidates == candidates
    picked, scores = model.pick(selection, cues)
    assert picked == chosen
    if alpha is None:
        assert scores == pytest.approx([LOGITS[a] for a in candidates])
    else:
        assert scores == pytest.approx(_hand_final(candidates, alpha), rel=1e-5, abs=1e-6)


def test_hybridgl_relation_words_are_its_own():
    spacy = pytest.importorskip("spacy")
    from copatch.text.parsing import SpacyParser

    try:
        spacy.load(SpacyParser().model)
    except OSError:
        pytest.skip("no spaCy model")
    texts = ["the circle right of the blue square", "the star between the two circles",
             "the circle left of the blue square", "the square on the right"]
    ours = SpacyParser().parse(texts)
    theirs = HybridGLParser().parse(texts)
    assert [p.relation for p in ours] == ["right", "within", "left", "right"]
    # HybridGL's `token.text == RIGHT_KEYWORDS` never holds and its WITHIN has no "between".
    assert [p.relation for p in theirs] == ["none", "none", "left", "none"]
    # Everything else, direction words included, is the same parse.
    for a, b in zip(ours, theirs):
        assert dataclasses.replace(a, relation=b.relation) == b
