"""The TF32 switch (`copatch.precision`, `CoPatch(allow_tf32=...)`): only on CUDA, only when asked, put back."""

import torch

from copatch.precision import restore_tf32, set_tf32


def test_set_tf32_changes_cuda_settings_only_when_asked_and_restores_them():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert set_tf32(False, "cuda") is None and set_tf32(True, "cpu") is None
        assert set_tf32(True, torch.device("cpu")) is None
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        before = set_tf32(True, "cuda:0")  # the flags are settable without a GPU; nothing runs
        assert before == (False, False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        restore_tf32(before)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        restore_tf32(None)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_predict_sets_tf32_for_its_device_and_puts_it_back(tiny_config, toy_root, tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    import copatch.module as module
    from copatch.datamodules.refer import ReferDataModule
    from copatch.proposals import GroundTruthProposals

    calls = []
    monkeypatch.setattr(module, "set_tf32", lambda enabled, device: calls.append((enabled, device)) or "saved")
    monkeypatch.setattr(module, "restore_tf32", lambda before: calls.append(("restore", before)))
    torch.manual_seed(0)
    model = module.CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128,
                           proposer=GroundTruthProposals(), allow_tf32=True)
    assert model.fingerprint()["hparams"]["allow_tf32"] is True  # it can change picks: part of a run's setup
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            default_root_dir=str(tmp_path)).predict(model, datamodule=ReferDataModule(str(toy_root), limit=1),
                                                    return_predictions=False)
    assert calls == [(True, torch.device("cpu")), ("restore", "saved")]
