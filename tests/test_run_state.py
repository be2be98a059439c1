"""`copatch.run_state.model_fingerprint`: knobs added later are out of the fingerprint at their old
behaviour, so a run written before them still resumes; at any other value they are in it."""

from __future__ import annotations

import dataclasses

from copatch.module import CoPatch
from copatch.run_state import LATER_HPARAM_DEFAULTS, LATER_SWITCH_DEFAULTS


def tiny(config: str, **kwargs) -> CoPatch:
    return CoPatch(clip_config=config, exit_layer=1, gem_depth=3, gem_size=128, **kwargs)


def test_later_knobs_at_their_defaults_leave_the_fingerprint_as_before(tiny_config):
    model = tiny(tiny_config)
    fingerprint = model.fingerprint()
    assert not set(LATER_HPARAM_DEFAULTS) & set(fingerprint["hparams"])
    assert not set(LATER_SWITCH_DEFAULTS) & set(fingerprint["hparams"]["switches"])
    # The defaults of the code are the values listed (so "left out" means "as before").
    assert {k: model.hparams[k] for k in LATER_HPARAM_DEFAULTS} == LATER_HPARAM_DEFAULTS
    assert {k: getattr(model.switches, k) for k in LATER_SWITCH_DEFAULTS} == LATER_SWITCH_DEFAULTS


def test_later_knobs_set_otherwise_are_in_the_fingerprint(tiny_config):
    base = tiny(tiny_config).fingerprint()
    reduced = tiny(tiny_config, max_side=32).fingerprint()
    assert reduced["hparams"]["max_side"] == 32 and reduced != base
    switches = dataclasses.replace(tiny(tiny_config).switches, siglip_patch_head="pool")
    pooled = tiny(tiny_config, switches=switches).fingerprint()
    assert pooled["hparams"]["switches"]["siglip_patch_head"] == "pool"
