import pytest
import torch

from copatch.backbone import ClipBackbone
from copatch.clip_model import CheckpointError, create_clip


def test_missing_checkpoint_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "weights" / "vitb16-openai.bin"
    with pytest.raises(CheckpointError) as err:
        create_clip("ViT-B-16-quickgelu", str(missing))
    assert str(missing) in str(err.value) and "clip_pretrained" in str(err.value)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_config):
    other = ClipBackbone("copatch-tiny").model  # width 32, 12 blocks; the fixture config is width 24
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        ClipBackbone(model_config=tiny_config, pretrained=str(path))
    assert str(path) in str(err.value) and "does not fit" in str(err.value)


def test_local_checkpoint_round_trip(tmp_path, tiny_backbone, tiny_config):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    loaded = ClipBackbone(model_config=tiny_config, pretrained=str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.encode_image(x), tiny_backbone.encode_image(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown CLIP model name"):
        create_clip("ViT-Q-99")


def test_missing_model_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ClipBackbone(model_config=str(tmp_path / "nope.json"))


def test_package_prefix_resolves_inside_the_package():
    import copatch
    from pathlib import Path

    from copatch.clip_model import resolve_checkpoint

    assert resolve_checkpoint("package:weights/x.pt") == str(Path(copatch.__file__).parent / "weights" / "x.pt")
    assert resolve_checkpoint("/abs/x.pt") == "/abs/x.pt" and resolve_checkpoint(None) is None


def test_truncated_checkpoint_is_named_unreadable_not_a_mismatch(tmp_path, tiny_backbone, tiny_config):
    from copatch.clip_model import CheckpointUnreadable

    whole = tmp_path / "whole.pt"
    torch.save(tiny_backbone.model.state_dict(), whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointUnreadable) as err:
        ClipBackbone(model_config=tiny_config, pretrained=str(cut))
    assert str(cut) in str(err.value) and "unreadable or truncated" in str(err.value)
    assert "fetch it again" in str(err.value) and "does not fit" not in str(err.value)


def test_missing_official_weights_print_the_fetch_command(tmp_path):
    from copatch.downloads import DOWNLOADS
    from copatch.errors import UserError

    for model, key in [("ViT-B-32-quickgelu", "clip-vitb32"), ("ViT-H-14", "clip-vith14")]:
        with pytest.raises(FileNotFoundError) as err:
            create_clip(model, DOWNLOADS[key].destination)
        assert isinstance(err.value, UserError) and DOWNLOADS[key].command in str(err.value)


def test_from_preset_names_clip_checkpoint(tmp_path):
    from copatch.module import CoPatch

    with pytest.raises(CheckpointError, match="clip_checkpoint=") as err:
        CoPatch.from_preset("vitb16", clip_checkpoint=str(tmp_path / "nope.bin"))
    assert "--model" not in str(err.value) and "clip_pretrained" not in str(err.value)
