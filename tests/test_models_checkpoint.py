"""``models.load_checkpoint``: other class counts, file handling and checkpoints of other architectures."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from _models_utils import perturb, tiny_config

from models import build_detector, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A 'trained' 91-class multi-scale model and its checkpoint dict (the original's layout)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config("model.num_classes=91"))
    perturb(model, 0.05)
    args = argparse.Namespace(lr=2e-4, backbone="resnet50", with_box_refine=False)
    return model, {"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 49, "args": args}


def test_class_count_change_reinitialises_only_the_class_heads(trained, tmp_path):
    source, checkpoint = trained
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = build_detector(tiny_config("model.num_classes=5"))
    result = load_checkpoint(model, path)

    assert sorted(result.reinitialised) == sorted(f"class_embed.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert result.dropped == result.reinitialised and not result.missing
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("class_embed."):
            assert torch.equal(own[key], value), key
    torch.testing.assert_close(model.class_embed[0].bias, torch.full((5,), -math.log(99)))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))["pred_logits"].shape == (1, 20, 5)


def test_same_class_count_loads_everything_from_a_raw_or_wrapped_state_dict(trained):
    source, checkpoint = trained
    for state in (checkpoint["model"], {f"module.{k}": v for k, v in checkpoint["model"].items()}):
        model = build_detector(tiny_config("model.num_classes=91"))
        result = load_checkpoint(model, state)
        assert not result.dropped and not result.missing
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True)
        )


def test_box_refinement_and_two_stage_class_heads_are_reinitialised_under_every_alias(trained):
    model = build_detector(tiny_config("model.num_classes=3", "model.with_box_refine=true"))
    result = load_checkpoint(model, trained[1])  # shared heads -> separate copies; the aliases are covered
    assert not result.missing and len(result.reinitialised) == 6
    assert all(torch.equal(h.layers[0].weight, trained[0].bbox_embed[0].layers[0].weight) for h in model.bbox_embed)
    two_stage = build_detector(
        tiny_config("model.with_box_refine=true", "model.two_stage=true", "model.num_classes=91")
    )
    source = two_stage.state_dict()
    target = build_detector(tiny_config("model.with_box_refine=true", "model.two_stage=true", "model.num_classes=7"))
    result = load_checkpoint(target, source)
    assert {k.split(".")[0] for k in result.reinitialised} == {"class_embed", "transformer"}
    assert target.transformer.decoder.class_embed[3].weight.shape == (7, 64)


def test_checkpoint_of_another_architecture_is_refused_with_the_keys_named(trained):
    model = build_detector(tiny_config("model.num_classes=91", "model.hidden_dim=32", "model.nheads=4"))
    with pytest.raises(ValueError, match=r"shape mismatches: .*\(checkpoint \(64,?"):
        load_checkpoint(model, trained[1])
    single = build_detector(tiny_config("model.num_classes=91", "model.num_feature_levels=1"))
    with pytest.raises(ValueError, match=r"unexpected keys: .*input_proj\.1"):
        load_checkpoint(single, trained[1])
    two_stage = build_detector(tiny_config("model.num_classes=91", "model.two_stage=true"))
    with pytest.raises(ValueError, match=r"keys missing from the checkpoint: .*transformer\.enc_output"):
        load_checkpoint(two_stage, trained[1])


def test_non_strict_loading_keeps_what_fits_and_reports_the_rest(trained):
    single = build_detector(tiny_config("model.num_classes=91", "model.num_feature_levels=1"))
    result = load_checkpoint(single, trained[1], strict=False)
    assert any(k.startswith("input_proj.1") for k in result.unexpected)
    assert any(k.startswith("transformer.level_embed") for k in result.mismatched)
    assert torch.equal(single.query_embed.weight, trained[0].query_embed.weight)


def test_distinct_values_for_shared_heads_are_refused():
    refined = build_detector(tiny_config("model.with_box_refine=true"))
    perturb(refined)
    with pytest.raises(ValueError, match="which this model shares"):
        load_checkpoint(build_detector(tiny_config()), refined.state_dict())


def test_bad_files_and_objects(tmp_path):
    model = build_detector(tiny_config())
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"checkpoint .*corrupt\.pth is corrupt or not a PyTorch file"):
        load_checkpoint(model, corrupt)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(model, tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="path, a Checkpoint or a dict"):
        load_checkpoint(model, 42)
    with pytest.raises(ValueError, match="entries a are not tensors"):
        load_checkpoint(model, {"model": {"a": 1}})
    with pytest.raises(ValueError, match="shares no key with this detector"):
        load_checkpoint(model, {"encoder.weight": torch.ones(2)})


def test_a_box_refinement_state_dict_names_the_override():
    """A bare state_dict states no with_box_refine; its per-layer box heads show it, and the message names the
    override."""
    refined = build_detector(tiny_config("model.with_box_refine=true"))
    perturb(refined)
    with pytest.raises(ValueError, match=r"a box-refinement model; set model\.with_box_refine=true"):
        load_checkpoint(build_detector(tiny_config()), refined.state_dict())


def test_transformers_weights_without_their_config_are_named(tmp_path):
    """A transformers model.safetensors copied without its config.json reads as a bare state_dict in transformers'
    names: the message says what it is and what it needs, not hundreds of missing keys."""
    from safetensors.torch import load_file

    from models import load_detector, read_checkpoint
    from models.hf_format import write_hf

    cfg = tiny_config()
    write_hf(tmp_path / "hf", build_detector(cfg).state_dict(), cfg.model)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    message = r"these are transformers DeformableDetrForObjectDetection weights .* read without their config\.json"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(build_detector(cfg), load_file(lone / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"lone/model\.safetensors: {message}: put the config\.json"):
        load_detector(cfg, read_checkpoint(lone / "model.safetensors"))


def test_a_bare_state_dict_says_which_resize_it_is_given(tmp_path):
    """A bare state_dict does not say at what size it was trained: the tools say which resize they apply, unless the
    overrides choose one (a project checkpoint says nothing: its saved config holds its sizes)."""
    import warnings

    from models.config import config_to_dict
    from models.loading import config_from_checkpoint, read_checkpoint

    cfg = tiny_config()
    state = build_detector(cfg).state_dict()
    torch.save(state, tmp_path / "bare.pth")
    with pytest.warns(UserWarning, match=r"bare\.pth is a bare state_dict, .*data\.val_size=800, long side at most"):
        config_from_checkpoint(read_checkpoint(tmp_path / "bare.pth"))
    torch.save({"model": state, "config": config_to_dict(cfg)}, tmp_path / "project.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_checkpoint(read_checkpoint(tmp_path / "bare.pth"), ["data.val_size=96", "data.val_max_size=160"])
        config_from_checkpoint(read_checkpoint(tmp_path / "project.pth"))


def test_devices_by_index_and_under_torchrun(monkeypatch):
    """cuda:<index> picks that GPU (named when past the GPUs torch sees), and is refused under torchrun, where each
    process takes its local rank's; the config accepts it too."""
    from models.config import ConfigError, load_config
    from models.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device=cuda:2 but torch sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="train.device=cuda:1 under torchrun: each process takes the GPU of its"):
        resolve_device("cuda:1", option="train.device", distributed=True)
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"one of auto, cpu, cuda or cuda:<index>"):
        load_config(None, ["train.device=gpu0"])
