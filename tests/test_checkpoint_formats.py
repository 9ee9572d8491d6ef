"""Every checkpoint format through every entry point: this project's, the original's (with ``args``), a bare
state_dict; what each says about its model (options, class names), the config built from it, mismatch messages,
conversion, and the errors for corrupt, truncated and foreign files."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from _repo import load_tool
from tiny_training import SHAPES_CONFIG, TINY_MODEL, tiny_overrides

from models import build_detector, config_from_checkpoint, load_detector, read_checkpoint
from models.checkpoint import CheckpointError, options_from_weights
from models.config import load_config
from models.loading import architecture_mismatches, split_command_line

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_ARGS = dict(
    backbone="resnet18",
    dilation=False,
    position_embedding="sine",
    num_feature_levels=2,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    hidden_dim=32,
    dropout=0.1,
    nheads=2,
    num_queries=5,
    enc_n_points=4,
    dec_n_points=4,
    with_box_refine=False,
    two_stage=False,
    aux_loss=True,
    dataset_file="coco",
    lr=2e-4,
)
SMALL_IMAGES = ["data.val_size=64", "data.val_max_size=96"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, str]:
    """A 1-epoch tiny run on the synthetic shapes (its checkpoint and data), and the same weights saved in the
    original's release format and as a bare state_dict."""
    root = tmp_path_factory.mktemp("formats")
    data, out = str(root / "shapes"), str(root / "run")
    assert load_tool("train").main([SHAPES_CONFIG, *tiny_overrides(data, out)]) == 0
    project = os.path.join(out, "checkpoint.pth")
    state = torch.load(project, map_location="cpu", weights_only=True)["model"]
    original, bare = str(root / "original.pth"), str(root / "bare.pth")
    args = argparse.Namespace(**TINY_ARGS)
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 49, "args": args}, original)
    torch.save(state, bare)
    return {"data": data, "out": out, "project": project, "original": original, "bare": bare, "root": str(root)}


def _outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(torch.linspace(-1, 1, 2 * 3 * 64 * 80).reshape(2, 3, 64, 80))


def test_each_format_reads_with_what_it_states(run) -> None:
    project, original, bare = (read_checkpoint(run[k]) for k in ("project", "original", "bare"))
    assert (project.format, original.format, bare.format) == ("project", "original", "state_dict")
    assert project.class_names == {1: "circle", 2: "square", 3: "triangle"}
    assert project.config["model"]["hidden_dim"] == 32 and "optimizer" in project.entries
    assert original.options["backbone"] == "resnet18" and original.options["num_classes"] == 4
    assert original.class_names == {} and original.entries["epoch"] == 49  # 4 classes: not COCO's names
    assert bare.options == options_from_weights(bare.model)
    assert bare.options == {
        "num_classes": 4,
        "num_feature_levels": 2,
        "hidden_dim": 32,
        "num_queries": 5,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 64,
        "two_stage": False,
        "with_box_refine": False,  # the two decoder layers' box heads hold the same values: one shared head
        "backbone": "resnet18",  # two BasicBlocks per layer
        "backbone_norm": "frozen_bn",
        "enc_offset_mode": "linear",
        "dec_offset_mode": "linear",
    }
    for checkpoint in (project, original, bare):
        assert checkpoint.model.keys() == project.model.keys()


def test_original_91_class_checkpoints_carry_the_coco_names(tmp_path) -> None:
    cfg = load_config(None, [*TINY_MODEL, "model.num_classes=91"])
    path = tmp_path / "r50_deformable_detr.pth"
    args = argparse.Namespace(**TINY_ARGS)
    torch.save({"model": build_detector(cfg).state_dict(), "epoch": 49, "args": args}, path)
    names = read_checkpoint(path).class_names
    assert len(names) == 80 and names[1] == "person" and names[90] == "toothbrush" and 12 not in names


def test_config_from_each_format_rebuilds_the_model(run) -> None:
    cfg = load_config(SHAPES_CONFIG, tiny_overrides(run["data"], run["out"]))
    expected = _outputs(load_detector(cfg, run["project"])[0])
    for key in ("project", "original"):
        checkpoint = read_checkpoint(run[key])
        cfg = config_from_checkpoint(checkpoint, ["data.val_size=64"])
        assert cfg.model.pretrained_backbone is False and cfg.data.val_size == 64
        got = _outputs(load_detector(cfg, checkpoint)[0])
        torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
        torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


def test_disagreements_name_the_option_and_the_override(run) -> None:
    checkpoint = read_checkpoint(run["original"])
    cfg = load_config(None, [*TINY_MODEL, "model.num_queries=7", "model.two_stage=true", "model.num_classes=3"])
    assert architecture_mismatches(cfg.model, checkpoint.options) == [
        "num_queries: the config says 7, the checkpoint 5 (override: model.num_queries=5)",
        "two_stage: the config says True, the checkpoint False (override: model.two_stage=false)",
    ]
    with pytest.raises(CheckpointError) as error:
        load_detector(cfg, checkpoint)
    message = str(error.value)
    assert f"checkpoint {run['original']} (original format) was made for another model" in message
    assert "num_classes: the config says 3, the checkpoint 4 (override: model.num_classes=4)" in message
    cfg = load_config(None, [*TINY_MODEL, "model.backbone=resnet34"])
    with pytest.raises(CheckpointError, match=r"backbone: the config says 'resnet34', the checkpoint 'resnet18' "):
        load_detector(cfg, checkpoint)


def test_split_command_line() -> None:
    assert split_command_line(["configs/coco.yaml", "a.jpg", "data.root=x"]) == (
        "configs/coco.yaml",
        ["data.root=x"],
        ["a.jpg"],
    )
    assert split_command_line(["a.jpg", "model.num_classes=3"]) == (None, ["model.num_classes=3"], ["a.jpg"])


@pytest.mark.parametrize("fmt", ["original", "bare"])
def test_eval_tool(run, fmt, tmp_path, capsys) -> None:
    argv = [SHAPES_CONFIG, "--checkpoint", run[fmt], *tiny_overrides(run["data"], str(tmp_path))]
    assert load_tool("eval").main(argv) == 0, capsys.readouterr().err
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["checkpoint"] == run[fmt]


def test_eval_tool_without_a_config_uses_the_original_args(run, tmp_path, capsys) -> None:
    data = [f"data.root={run['data']}", f"output_dir={tmp_path}", "train.device=cpu", *SMALL_IMAGES]
    assert load_tool("eval").main(["--checkpoint", run["original"], *data]) == 0, capsys.readouterr().err
    assert "Average Precision" in capsys.readouterr().out


def test_infer_and_visualize_tools(run, tmp_path, capsys) -> None:
    image = os.path.join(run["data"], "val2017", sorted(os.listdir(os.path.join(run["data"], "val2017")))[0])
    infer = ["--checkpoint", run["original"], image, "--out", str(tmp_path / "infer"), "--device", "cpu"]
    assert load_tool("infer").main([*infer, *SMALL_IMAGES, "--score-threshold", "0"]) == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "infer" / "results.json")
    out = str(tmp_path / "sampling.png")
    argv = [SHAPES_CONFIG, *TINY_MODEL, "--checkpoint", run["original"], "--image", image, "--out", out]
    assert load_tool("visualize").main([*argv, "--device", "cpu"]) == 0, capsys.readouterr().err
    assert os.path.getsize(out) > 0


def test_both_exporters(run, tmp_path, capsys) -> None:
    pt2 = str(tmp_path / "model.pt2")
    argv = ["--checkpoint", run["original"], "--size", "64", "80"]
    assert load_tool("export_torch").main([*argv, "--out", pt2]) == 0, capsys.readouterr().err
    assert os.path.isfile(pt2)
    pytest.importorskip("onnxscript")
    onnx = str(tmp_path / "model.onnx")
    code = load_tool("export_onnx").main([SHAPES_CONFIG, *TINY_MODEL, *argv, "--out", onnx])
    assert code == 0, capsys.readouterr().err
    assert "onnx.checker: ok" in capsys.readouterr().out


def test_finetune_from_an_original_checkpoint_with_another_class_count(run, tmp_path, caplog, monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("fine-tuning downloaded backbone weights that the checkpoint overwrites")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    out = str(tmp_path / "ft")
    extra = ("model.num_classes=7", f"train.finetune={run['original']}", "model.pretrained_backbone=true")
    argv = [SHAPES_CONFIG, *tiny_overrides(run["data"], out, *extra)]
    assert load_tool("train").main([*argv, "train.eval_every=0"]) == 0
    assert "class_embed" in caplog.text  # the re-initialised heads are reported
    tuned = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert tuned.model["class_embed.0.weight"].shape[0] == 7
    start = read_checkpoint(run["original"]).model
    for key in ("backbone.0.body.conv1.weight", "query_embed.weight", "transformer.level_embed"):
        assert (tuned.model[key] - start[key]).abs().max() < 0.01, key  # two steps away from the loaded weights


def test_finetune_refuses_another_architecture(run, tmp_path, capsys) -> None:
    argv = [SHAPES_CONFIG, *tiny_overrides(run["data"], str(tmp_path), f"train.finetune={run['original']}")]
    assert load_tool("train").main([*argv, "model.num_queries=9"]) == 1
    err = capsys.readouterr().err
    assert f"train.finetune={run['original']}" in err
    assert "num_queries: the config says 9, the checkpoint 5 (override: model.num_queries=5)" in err


def test_convert_to_project_format_keeps_the_outputs(run, tmp_path, capsys) -> None:
    dst = str(tmp_path / "converted.pth")
    assert load_tool("convert_checkpoint").main([run["original"], dst]) == 0, capsys.readouterr().err
    assert "(original format" in capsys.readouterr().out
    converted = read_checkpoint(dst)
    assert converted.format == "project" and converted.config["model"]["backbone"] == "resnet18"
    expected = _outputs(load_detector(config_from_checkpoint(read_checkpoint(run["original"])), run["original"])[0])
    got = _outputs(load_detector(config_from_checkpoint(converted), converted)[0])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


def test_convert_errors(run, tmp_path, capsys) -> None:
    tool = load_tool("convert_checkpoint")
    assert tool.main([run["bare"], str(tmp_path / "x.pth")]) == 1  # a bare state_dict does not state its backbone
    assert "bare.pth: checkpoint does not fit this model" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "none.pth"), str(tmp_path / "x.pth")]) == 1
    assert "none.pth does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.pth")


def test_corrupt_truncated_and_foreign_files_are_named(run, tmp_path) -> None:
    with open(run["project"], "rb") as f:
        (tmp_path / "truncated.pth").write_bytes(f.read()[:4000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth is corrupt or not a PyTorch file .*expected"):
        read_checkpoint(tmp_path / "truncated.pth")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is corrupt or not a PyTorch file"):
        read_checkpoint(tmp_path / "notes.txt")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth holds no 'model' state dict \(found a list\)"):
        read_checkpoint(tmp_path / "list.pth")
    (tmp_path / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nothing\.pth does not exist"):
        read_checkpoint(tmp_path / "nothing.pth")
    cfg = load_config(SHAPES_CONFIG, tiny_overrides(run["data"], str(tmp_path)))
    with pytest.raises(CheckpointError, match=r"checkpoint .*fake\.pth: checkpoint does not fit .*shares no key"):
        torch.save({"model": {"encoder.weight": torch.ones(2)}, "epoch": 1}, tmp_path / "fake.pth")
        load_detector(cfg, tmp_path / "fake.pth")


@pytest.fixture(scope="module")
def hf_folder(run) -> tuple[str, torch.nn.Module]:
    """A transformers folder (config.json + model.safetensors, id2label) of a tiny 3-level model with random
    weights, written by models.hf_format.write_hf, and that model."""
    from models.hf_format import write_hf

    cfg = load_config(SHAPES_CONFIG, tiny_overrides(run["data"], run["out"], "model.num_feature_levels=3"))
    torch.manual_seed(3)
    model = build_detector(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = os.path.join(run["root"], "hf")
    write_hf(folder, model.state_dict(), cfg.model, {1: "circle", 2: "square", 3: "triangle"})
    return folder, model.eval()


def test_a_transformers_folder_in_every_tool(run, hf_folder, tmp_path, capsys) -> None:
    folder, model = hf_folder
    checkpoint = read_checkpoint(folder)
    assert checkpoint.format == "hf" and checkpoint.class_names == {1: "circle", 2: "square", 3: "triangle"}
    data = [f"data.root={run['data']}", "train.device=cpu", *SMALL_IMAGES]
    assert load_tool("eval").main(["--checkpoint", folder, *data, f"output_dir={tmp_path}"]) == 0
    image = os.path.join(run["data"], "val2017", sorted(os.listdir(os.path.join(run["data"], "val2017")))[0])
    argv = ["--checkpoint", folder, image, "--out", str(tmp_path / "infer"), "--score-threshold", "0", *SMALL_IMAGES]
    assert load_tool("infer").main(argv) == 0, capsys.readouterr().err
    with open(tmp_path / "infer" / "results.json") as f:
        assert {r["category_id"] for r in json.load(f)} <= {0, 1, 2, 3}
    out = str(tmp_path / "v.png")
    assert load_tool("visualize").main(["--checkpoint", folder, "--image", image, "--out", out, *SMALL_IMAGES]) == 0
    pt2 = str(tmp_path / "exports" / "m.pt2")  # a folder the tool creates
    assert load_tool("export_torch").main(["--checkpoint", folder, "--out", pt2, "--size", "64", "80"]) == 0
    assert os.path.isfile(pt2)


def test_convert_a_transformers_folder_and_back(hf_folder, tmp_path, capsys) -> None:
    folder, model = hf_folder
    tool = load_tool("convert_checkpoint")
    project, again = str(tmp_path / "p.pth"), str(tmp_path / "hf_again")
    assert tool.main([folder, project]) == 0 and tool.main([project, again, "--to", "hf"]) == 0, capsys.readouterr()
    expected = _outputs(model)
    for path in (project, again):
        checkpoint = read_checkpoint(path)
        assert checkpoint.class_names == {1: "circle", 2: "square", 3: "triangle"}
        got = _outputs(load_detector(config_from_checkpoint(checkpoint), checkpoint)[0])
        torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
        torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


def test_a_training_checkpoint_is_never_converted_onto_itself(run, tmp_path, capsys) -> None:
    """Converting a run's checkpoint onto itself would replace it with one that keeps no optimizer, schedule or
    epoch: refused, even with --overwrite. (Round trips through transformers: tests/test_convert_guards.py; this
    run's 2 feature levels cannot be written for transformers.)"""
    copy = tmp_path / "checkpoint.pth"
    with open(run["project"], "rb") as f:
        copy.write_bytes(f.read())
    assert load_tool("convert_checkpoint").main([str(copy), str(copy), "--overwrite"]) == 1
    assert "is the source" in capsys.readouterr().err
    assert {"optimizer", "lr_scheduler", "epoch"} <= read_checkpoint(copy).entries.keys()


def test_a_run_folder_is_read_as_its_checkpoint_by_every_tool(run, tmp_path, capsys) -> None:
    """Every tool that takes --checkpoint reads a training run's folder as its checkpoint.pth, as train.finetune and
    train.resume do (it was read as a broken transformers folder); eval writes into that folder; converting the folder
    onto its own checkpoint.pth is refused (it is the source)."""
    folder = read_checkpoint(run["out"])
    assert folder.format == "project" and folder.entries["epoch"] == read_checkpoint(run["project"]).entries["epoch"]
    assert all(torch.equal(v, read_checkpoint(run["project"]).model[k]) for k, v in folder.model.items())
    image = os.path.join(run["data"], "val2017", sorted(os.listdir(os.path.join(run["data"], "val2017")))[0])
    infer = ["--checkpoint", run["out"], image, "--out", str(tmp_path / "infer"), "--device", "cpu"]
    assert load_tool("infer").main([*infer, *SMALL_IMAGES, "--score-threshold", "0"]) == 0, capsys.readouterr().err
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoint.pth").write_bytes(Path(run["project"]).read_bytes())
    before = (copy / "checkpoint.pth").read_bytes()
    assert load_tool("convert_checkpoint").main([str(copy), str(copy / "checkpoint.pth"), "--overwrite"]) == 1
    assert "is the source" in capsys.readouterr().err and (copy / "checkpoint.pth").read_bytes() == before
    data = [f"data.root={run['data']}", "train.device=cpu", "data.num_workers=0", *SMALL_IMAGES]
    assert load_tool("eval").main(["--checkpoint", str(copy), *data]) == 0, capsys.readouterr().err
    assert json.loads((copy / "eval.json").read_text())["checkpoint"] == str(copy / "checkpoint.pth")  # beside it
    (copy / "checkpoint.pth").unlink()  # neither a run's nor a transformers folder: both named
    with pytest.raises(CheckpointError, match=r"or a training run.s folder: checkpoint.pth"):
        read_checkpoint(copy)


@pytest.mark.parametrize("depth", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_a_state_dict_shows_which_resnet_its_backbone_is(depth) -> None:
    """Block counts per layer and the bottleneck's third conv tell the four torchvision ResNets apart; a backbone of
    another family states none."""
    body = getattr(torchvision.models, depth)(weights=None).state_dict()
    state = {f"backbone.0.body.{k}": v for k, v in body.items() if not k.startswith("fc.")}
    assert options_from_weights(state)["backbone"] == depth
    other = {k.replace(".layer3.", ".stages.2."): v for k, v in state.items()}
    assert "backbone" not in options_from_weights(other)
