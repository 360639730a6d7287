"""The run lifecycle: run directories are never mixed or overwritten silently, resuming does
what it says (the keys that may change take effect, the others are refused), sampling and
evaluation never write training outputs, every CLI argument is checked before any work, and
an interrupted or NaN-stopped run says exactly how to continue."""

from __future__ import annotations

import json
import shlex
import shutil
import stat

import pytest

from selfflow import cli
from selfflow.core import checkpoint as ckpt
from selfflow.core import loop as loop_module
from selfflow.core.loop import warmup_schedule
from selfflow.core.train_step import NonFiniteLossError
from selfflow.registry import compose
from selfflow.registry.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread_module")

# the debug recipe, smaller: 4 steps, a checkpoint every 2, a log row every step
TINY = [
    "run.steps=4",
    "run.batch_size=8",
    "output.progress=false",
    "output.checkpoint_every=2",
    "output.log_every=1",
    "output.samples=false",
]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (directories as ``None``)."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None) for p in directory.rglob("*")}


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def error_and_hint(capsys) -> tuple[str, str]:
    """The CLI's stderr is one ``error:`` line and one ``hint:`` line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 2, err
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    return lines[0], lines[1]


def one_error(capsys) -> str:
    return error_and_hint(capsys)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 4-step run (checkpoints at steps 2 and 4); tests copy it."""
    root = tmp_path_factory.mktemp("lifecycle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFFLOW_CACHE", str(root / "cache"))
        assert cli.main(["train", "debug", "--out", str(root / "base"), *sets(*TINY)]) == 0
    return root


@pytest.fixture
def run_dir(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(trained / "cache"))
    dest = tmp_path / "run"
    shutil.copytree(trained / "base", dest)
    return dest


# ----------------------------------------------------------------------------- run directories


def test_a_fresh_run_into_an_existing_run_is_refused(run_dir, capsys):
    before = snapshot(run_dir)
    assert cli.main(["train", "debug", "--out", str(run_dir), *sets(*TINY)]) == 2
    err = one_error(capsys)
    assert f"--out {run_dir} already holds a run" in err
    assert f"--resume {run_dir}" in err and "new --out" in err and "--overwrite" in err
    assert snapshot(run_dir) == before


def test_overwrite_replaces_the_run_outputs_and_keeps_other_files(run_dir, capsys):
    (run_dir / "notes.txt").write_text("mine")
    assert cli.main(["train", "debug", "--out", str(run_dir), "--overwrite", *sets(*TINY, "run.steps=1")]) == 0
    assert [r["step"] for r in rows(run_dir)] == [1]  # not appended to the old log
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_0000001"]
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert "steps = 1" in (run_dir / "config.toml").read_text()


def test_the_default_directory_is_numbered_afresh(tmp_path):
    cfg = load_config(
        "[modalities.image]\ndataset = 'image/digits'\ntokenizer = 'image/patch'",
        [
            f'run.output_dir="{tmp_path}/{{name}}"',
        ],
    )
    assert compose.output_dir(cfg, fresh=True) == tmp_path / "run"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")
    assert compose.output_dir(cfg, fresh=True) == tmp_path / "run-1"


def test_an_output_dir_placeholder_typo_is_caught_when_the_config_loads():
    with pytest.raises(ConfigError) as err:
        load_config(
            "[modalities.image]\ndataset = 'image/digits'\ntokenizer = 'image/patch'", ['run.output_dir="runs/{nme}"']
        )
    assert str(err.value) == "config key 'run.output_dir': unknown placeholder {nme} in 'runs/{nme}'; use {name}"


def test_resuming_from_an_older_checkpoint_keeps_the_later_ones(run_dir, capsys):
    older = run_dir / "checkpoints" / "step_0000002"
    before = snapshot(run_dir)
    assert cli.main(["train", "--resume", str(older)]) == 2
    err = one_error(capsys)
    assert "is older than this run's checkpoints step_0000004" in err and "--out NEW" in err and "--overwrite" in err
    assert snapshot(run_dir) == before
    # --overwrite: the later checkpoint goes, the log is cut at the checkpoint's step
    assert cli.main(["train", "--resume", str(older), "--overwrite", *sets("run.steps=2")]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_0000002"]
    assert [r["step"] for r in rows(run_dir)] == [1, 2]


def test_resume_into_another_directory_is_a_branch(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    branch = tmp_path / "branch"
    older = run_dir / "checkpoints" / "step_0000002"
    assert cli.main(["train", "--resume", str(older), "--out", str(branch), *sets("run.steps=3")]) == 0
    source_rows = rows(run_dir)
    assert rows(branch)[:2] == source_rows[:2] and [r["step"] for r in rows(branch)] == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(branch / "checkpoints")] == ["step_0000003"]
    assert snapshot(run_dir) == before  # the source run is untouched
    # a branch never goes into another run's directory
    other = snapshot(branch)
    assert cli.main(["train", "--resume", str(run_dir), "--out", str(branch), *sets("run.steps=5")]) == 2
    err = one_error(capsys)
    assert f"--out {branch} already holds another run" in err and f"--resume {branch}" in err
    assert snapshot(branch) == other and snapshot(run_dir) == before


def test_a_checkpoint_outside_a_run_needs_an_out(run_dir, tmp_path, capsys):
    loose = tmp_path / "loose" / "step_0000004"
    shutil.copytree(run_dir / "checkpoints" / "step_0000004", loose)
    assert cli.main(["train", "--resume", str(loose)]) == 2
    assert "is not in a run's checkpoints/ folder" in one_error(capsys)
    assert sorted(p.name for p in (tmp_path / "loose").iterdir()) == ["step_0000004"]


# ----------------------------------------------------------------------------- resume and --set


def test_a_new_lr_on_resume_is_used_and_recorded(run_dir):
    assert cli.main(["train", "--resume", str(run_dir), *sets("run.steps=6", "optimizer.lr=1e-4")]) == 0
    resumed = rows(run_dir)[4:]
    # debug warms up over 5 steps: the update after step 4 runs at the full (new) peak
    assert [r["step"] for r in resumed] == [5, 6] and [r["lr"] for r in resumed] == [1e-4, 1e-4]
    assert load_config((run_dir / "config.toml").read_text()).optimizer.lr == 1e-4
    state = ckpt.read_state(run_dir)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert load_config(state["extra"]["config_toml"]).optimizer.lr == 1e-4


def test_the_schedule_continues_from_the_new_peak(run_dir):
    """A resume with another peak lr and schedule: the next step's rate is the new peak times
    the new schedule's factor at the checkpoint's step."""
    over = ["optimizer.lr=2e-4", "optimizer.schedule='cosine'", "optimizer.warmup_steps=0", "run.steps=10"]
    cfg = compose.resume_config(run_dir, over)
    run = compose.build_run(cfg, resume=run_dir)
    factor = warmup_schedule(0, 10, "cosine", cfg.optimizer.final_lr_fraction)(4)
    group = run.state.optimizer.param_groups[0]
    assert group["lr"] == 2e-4 * factor and group["initial_lr"] == 2e-4
    assert run.state.lr_schedule.base_lrs == [2e-4] and run.state.lr_schedule.get_last_lr() == [2e-4 * factor]
    assert run.loop.step().lr == 2e-4 * factor  # the first step after the resume uses it


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.width=128", "model.width"),
        ("run.seed=3", "run.seed"),
        ("run.batch_size=16", "run.batch_size"),
        ("ema.decay=0.5", "ema.decay"),
        ("objective.gamma=0.5", "objective.gamma"),
        ("optimizer.betas=[0.8, 0.9]", "optimizer.betas"),
        ("streams[0].dataset_options={size = 16}", "streams[0].dataset_options.size"),
    ],
)
def test_keys_that_cannot_change_on_resume_are_refused(run_dir, capsys, override, key):
    before = snapshot(run_dir)
    assert cli.main(["train", "--resume", str(run_dir), "--set", override]) == 2
    err = one_error(capsys)
    assert f"config key '{key}' cannot change on resume" in err and "start a new run" in err
    assert snapshot(run_dir) == before


def test_run_steps_below_the_checkpoint_is_refused(run_dir, capsys):
    assert cli.main(["train", "--resume", str(run_dir), "--set", "run.steps=3"]) == 2
    assert "config key 'run.steps': 3 is below the step 4" in one_error(capsys)


def test_a_checkpoint_of_another_model_is_one_line(run_dir):
    before = snapshot(run_dir)
    text = (run_dir / "config.toml").read_text().replace("[model]", "[model]\nwidth = 32")
    with pytest.raises(ConfigError, match="config key 'model.width' cannot change on resume"):
        compose.build_run(load_config(text), resume=run_dir)  # training: the config is refused first
    # what the config cannot show (say a tokenizer that now makes other channels) the model check does
    with pytest.raises(ckpt.CheckpointError) as err:
        compose.build_run(load_config(text), resume=run_dir, read_only=True)
    message = str(err.value)
    assert "was written by another model (width 64 in the checkpoint, 32 here)" in message
    assert "\n" not in message and len(message) < 400
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- read-only commands


def test_sample_and_eval_never_write_the_run(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    modes = {p: p.stat().st_mode for p in [run_dir, *run_dir.rglob("*")]}
    for p in modes:
        p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
    try:
        assert cli.main(["sample", str(run_dir), "--n", "1"]) == 2
        assert "is read-only" in one_error(capsys)
        assert cli.main(["eval", str(run_dir), "--samples", "8", "--metric", "fd"]) == 2
        assert "--out DIR" in one_error(capsys)
        older = str(run_dir / "checkpoints" / "step_0000002")  # an older checkpoint once cut the log
        assert cli.main(["sample", older, "--n", "1", "--out", str(tmp_path / "drawn")]) == 0
        assert (tmp_path / "drawn" / "step_0000002.png").is_file()
        reports = tmp_path / "reports"
        assert cli.main(["eval", older, "--samples", "8", "--metric", "fd", "--out", str(reports)]) == 0
        assert (
            cli.main(
                ["eval", older, "--samples", "8", "--metric", "fd", "--sampler", "ode/heun", "--out", str(reports)]
            )
            == 0
        )
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert snapshot(run_dir) == before
    keyed = sorted(reports.glob("eval_step_0000002-*.json"))
    assert len(keyed) == 2  # two protocols, two reports
    first, second = (json.loads(p.read_text()) for p in keyed)
    assert {first["protocol"]["sampler"], second["protocol"]["sampler"]} == {"ode/euler", "ode/heun"}
    assert {p.stem.split("-")[1] for p in keyed} == {first["protocol_key"], second["protocol_key"]}
    assert json.loads((reports / "eval_step_0000002.json").read_text())["protocol"]["sampler"] == "ode/heun"  # latest


SAMPLE_ERRORS = [
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "-3"], "--n must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1 (sampler steps), got 0"),
    (["--cfg", "-1"], "--cfg must be at least 0"),
    (["--labels", "a,b"], "--labels expects comma-separated class ids, e.g. --labels 3,7; got 'a,b'"),
    (["--labels", "12"], "--labels [12] are outside 0..9"),
    (["--stream", "nope"], "--stream 'nope' is not a stream of the run; its streams are ['image/digits']"),
    (["--sampler", "ode/eulr"], "unknown sampler 'ode/eulr'; did you mean 'ode/euler'"),
]
EVAL_ERRORS = [
    (["--samples", "-5"], "--samples must be at least 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--metric", "fid"], "unknown metric 'fid'; did you mean 'fd'"),
    (["--metric", "fd@audio"], "modality 'audio' is not generated by the run"),
    (["--metric", "fd@"], "--metric 'fd@': expected NAME or NAME@MODALITY"),
    (["--metric", "linear-probe", "--real"], "metric 'linear-probe' is a model probe"),
]
TRAIN_ERRORS = [
    (["--device", "cdua"], "--device 'cdua' is not a torch device"),
    (["--overwrite"], "--overwrite replaces the run in --out DIR"),
    (["--set", 'run.output_dir="x/{nme}"'], "config key 'run.output_dir': unknown placeholder {nme}"),
]


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [("sample", a, m) for a, m in SAMPLE_ERRORS]
    + [("eval", a, m) for a, m in EVAL_ERRORS]
    + [("train", a, m) for a, m in TRAIN_ERRORS],
)
def test_arguments_are_checked_before_any_work(run_dir, capsys, monkeypatch, command, args, message):
    def never(*_, **__):
        raise AssertionError("a run was built before the arguments were checked")

    monkeypatch.setattr(compose, "build_run", never)
    before = snapshot(run_dir)
    target = ["debug"] if command == "train" else [str(run_dir)]
    assert cli.main([command, *target, *args]) == 2
    assert message in one_error(capsys)
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- interrupts and bad steps


def test_ctrl_c_names_the_checkpoint_and_the_command_that_continues(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFFLOW_CACHE", str(trained / "cache"))
    real = loop_module.train_step

    def interrupted_after_3(state, micro_batches, **kw):
        if state.step == 3:
            raise KeyboardInterrupt
        return real(state, micro_batches, **kw)

    monkeypatch.setattr(loop_module, "train_step", interrupted_after_3)
    out = tmp_path / "run"
    assert cli.main(["train", "debug", "--out", str(out), *sets(*TINY)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = out / "checkpoints" / "step_0000003"
    assert err[-2] == f"interrupted at step 3; checkpoint {checkpoint}"
    assert err[-1] == f"hint: continue with: selfflow train --resume {checkpoint}"
    monkeypatch.setattr(loop_module, "train_step", real)
    command = shlex.split(err[-1].removeprefix("hint: continue with: "))
    assert cli.main(command[1:]) == 0
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(trained / "base")]  # as if never stopped


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the guard warns about each skipped step
def test_the_nan_hint_resumes_with_a_lower_lr(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFFLOW_CACHE", str(trained / "cache"))
    real = loop_module.train_step

    def nan_after_step_3(state, micro_batches, **kw):
        if state.step >= 3:
            raise NonFiniteLossError(f"loss is nan at step {state.step}", step=state.step, component="flow")
        return real(state, micro_batches, **kw)

    monkeypatch.setattr(loop_module, "train_step", nan_after_step_3)
    out = tmp_path / "run"
    assert cli.main(["train", "debug", "--out", str(out), *sets(*TINY, "guard.max_consecutive_skips=2")]) == 2
    error, hint = error_and_hint(capsys)
    sane = out / "checkpoints" / "step_0000002"  # the newest checkpoint before the bad steps
    assert str(sane) in error
    prefix = "hint: resume with a lower learning rate: "
    assert hint == f"{prefix}selfflow train --resume {sane} --set optimizer.lr=0.0001"
    monkeypatch.setattr(loop_module, "train_step", real)
    assert cli.main(shlex.split(hint.removeprefix(prefix))[1:]) == 0
    resumed = rows(out)[2:]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["lr"] for r in resumed] == pytest.approx([1e-4 * 3 / 5, 1e-4 * 4 / 5])  # debug warms up over 5 steps
