"""CoPE offsets switched on over weights trained with linear ones (``train.finetune``): the detector starts with the
checkpoint's outputs; everywhere else a checkpoint and a config that disagree on the offsets are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _models_utils import padded_batch, perturb, tiny_config

from deformable.training.build import finetune_from
from models import (
    Checkpoint,
    CheckpointError,
    build_detector,
    config_from_checkpoint,
    load_checkpoint,
    load_detector,
    read_checkpoint,
)
from models.checkpoint import options_from_weights
from models.loading import check_architecture

pytestmark = pytest.mark.usefixtures("one_thread")

COPE = ("model.enc_offset_mode=cope", "model.dec_offset_mode=cope")


@pytest.fixture(scope="module")
def linear_file(tmp_path_factory):
    """A 'trained' linear detector and its weights saved as a bare state_dict."""
    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()
    perturb(model, 0.05)
    path = tmp_path_factory.mktemp("linear") / "weights.pth"
    torch.save(model.state_dict(), path)
    return model, path


def outputs(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(images, mask)
    return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}


def test_weights_show_the_offset_modes_and_counting_channels(linear_file):
    linear = read_checkpoint(linear_file[1]).options
    assert (linear["enc_offset_mode"], linear["dec_offset_mode"]) == ("linear", "linear")
    assert "cope_channels" not in linear
    decoder_only = build_detector(tiny_config("model.dec_offset_mode=cope", "model.cope_channels=3"))
    options = options_from_weights(decoder_only.state_dict())
    assert (options["enc_offset_mode"], options["dec_offset_mode"], options["cope_channels"]) == ("linear", "cope", 3)
    assert "nheads" not in linear and "enc_n_points" not in linear  # linear offsets show M x P, not each


def test_cope_weights_show_heads_and_points_and_load_without_a_config() -> None:
    """CoPE gates are per head (gate_query: (M, R, G)): a bare CoPE state_dict shows its head count and so each
    attention's points per head, and builds its own detector (it needed model.nheads before, and the hint for the
    linear case suggested head counts that could not fit the gates)."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(*COPE[1:], "model.nheads=4", "model.enc_n_points=3", "model.dec_n_points=2"))
    checkpoint = read_checkpoint_of(model)
    assert {k: checkpoint.options[k] for k in ("nheads", "enc_n_points", "dec_n_points")} == {
        "nheads": 4,
        "enc_n_points": 3,
        "dec_n_points": 2,
    }
    loaded, _ = load_detector(config_from_checkpoint(checkpoint), checkpoint)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("modes", [COPE, COPE[:1], COPE[1:]], ids=["both", "encoder", "decoder"])
def test_finetuning_with_cope_starts_with_the_linear_detectors_outputs(linear_file, modes):
    source, path = linear_file
    cfg = tiny_config(*modes, f"train.finetune={path}")
    model = build_detector(cfg)
    finetune_from(model, cfg)

    torch.manual_seed(1)
    images, mask = padded_batch(64, 80)  # the second image padded: padding counts as the plain module's pixels
    got, expected = outputs(model, images, mask), outputs(source, images, mask)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    own = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(own[key], value), key


def test_the_fresh_gates_are_reported_and_only_they(linear_file):
    model = build_detector(tiny_config(*COPE))
    result = load_checkpoint(model, read_checkpoint(linear_file[1]), fresh_cope=True)
    cope_keys = sorted(k for k in model.state_dict() if ".cope." in k)
    assert sorted(result.fresh) == cope_keys and len(cope_keys) == 6 * 5  # 2 + 3 attentions, 6 tensors each
    assert not result.missing and not result.dropped
    with pytest.raises(ValueError, match=r"keys missing from the checkpoint: .*\.cope\.gate_query"):
        load_checkpoint(build_detector(tiny_config(*COPE)), read_checkpoint(linear_file[1]))


def test_a_cope_part_with_some_of_its_keys_is_not_completed_with_fresh_ones():
    cope = build_detector(tiny_config(*COPE))
    dropped = "transformer.encoder.layers.0.self_attn.cope.gate_bias"
    state = {k: v for k, v in cope.state_dict().items() if k != dropped}
    with pytest.raises(ValueError, match=r"1 keys missing from the checkpoint: " + dropped.replace(".", r"\.")):
        load_checkpoint(build_detector(tiny_config(*COPE)), state, fresh_cope=True)


def test_outside_finetuning_a_linear_checkpoint_in_a_cope_config_is_refused(linear_file):
    with pytest.raises(CheckpointError, match=r"enc_offset_mode: the config says 'cope', the checkpoint 'linear' "):
        load_detector(tiny_config(*COPE), linear_file[1])
    with pytest.raises(CheckpointError, match=r"\(override: model\.dec_offset_mode=linear\)"):
        load_detector(tiny_config(*COPE), linear_file[1])


def test_cope_weights_are_never_dropped_for_linear_offsets():
    cope = read_checkpoint_of(build_detector(tiny_config(*COPE)))
    linear = tiny_config()
    for finetune in (False, True):
        with pytest.raises(CheckpointError, match=r"the config says 'linear', the checkpoint 'cope' \(override: "):
            check_architecture(linear.model, cope, finetune=finetune)


def test_counting_channels_must_agree_only_where_the_checkpoint_counts(linear_file):
    three = read_checkpoint_of(build_detector(tiny_config(*COPE, "model.cope_channels=3")))
    with pytest.raises(CheckpointError, match=r"cope_channels: the config says 2, the checkpoint 3 .*=3\)"):
        check_architecture(tiny_config(*COPE).model, three, finetune=True)
    stated = {"cope_channels": 2, "enc_offset_mode": "linear"}  # a linear project checkpoint's saved config
    linear = dataclasses.replace(read_checkpoint(linear_file[1]), options=stated)
    check_architecture(tiny_config(*COPE, "model.cope_channels=4").model, linear, finetune=True)


def read_checkpoint_of(model: torch.nn.Module) -> Checkpoint:
    """What :func:`models.read_checkpoint` makes of ``model``'s bare state_dict, without a file."""
    state = model.state_dict()
    return Checkpoint("weights.pth", "state_dict", state, options_from_weights(state))
