"""What a run refuses before it can lose or misrecord anything: settings out of range, a resume under other optimiser
or schedule settings or another model, a new run over an earlier one's checkpoint, folders that cannot be written;
and where evaluation writes, with what permissions files are written."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml
from _repo import ROOT, load_tool
from tiny_training import SHAPES_CONFIG, TINY_MODEL, tiny_config, tiny_overrides

from deformable.data import DatasetError
from deformable.training import engine
from deformable.training.run_lock import LOCK_NAME, run_lock
from models import build_detector
from models.checkpoint import CheckpointError, read_checkpoint
from models.config import ConfigError, load_config
from models.files import FolderError, atomic_write_text, make_dir
from models.weights import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

train_tool = load_tool("train")
eval_tool = load_tool("eval")


def _copy(run: str, to: Path) -> str:
    to.mkdir()
    for name, content in _files(run).items():
        (to / name).write_bytes(content)
    return str(to)


def _files(run: str) -> dict[str, bytes]:
    return {name: (Path(run) / name).read_bytes() for name in ("checkpoint.pth", "config.yaml", "log.jsonl")}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_drop=0", "'train.lr_drop' must be >= 1, got 0"),
        ("train.lr_drop=-1", "'train.lr_drop' must be >= 1, got -1"),
        ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
        ("train.patience=-1", "'train.patience' must be >= 0, got -1"),
        ("train.lr=0", "'train.lr' must be > 0, got 0.0"),
        ("train.lr_backbone=-1e-5", "'train.lr_backbone' must be >= 0"),
        ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
        ("train.ema_decay=1.5", "'train.ema_decay' must be in [0, 1), got 1.5"),
        ("train.device=gpu", "'train.device' must be one of auto, cpu, cuda or cuda:<index>, got 'gpu'"),
        ("train.amp=fp8", "'train.amp' must be one of none, bf16, fp16, got 'fp8'"),
        ("data.num_workers=-1", "'data.num_workers' must be >= 0, got -1"),
        ("train.lr=.inf", "'train.lr' must be a finite number, got inf"),
        ("train.weight_decay=.nan", "'train.weight_decay' must be a finite number, got nan"),
        ("data.train_scales=[]", "'data.train_scales' must be a non-empty list of sizes >= 1, got []"),
        ("data.crop_scales=[0,400]", "'data.crop_scales' must be a non-empty list of sizes >= 1, got [0, 400]"),
        ("data.crop_size=[600,384]", "'data.crop_size' must be two sizes [min, max] with 1 <= min <= max"),
        ("data.crop_size=[384]", "'data.crop_size' must be two sizes [min, max]"),
        ("data.val_size=0", "'data.val_size' must be >= 1, got 0"),
        ("data.val_max_size=-1", "'data.val_max_size' must be >= 1, got -1"),
        ("data.min_image_size=16", "'data.min_image_size' must be >= 32, got 16"),
        ("model.nheads=0", "'model.nheads' must be >= 1, got 0"),
        ("model.dec_layers=0", "'model.dec_layers' must be >= 1, got 0"),
        ("model.dropout=1.0", "'model.dropout' must be in [0, 1), got 1.0"),
        ("loss.focal_alpha=2", "'loss.focal_alpha' must be in [0, 1], got 2.0"),
        ("loss.num_select=0", "'loss.num_select' must be >= 1, got 0"),
    ],
)
def test_out_of_range_settings_are_config_errors(override, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHAPES_CONFIG, [override])
    assert message in str(info.value)


def test_settings_in_range_are_accepted() -> None:
    cfg = load_config(SHAPES_CONFIG, ["train.lr_backbone=0", "train.ema_decay=0", "train.eval_every=0"])
    assert (cfg.train.lr_backbone, cfg.train.ema_decay, cfg.train.eval_every) == (0.0, 0.0, 0)


def test_train_tool_reports_a_bad_setting_without_a_traceback(capsys) -> None:
    assert train_tool.main([SHAPES_CONFIG, "train.lr_drop=0"]) == 1
    assert "'train.lr_drop' must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.lr=0.01", "train.lr: the checkpoint was trained with 0.0005, the config says 0.01 (override: "),
        ("train.lr_drop=100", "train.lr_drop: the checkpoint was trained with"),
        ("train.weight_decay=0.05", "train.weight_decay: the checkpoint was trained with"),
        ("train.seed=7", "train.seed: the checkpoint was trained with 42, the config says 7 (override: train.seed=42)"),
    ],
)
def test_resume_under_other_optimiser_settings_is_refused(finished, shapes_root, tmp_path, override, line) -> None:
    """The restored optimiser and schedule would win over the config, which config.yaml would then misstate."""
    run = _copy(finished, tmp_path / "run")
    before = _files(run)
    cfg = tiny_config(shapes_root, run, "train.epochs=2", "train.resume=auto", override)
    with pytest.raises(CheckpointError) as info:
        engine.fit(cfg)
    message = str(info.value)
    assert line in message and "train.finetune=PATH" in message
    assert _files(run) == before  # config.yaml and the log are the run's, as they were


def test_resume_with_another_model_names_the_override(finished, shapes_root, tmp_path) -> None:
    run = _copy(finished, tmp_path / "run")
    before = _files(run)
    with pytest.raises(CheckpointError) as info:
        engine.fit(tiny_config(shapes_root, run, "train.epochs=2", "train.resume=auto", "model.hidden_dim=64"))
    assert "hidden_dim: the config says 64, the checkpoint 32 (override: model.hidden_dim=32)" in str(info.value)
    assert _files(run) == before


def test_resume_with_fewer_epochs_than_trained_is_refused(finished, shapes_root, tmp_path) -> None:
    run = _copy(finished, tmp_path / "run")
    engine.fit(tiny_config(shapes_root, run, "train.epochs=2", "train.resume=auto", "train.eval_every=0"))
    with pytest.raises(CheckpointError, match=r"has trained 2 epochs already, more than train.epochs=1"):
        engine.fit(tiny_config(shapes_root, run, "train.epochs=1", "train.resume=auto"))
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["epochs"] == 2


def test_a_new_run_over_an_earlier_checkpoint_is_refused(finished, shapes_root, tmp_path, capsys) -> None:
    """Without train.resume, a run in a folder holding a checkpoint would replace it: refused before anything is
    touched, with the ways on named."""
    run = _copy(finished, tmp_path / "run")
    before = _files(run)
    assert train_tool.main([SHAPES_CONFIG, *tiny_overrides(shapes_root, run)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pth exists: output_dir holds an earlier run" in err and "train.resume=auto" in err
    assert _files(run) == before
    os.remove(os.path.join(run, "checkpoint.pth"))  # the user's explicit choice: start afresh there
    engine.fit(tiny_config(shapes_root, run, "train.eval_every=0"))
    assert read_checkpoint(os.path.join(run, "checkpoint.pth")).entries["epoch"] == 0


def test_class_heads_of_another_width_are_a_mismatch_not_another_class_count(tmp_path) -> None:
    """Only a class head whose class count (first dimension) alone differs is re-initialised when fine-tuning; one
    of another hidden width is named as a mismatch."""
    model = build_detector(load_config(None, TINY_MODEL))
    state = model.state_dict()
    state.update({k: torch.zeros(v.shape[0], 16) for k, v in state.items() if k.endswith("class_embed.0.weight")})
    with pytest.raises(ValueError) as info:
        load_checkpoint(model, {"model": state}, reinit_class_heads=True)
    assert "class_embed.0.weight (checkpoint (4, 16), model (4, 32))" in str(info.value)


@pytest.mark.parametrize("kind", ["empty", "file"])
def test_unusable_output_dir_is_named(shapes_root, tmp_path, capsys, kind) -> None:
    target = ""
    if kind == "file":
        target = str(tmp_path / "afile")
        open(target, "w").close()
    assert train_tool.main([SHAPES_CONFIG, *tiny_overrides(shapes_root, target)]) == 1
    expected = "output_dir is empty" if kind == "empty" else f"output_dir {target} is a file, not a folder"
    assert expected in capsys.readouterr().err


def test_make_dir_names_a_folder_it_cannot_create(tmp_path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FolderError, match=r"--out .*afile/sub cannot be created"):
        make_dir(str(tmp_path / "afile" / "sub"), "--out")


def test_eval_writes_beside_the_checkpoint_unless_told(finished, shapes_root, tmp_path, capsys) -> None:
    """A checkpoint's saved output_dir is its training run's (maybe another run's, or another machine's): results go
    beside the checkpoint, or to output_dir when the command line names one."""
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.pth").write_bytes((Path(finished) / "checkpoint.pth").read_bytes())
    data = [f"data.root={shapes_root}", "train.device=cpu"]
    assert eval_tool.main(["--checkpoint", str(moved / "model.pth"), *data]) == 0
    assert f"wrote {moved / 'eval.json'}" in capsys.readouterr().out
    with open(moved / "eval.json") as f:
        assert json.load(f)["checkpoint"] == str(moved / "model.pth")
    assert not os.path.exists(os.path.join(finished, "eval.json"))
    chosen = tmp_path / "chosen"
    assert eval_tool.main(["--checkpoint", str(moved / "model.pth"), *data, f"output_dir={chosen}"]) == 0
    assert (chosen / "eval.json").is_file()


def test_eval_says_a_missing_data_root_is_the_checkpoint_s(finished, tmp_path, monkeypatch, capsys) -> None:
    """A checkpoint's saved data.root is relative to where it was trained: from elsewhere eval says so."""
    content = torch.load(Path(finished) / "checkpoint.pth", weights_only=True)
    content["config"]["data"]["root"] = "data/raccoon"
    torch.save(content, tmp_path / "model.pth")
    monkeypatch.chdir(tmp_path)
    assert eval_tool.main(["--checkpoint", str(tmp_path / "model.pth"), "train.device=cpu"]) == 1
    err = capsys.readouterr().err
    assert "data.root data/raccoon does not exist" in err
    hint = "(data.root=data/raccoon is the checkpoint's saved config's, relative to where it was trained and not found"
    assert f"{hint} from {tmp_path}: run from there, or pass data.root=PATH)" in err


def test_atomic_writes_get_the_permissions_of_an_ordinary_write(tmp_path) -> None:
    """mkstemp makes private (0600) files; the written file gets what open() gives under the umask, or keeps the
    permissions of the file it replaces."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(tmp_path / "atomic.txt", 0o640)
    atomic_write_text(tmp_path / "atomic.txt", "y")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == 0o640


def test_checkpoints_are_readable_like_other_files(finished) -> None:
    mode = stat.S_IMODE(os.stat(os.path.join(finished, "checkpoint.pth")).st_mode)
    assert mode == stat.S_IMODE(os.stat(os.path.join(finished, "log.jsonl")).st_mode)
    assert torch.load(os.path.join(finished, "checkpoint.pth"), map_location="cpu", weights_only=True)["epoch"] == 0


def test_a_missing_resume_checkpoint_is_named(shapes_root, tmp_path, capsys) -> None:
    overrides = tiny_overrides(shapes_root, str(tmp_path / "run"), "train.resume=Auto")
    assert train_tool.main([SHAPES_CONFIG, *overrides]) == 1
    assert "train.resume=Auto: no such checkpoint (train.resume=auto resumes" in capsys.readouterr().err


def test_conflicting_builder_options_are_reported_without_a_traceback(shapes_root, tmp_path, capsys) -> None:
    overrides = tiny_overrides(shapes_root, str(tmp_path / "run"), "model.two_stage=true")
    assert train_tool.main([SHAPES_CONFIG, *overrides, "training_queries.query_groups=2"]) == 1
    assert "training_queries.query_groups=2 needs learned queries" in capsys.readouterr().err


def test_resuming_another_runs_checkpoint_into_a_run_is_refused(finished, shapes_root, tmp_path) -> None:
    """train.resume=PATH continues PATH's run in output_dir: where output_dir holds another run, that run's checkpoint
    and log would be replaced."""
    other = _copy(finished, tmp_path / "other")
    run = _copy(finished, tmp_path / "run")
    before = _files(run)
    resume = f"train.resume={os.path.join(other, 'checkpoint.pth')}"
    with pytest.raises(ConfigError, match=r"would continue in output_dir .*run, which holds another run"):
        engine.fit(tiny_config(shapes_root, run, "train.epochs=2", resume))
    assert _files(run) == before
    # Its own checkpoint named by path is the run itself; another run's into a new folder is a continuation.
    engine.fit(
        tiny_config(shapes_root, run, "train.epochs=2", "train.eval_every=0", f"train.resume={run}/checkpoint.pth")
    )
    engine.fit(tiny_config(shapes_root, str(tmp_path / "new"), "train.epochs=2", "train.eval_every=0", resume))
    assert read_checkpoint(str(tmp_path / "new" / "checkpoint.pth")).entries["epoch"] == 1


def _log(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resuming_another_runs_checkpoint_starts_with_its_log(finished, shapes_root, tmp_path, capsys) -> None:
    """train.resume=PATH of another run into a new output_dir: log.jsonl starts with the records of the log beside
    PATH before the epoch it resumes at (plots show the whole history), and an epoch that run logged is not said to
    be unlogged; without that log the history is said to be unavailable, and the resumed epoch is logged from the
    checkpoint's training record."""
    source = _copy(finished, tmp_path / "source")
    source_log = os.path.join(source, "log.jsonl")
    with open(source_log, "a") as f:  # an epoch after the checkpoint's, as beside a periodic copy
        f.write(json.dumps({"epoch": 1, "lr": 1.0}) + "\n")
    resume = f"train.resume={os.path.join(source, 'checkpoint.pth')}"

    def resumed(name: str) -> tuple[list[dict], str]:
        engine.fit(tiny_config(shapes_root, str(tmp_path / name), "train.epochs=2", "train.eval_every=0", resume))
        return _log(str(tmp_path / name)), capsys.readouterr().out

    records, out = resumed("copied")
    assert f"starts with the run's history: the 1 record(s) of epochs before 1 in {source_log}" in out
    assert "not logged" not in out
    assert records[:1] == _log(finished) and [r["epoch"] for r in records] == [0, 1] and records[1]["lr"] != 1.0

    open(source_log, "w").close()  # that run stopped before logging epoch 0
    records, out = resumed("unlogged")
    assert f"epoch 0 was saved but not logged in {source_log} (the run stopped before)" in out
    assert [r["epoch"] for r in records] == [0, 1]

    os.remove(source_log)
    records, out = resumed("no_log")
    assert "has no log.jsonl beside it: the history of its run before epoch 0 is not available" in out
    assert "epoch 0: logging the training record" in out and "not logged" not in out
    assert [r["epoch"] for r in records] == [0, 1] and records[0]["train_loss"] == _log(finished)[0]["train_loss"]


def test_resuming_another_runs_checkpoint_takes_its_best_checkpoint(finished, shapes_root, tmp_path, capsys) -> None:
    """The history taken names a best epoch: its checkpoint_best.pth is copied with it, unless that run's best came
    later than the epochs taken (then where it stands is said)."""
    source = _copy(finished, tmp_path / "source")
    source_log = os.path.join(source, "log.jsonl")
    records = _log(source)
    with open(source_log, "w") as f:
        f.write(json.dumps({**records[0], "AP": 0.5}) + "\n")
    best = Path(source) / "checkpoint_best.pth"
    best.write_bytes((Path(source) / "checkpoint.pth").read_bytes())
    resume = f"train.resume={os.path.join(source, 'checkpoint.pth')}"
    engine.fit(tiny_config(shapes_root, str(tmp_path / "taken"), "train.epochs=2", "train.eval_every=0", resume))
    out = capsys.readouterr().out
    assert f"the best epoch of that history is 0 (AP 0.500): its checkpoint, {best}, copied to" in out
    assert (tmp_path / "taken" / "checkpoint_best.pth").read_bytes() == best.read_bytes()
    with open(source_log, "a") as f:  # that run found a better epoch after the one resumed from
        f.write(json.dumps({"epoch": 1, "AP": 0.9}) + "\n")
    engine.fit(tiny_config(shapes_root, str(tmp_path / "later"), "train.epochs=2", "train.eval_every=0", resume))
    assert "whose checkpoint is not in" in capsys.readouterr().out
    assert not (tmp_path / "later" / "checkpoint_best.pth").exists()


def test_an_epoch_saved_but_not_logged_is_evaluated_and_logged_on_resume(shapes_root, tmp_path, monkeypatch) -> None:
    """An evaluation that fails (or a kill during it) comes after the checkpoint is saved: resuming logs that epoch
    from the training record the checkpoint holds, evaluated, and writes its periodic copy."""
    run = str(tmp_path / "run")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise FileNotFoundError("an image went missing")

    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", failing)
    with pytest.raises(FileNotFoundError):
        engine.fit(tiny_config(shapes_root, run, "train.epochs=2", "train.checkpoint_every=1"))
    assert calls and (not os.path.exists(os.path.join(run, "log.jsonl")) or _log(run) == [])
    os.remove(os.path.join(run, "checkpoint_0000.pth"))  # as if killed before the copy, too
    monkeypatch.setattr(engine, "evaluate", real)
    engine.fit(tiny_config(shapes_root, run, "train.epochs=2", "train.checkpoint_every=1", "train.resume=auto"))
    records = _log(run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all("AP" in r and r["train_loss"] > 0 for r in records)
    assert os.path.isfile(os.path.join(run, "checkpoint_0000.pth"))
    assert os.path.isfile(os.path.join(run, "checkpoint_0001.pth"))


def test_the_log_holds_strict_json_and_skipped_steps_leave_the_gradient_norm_finite(tmp_path, monkeypatch) -> None:
    from deformable.training.run_log import append_log

    path = str(tmp_path / "log.jsonl")
    append_log(path, {"epoch": 0, "train_grad_norm": float("nan"), "lr": float("inf"), "AP": 0.5})
    with open(path) as f:
        assert json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"{name} in log.jsonl")) == {
            "epoch": 0,
            "train_grad_norm": None,
            "lr": None,
            "AP": 0.5,
        }
    norms = iter([float("inf"), 2.0, 4.0])  # fp16: the scaler skipped the first step (overflow)
    monkeypatch.setattr(engine, "_backward_step", lambda *args: next(norms))
    model = build_detector(load_config(SHAPES_CONFIG, TINY_MODEL))

    def criterion(outputs, targets):
        loss = outputs["pred_logits"].float().mean() * 0 + 1.0
        return {"loss": loss, "loss_ce": loss}

    criterion.train = lambda: None
    batch = (torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), [{}])
    stats = engine.train_one_epoch(
        model, criterion, [batch] * 3, torch.optim.SGD(model.parameters(), lr=0.0), epoch=0, device=torch.device("cpu")
    )
    assert stats["grad_norm"] == pytest.approx(3.0) and stats["loss"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["missing", "no-layout"])
def test_a_data_root_without_data_is_refused_before_anything_is_written(tmp_path, capsys, kind) -> None:
    """A data.root that does not exist, or holds none of the layouts, is refused before output_dir is created:
    a mistyped path leaves no empty run folder behind (training, and evaluating a checkpoint)."""
    root = tmp_path / "data"
    if kind == "no-layout":
        root.mkdir()
        (root / "notes.txt").write_text("x")
    out = tmp_path / "run"
    args = [*tiny_overrides(str(root), str(out)), "data.synthetic="]
    assert train_tool.main([SHAPES_CONFIG, *args]) == 1
    expected = "does not exist" if kind == "missing" else "matches none of the layouts"
    assert f"data.root {root} {expected}" in capsys.readouterr().err
    assert not out.exists()
    model = build_detector(tiny_config(str(root), str(out)))
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    with pytest.raises(DatasetError, match=expected):
        engine.evaluate_checkpoint(
            tiny_config(str(root), str(out), "data.synthetic=", "train.device=cpu"), str(checkpoint)
        )
    assert not out.exists()


def _hold_lock(folder: str) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock (a second training run there), until killed."""
    code = (
        "import sys, time\nfrom deformable.training.run_lock import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, folder], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(
    finished, shapes_root, tmp_path, capsys
) -> None:
    """Two runs writing one output_dir (the same command in two terminals, resume=auto while the first still runs,
    workers that outlived a killed torchrun) would interleave their checkpoints and log lines: the second is refused,
    naming the first, with nothing touched. The lock dies with its process (kill -9 too) and is removed at the end of
    a run: the folder keeps only the run's files."""
    run = _copy(finished, tmp_path / "run")
    before = _files(run)
    holder = _hold_lock(run)
    try:
        assert train_tool.main([SHAPES_CONFIG, *tiny_overrides(shapes_root, run, "train.resume=auto")]) == 1
        err = capsys.readouterr().err
        assert f"output_dir {run} is in use by another training run (process {holder.pid} on " in err, err
        assert _files(run) == before and sorted(os.listdir(run)) == sorted([*before, LOCK_NAME])
        assert (Path(run) / LOCK_NAME).read_text() == f"process {holder.pid} on {socket.gethostname()}\n"
    finally:
        holder.kill()  # SIGKILL: the system releases the lock
        holder.wait()
    with ExitStack() as held:  # free again; and the lock file a killed holder left is reused, then removed
        held.enter_context(run_lock(run))
        assert (Path(run) / LOCK_NAME).read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
    assert _files(run) == before and sorted(os.listdir(run)) == sorted(before)
    engine.fit(tiny_config(shapes_root, run, "train.epochs=2", "train.eval_every=0", "train.resume=auto"))
    assert read_checkpoint(os.path.join(run, "checkpoint.pth")).entries["epoch"] == 1
    assert LOCK_NAME not in os.listdir(run)
