"""The SigLIP path (timm vision towers behind open_clip) and the presets of the paper's version 2.

Everything runs offline on random weights: the tiny `copatch-tiny-siglip` config (SigLIP's layout at
width 32), a tiny HF tokenizer written by the test, and, in the slow tests, the real preset
architectures with random checkpoints written by the test.
"""

import dataclasses
import gc
import os
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
import yaml

from copatch.backbone import ClipBackbone
from copatch.clip_model import CheckpointError
from copatch.demo.dataset import demo_image
from copatch.hooks import capture_block_outputs, mask_patch_tokens
from copatch.image_features import image_features
from copatch.module import CoPatch
from copatch.presets import PRESETS
from copatch.siglip import TokenizerMissing, load_tokenizer, pixel_masked_embeddings
from copatch.switches import Switches

CONFIGS = Path(__file__).parents[1] / "configs"
V2_PRESETS = ["vith14_dfn", "siglip_b16", "siglip2_b16"]
# Expressions of the authors' multilingual RefCOCO files (assets/multilingual_meta_data): en, de, fr,
# es, ko, cn, ru.
MULTILINGUAL = ["man in black coat", "Mann in schwarzem Mantel", "Homme en manteau noir",
                "hombre con chaqueta negra", "검은 코트 남자", "身着黑色外套的男子", "мужчина в черном пальто"]


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(0)
    return ClipBackbone("copatch-tiny-siglip")


def _embed(trunk, x):
    """The timm ViT's own token embedding, written out (patch embedding, positions, pre-norm)."""
    tokens = trunk.patch_embed(x)
    tokens = trunk._pos_embed(tokens)
    return trunk.norm_pre(trunk.patch_drop(tokens))


def _manual_block_output(trunk, x, layer):
    tokens = _embed(trunk, x)
    for block in trunk.blocks[: layer + 1]:
        tokens = block(tokens)
    return tokens


def _layer_norm(x, ln):
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    return normed * ln.weight + ln.bias


def write_tokenizer(folder: Path) -> Path:
    """A tiny byte-level BPE tokenizer in HF format (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(MULTILINGUAL * 4 + ["a photo of a red circle", "the blue square on the left"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------- hooks
def test_geometry_of_the_tiny_siglip(siglip):
    assert siglip.is_timm and (siglip.input_size, siglip.grid, siglip.prefix_tokens) == (224, 14, 0)
    assert (siglip.num_blocks, siglip.embed_dim) == (12, 32)
    assert siglip.weight_dtype == torch.float32
    assert siglip.model.visual.trunk.attn_pool is not None  # the MAP head, no class token


@pytest.mark.parametrize("layer", [0, 5, 8, 11])
def test_hooked_tokens_equal_timm_forward_intermediates_and_a_manual_loop(siglip, layer):
    trunk = siglip.model.visual.trunk
    x = torch.randn(2, 3, 224, 224)
    with capture_block_outputs(siglip.blocks, [layer]) as captured:
        siglip.model.visual(x)
    ref = trunk.forward_intermediates(x, indices=[layer], intermediates_only=True, output_fmt="NLC")
    assert captured[layer].shape == (2, 196, 32)
    assert torch.equal(captured[layer], ref[0])
    torch.testing.assert_close(captured[layer], _manual_block_output(trunk, x, layer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("negate", [True, False])
def test_norm_patch_features_equal_a_manual_forward(siglip, negate):
    """The authors' SigLIP `ours_local`: blocks 0..l, then trunk.norm(-x) over every token."""
    trunk = siglip.model.visual.trunk
    x = torch.randn(2, 3, 224, 224)
    tokens = _manual_block_output(trunk, x, 8)
    expected = _layer_norm(-tokens if negate else tokens, trunk.norm)
    got = siglip.patch_features(x, 8, negate=negate)
    assert got.shape == (2, 196, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pool_patch_features_run_each_token_alone_through_the_attention_pool(siglip):
    """With one key, the MAP attention's softmax is 1: out = proj(W_v t + b_v), then + mlp(norm(.))."""
    visual = siglip.model.visual
    trunk, pool = visual.trunk, visual.trunk.attn_pool
    x = torch.randn(1, 3, 224, 224)
    t = _layer_norm(-_manual_block_output(trunk, x, 8), trunk.norm)             # [1, 196, 32]
    width = t.shape[-1]
    v = t @ pool.kv.weight[width:].T + pool.kv.bias[width:]                       # the value half of kv
    y = pool.proj(v)
    y = y + pool.mlp(_layer_norm(y, pool.norm))
    expected = visual.head(trunk.head(trunk.fc_norm(y)))
    got = siglip.patch_features(x, 8, head="pool")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it is what the tower's own pooled forward gives for a one-token image
    single = visual.head(trunk.forward_head(t[:, :1]))
    torch.testing.assert_close(got[:, 0], single, rtol=1e-5, atol=1e-5)


def test_token_masking_scales_every_token_as_the_authors_siglip_loop(siglip):
    """No class token: from `start` on, all tokens x mask before each block; then norm, MAP head, head."""
    visual = siglip.model.visual
    trunk = visual.trunk
    x = torch.randn(1, 3, 224, 224)
    weights = torch.rand(3, 196)
    start = 9
    with mask_patch_tokens(siglip.blocks, start, weights, prefix_tokens=0):
        hooked = siglip.encode_image(x)
    tokens = _manual_block_output(trunk, x, start - 1)
    manual = []
    for w in weights:
        t = tokens.clone()
        for block in trunk.blocks[start:]:
            t = block(t * w[None, :, None])
        manual.append(visual.head(trunk.forward_head(trunk.norm(t))))
    torch.testing.assert_close(hooked, torch.cat(manual), rtol=1e-5, atol=1e-5)


def test_pixel_masked_embeddings_are_the_image_times_the_bool_resized_mask(siglip):
    pixels = torch.randn(1, 3, 224, 224)
    masks = torch.zeros(2, 100, 150, dtype=torch.bool)
    masks[0, 10:40, 20:90] = True
    masks[1, 60:61, 0:1] = True  # one pixel: still a block of the 224 px mask after the bool resize
    got = pixel_masked_embeddings(siglip.encode_image, pixels, masks)
    resized = TF.resize(masks, [224, 224])
    assert resized.dtype == torch.bool and resized[1].any()
    expected = siglip.encode_image(pixels * resized[:, None].float())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("global_mode", ["pixels", "tokens"])
def test_image_features_take_the_siglip_paths(siglip, global_mode):
    _, image, _, _, proposals = demo_image(seed=1, index=0)
    image = torch.from_numpy(image).permute(2, 0, 1)
    masks = torch.from_numpy(proposals).bool()
    switches = dataclasses.replace(Switches(), siglip_global=global_mode)
    feats = image_features(siglip, image, masks, switches, exit_layer=8, visual_mix=1.0)
    assert feats.mask_embeddings.shape == (len(masks), 32) and feats.patch_embeddings.shape == (196, 32)
    resized = TF.resize(TF.normalize(image.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                        [224, 224], antialias=True)[None]
    torch.testing.assert_close(feats.patch_embeddings, siglip.patch_features(resized, 8)[0], rtol=1e-5, atol=1e-5)
    if global_mode == "pixels":
        expected = pixel_masked_embeddings(siglip.encode_image, resized, masks)
    else:
        weights = TF.resize(masks[:, None].float(), [14, 14], antialias=True).flatten(1)
        with mask_patch_tokens(siglip.blocks, 9, weights, prefix_tokens=0):
            expected = siglip.encode_image(resized)
    torch.testing.assert_close(feats.mask_embeddings, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CoPatch
def _tiny_copatch(**kw):
    torch.manual_seed(0)
    return CoPatch(clip_model="copatch-tiny-siglip", gem_model="copatch-tiny", gem_depth=3, gem_size=128, **kw)


@pytest.mark.parametrize("switches", [Switches(), dataclasses.replace(Switches(), siglip_global="tokens",
                                                                        siglip_patch_head="pool")])
def test_tiny_siglip_segments_a_demo_scene(switches):
    model = _tiny_copatch(switches=switches)
    _, image, _, chosen, proposals = demo_image(seed=1, index=0)
    texts = [c.text for c in chosen[:2]]
    out = model.segment(image, texts, proposals=proposals)
    assert [p.text for p in out] == texts
    for p in out:
        assert p.mask.shape == image.shape[:2] and p.chosen in p.candidates
        assert torch.equal(p.mask, torch.from_numpy(proposals[p.chosen]))
        assert p.clusters.shape[-2:] == (14, 14)


def test_gem_on_a_siglip_tower_is_refused_with_the_fix():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="gem_model=.*ViT-B-16-quickgelu"):
        CoPatch(clip_model="copatch-tiny-siglip")
    CoPatch(clip_model="copatch-tiny-siglip", switches=dataclasses.replace(Switches(), spatial_guidance=False))


def test_multilingual_expressions_through_a_local_tokenizer_folder(tmp_path):
    folder = write_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer("copatch-tiny-siglip", None, str(folder))
    ids = tokenizer(MULTILINGUAL)
    assert ids.shape == (len(MULTILINGUAL), 64)  # padded to the config's context, as SigLIP's max_length=64
    assert len({tuple(row.tolist()) for row in ids}) == len(MULTILINGUAL)
    torch.manual_seed(0)
    backbone = ClipBackbone("copatch-tiny-siglip", tokenizer=str(folder))
    emb = backbone.encode_text(MULTILINGUAL)
    assert emb.shape == (len(MULTILINGUAL), 32) and torch.isfinite(emb).all()


def test_tokenizer_next_to_the_checkpoint_is_used_and_a_missing_one_is_named(tmp_path, siglip):
    ckpt = tmp_path / "siglip" / "open_clip_model.pt"
    ckpt.parent.mkdir()
    torch.save(siglip.model.state_dict(), ckpt)
    # the tiny config reads CLIP's BPE; with a folder given explicitly the HF tokenizer is used
    assert type(ClipBackbone("copatch-tiny-siglip", str(ckpt)).tokenizer).__name__ == "SimpleTokenizer"
    with pytest.raises(TokenizerMissing, match="nope.*tokenizer.json"):
        ClipBackbone("copatch-tiny-siglip", str(ckpt), tokenizer=str(tmp_path / "nope"))
    # a config with hf_tokenizer_name (SigLIP) finds its tokenizer next to the weights, or says what to fetch
    with pytest.raises(TokenizerMissing) as err:
        load_tokenizer("ViT-B-16-SigLIP", str(ckpt))
    assert "timm/ViT-B-16-SigLIP" in str(err.value) and "hf download timm/ViT-B-16-SigLIP" in str(err.value)
    write_tokenizer(ckpt.parent)
    tok = load_tokenizer("ViT-B-16-SigLIP2-384", str(ckpt))
    assert type(tok).__name__ == "HFTokenizer" and tok(["검은 코트 남자"]).shape == (1, 64)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, siglip, tiny_backbone, tiny_config):
    clip_ckpt = tmp_path / "clip.pt"
    torch.save(tiny_backbone.model.state_dict(), clip_ckpt)
    with pytest.raises(CheckpointError, match="does not fit the open_clip config 'copatch-tiny-siglip'"):
        ClipBackbone("copatch-tiny-siglip", str(clip_ckpt))
    siglip_ckpt = tmp_path / "siglip.pt"
    torch.save(siglip.model.state_dict(), siglip_ckpt)
    with pytest.raises(CheckpointError, match="does not fit"):
        ClipBackbone(model_config=tiny_config, pretrained=str(siglip_ckpt))
    loaded = ClipBackbone("copatch-tiny-siglip", str(siglip_ckpt))
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.encode_image(x), siglip.encode_image(x))


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", V2_PRESETS)
def test_v2_presets_equal_the_cli_configs(name):
    config = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())["model"]
    assert config == PRESETS[name]


def test_missing_v2_weights_print_the_fetch_command(tmp_path):
    from copatch.downloads import DOWNLOADS

    for name, key in [("vith14_dfn", "clip-vith14-dfn"), ("siglip_b16", "siglip-b16"),
                      ("siglip2_b16", "siglip2-b16-384")]:
        with pytest.raises(CheckpointError) as err:
            CoPatch.from_preset(name, clip_checkpoint=PRESETS[name]["clip_pretrained"])
        assert DOWNLOADS[key].command in str(err.value)


# DFN ViT-H/14 is a 1B-parameter model: about 6 min and 8.5 GB of memory on two CPU cores, so it runs
# only with COPATCH_LARGE_TESTS=1.
LARGE = pytest.mark.skipif(not os.environ.get("COPATCH_LARGE_TESTS"),
                           reason="ViT-H/14 (1B parameters, ~6 min on 2 CPU cores): set COPATCH_LARGE_TESTS=1")


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("vith14_dfn", marks=LARGE), "siglip_b16", "siglip2_b16"])
def test_v2_preset_loads_a_checkpoint_of_its_architecture_and_segments(name, tmp_path):
    """The real architecture with random weights written here; GEM's ViT-B/16 random (no file)."""
    import open_clip

    model_name = PRESETS[name]["clip_model"]
    folder = tmp_path / name
    folder.mkdir()
    ckpt = folder / ("open_clip_model.safetensors" if "siglip" in name else "weights.bin")
    torch.manual_seed(0)
    random_model = open_clip.create_model(model_name)
    if ckpt.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in random_model.state_dict().items()}, str(ckpt))
        write_tokenizer(folder)
    else:
        torch.save(random_model.state_dict(), ckpt)
    probe = torch.randn(1, 3, *random_model.visual.image_size)
    with torch.no_grad():
        expected = random_model.encode_image(probe)
    del random_model
    gc.collect()

    model = CoPatch.from_preset(name, clip_checkpoint=str(ckpt), gem_pretrained=None, gem_size=224)
    backbone = model.backbone
    torch.testing.assert_close(backbone.encode_image(probe), expected, rtol=1e-4, atol=1e-4)
    assert backbone.is_timm == ("siglip" in name)
    assert backbone.grid == {"vith14_dfn": 16, "siglip_b16": 14, "siglip2_b16": 24}[name]
    _, image, _, chosen, proposals = demo_image(seed=1, index=0)
    texts = [chosen[0].text] + (MULTILINGUAL[3:5] if name == "siglip2_b16" else [])
    out = model.segment(image, texts, proposals=proposals[:6])
    assert [p.text for p in out] == texts
    for p in out:
        assert p.mask.shape == image.shape[:2] and p.chosen in p.candidates
        assert p.clusters.shape[-2:] == (backbone.grid, backbone.grid)


@pytest.mark.parametrize("name", V2_PRESETS)
def test_v2_configs_compose_with_the_paper_preset(name, capsys):
    from copatch.cli import main

    try:
        main(["predict", "--config", str(CONFIGS / "model" / f"{name}.yaml"), "--config",
              str(CONFIGS / "data" / "refcoco.yaml"), "--config", str(CONFIGS / "presets" / "paper.yaml"),
              "--print_config"])
    except SystemExit as done:
        assert done.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)["model"]
    assert config["clip_model"] == PRESETS[name]["clip_model"]
    assert (config["switches"]["siglip_global"], config["switches"]["siglip_patch_head"]) == ("tokens", "pool")
