"""Config files with a base (``_base_: coco.yaml``): resolution, nesting, the order of precedence, cycles, and the
resolved config written complete."""

from __future__ import annotations

import os

import pytest
import yaml
from _repo import config_path

from models.config import BASE_KEY, Config, ConfigError, config_to_dict, load_config, save_config


def write(folder, name: str, text: str) -> str:
    path = os.path.join(str(folder), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_a_file_states_only_its_difference_from_its_base(tmp_path) -> None:
    write(tmp_path, "base.yaml", "model:\n  num_queries: 100\n  enc_layers: 2\ntrain:\n  epochs: 7\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nmodel:\n  enc_layers: 3\n")
    cfg = load_config(child)
    assert (cfg.model.num_queries, cfg.model.enc_layers, cfg.train.epochs) == (100, 3, 7)
    assert cfg.model.dec_layers == Config().model.dec_layers  # neither file: the default


def test_precedence_is_defaults_then_base_then_file_then_command_line(tmp_path) -> None:
    write(tmp_path, "base.yaml", "train:\n  epochs: 1\n  lr: 1.0e-3\n  batch_size: 8\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\ntrain:\n  lr: 2.0e-3\n  batch_size: 16\n")
    cfg = load_config(child, ["train.batch_size=32"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (1, 2e-3, 32)
    assert cfg.train.seed == Config().train.seed


def test_nested_bases_and_paths_relative_to_the_including_file(tmp_path) -> None:
    write(tmp_path, "common/root.yaml", "model:\n  nheads: 4\n  hidden_dim: 64\ndata:\n  train_scales: [1, 2, 3]\n")
    write(tmp_path, "common/mid.yaml", "_base_: root.yaml\nmodel:\n  hidden_dim: 128\n")
    leaf = write(tmp_path, "runs/leaf.yaml", "_base_: ../common/mid.yaml\ndata:\n  train_scales: [9]\n")
    cfg = load_config(leaf)
    assert (cfg.model.nheads, cfg.model.hidden_dim) == (4, 128)
    assert cfg.data.train_scales == [9]  # a list replaces the base's list


def test_an_unknown_key_or_bad_value_names_the_file_of_the_chain_that_states_it(tmp_path) -> None:
    write(tmp_path, "base.yaml", "train:\n  typo_key: 3\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nmodel:\n  enc_layers: 3\n")
    with pytest.raises(ConfigError, match=r"config file \S*base\.yaml: unknown config key 'train\.typo_key'"):
        load_config(child)
    write(tmp_path, "base.yaml", "train:\n  epochs: 2\n")
    leaf = write(tmp_path, "leaf.yaml", "_base_: child.yaml\ntrain:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"config file \S*leaf\.yaml: .*train\.epochs"):
        load_config(leaf)


def test_a_cycle_is_an_error_naming_the_files(tmp_path) -> None:
    a = write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=f"include each other through {BASE_KEY}") as error:
        load_config(a)
    message = str(error.value)
    assert message.count("a.yaml") == 2 and "b.yaml" in message  # a -> b -> a
    itself = write(tmp_path, "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml -> .*self.yaml"):
        load_config(itself)


def test_a_missing_or_malformed_base_names_the_including_file(tmp_path) -> None:
    child = write(tmp_path, "child.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml \(the _base_ of .*child.yaml\)"):
        load_config(child)
    listed = write(tmp_path, "listed.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match="_base_ must be a file name"):
        load_config(listed)


def test_the_resolved_config_is_written_complete(tmp_path) -> None:
    cfg = load_config(config_path("coco_two_stage.yaml"), ["train.epochs=3"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    with open(path, encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    assert BASE_KEY not in saved and saved == config_to_dict(cfg)
    assert saved["model"]["two_stage"] and saved["model"]["with_box_refine"] and saved["model"]["num_classes"] == 91
    assert load_config(path) == cfg  # a saved config needs no base to be read back


@pytest.mark.parametrize(
    ("name", "difference"),
    [
        ("coco_single_scale.yaml", {"num_feature_levels": 1}),
        ("coco_box_refine.yaml", {"with_box_refine": True}),
        ("coco_two_stage.yaml", {"with_box_refine": True, "two_stage": True}),
    ],
)
def test_the_coco_variants_differ_from_coco_yaml_only_where_they_say(name: str, difference: dict) -> None:
    with open(config_path(name), encoding="utf-8") as f:
        stated = yaml.safe_load(f)
    assert stated[BASE_KEY] == "coco.yaml" and set(stated) == {BASE_KEY, "model", "output_dir"}
    assert stated["model"] == difference
    base = config_to_dict(load_config(config_path("coco.yaml")))
    variant = config_to_dict(load_config(config_path(name)))
    assert {k for k in base["model"] if base["model"][k] != variant["model"][k]} == set(difference)
    assert {k: v for k, v in variant.items() if k not in ("model", "output_dir")} == {
        k: v for k, v in base.items() if k not in ("model", "output_dir")
    }
