"""Plumbing tests: flags and one-line errors, data, checkpoints and bitwise resume, the run directory,
the scripts end to end, evaluation bookkeeping, the ablation grids and their launchers (local,
submitit, a real SLURM when one is up). Subprocess tests are marked `slow`.

    python -m pytest -q test_plumbing.py
"""

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import ablate
import cli
import common
import ddil_dmd2
import ddil_lcm as lcm
import ddil_pd
import eval as evaluation
import metrics
import gmm
import report
import runs
import scoring
from conftest import PY, ROOT, GaussianDenoiser, assert_same_nets, dm_loss, kill_after, read_log, run


# --- The import graph ---

def test_the_import_graph_has_no_circles_and_nothing_imports_upward():
    """Layers, bottom up: unet and common (the maths: no project import), gmm, runs (plumbing), cli, metrics
    and report (the tables from records), scoring, the teacher and the three method files, then the scripts on top (eval, ablate, bench). A module
    imports only lower layers, statically or through importlib (the scripts load method files by name)."""
    import ast
    layers = [{"unet", "common"}, {"gmm"}, {"runs"}, {"cli", "metrics", "report"}, {"scoring"}, {"teacher"},
              {"ddil_pd", "ddil_lcm", "ddil_dmd2"}, {"eval", "ablate", "bench"}]
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    project = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith("test_")
               and f != "conftest.py"}
    assert project == set(level), project ^ set(level)            # a new file is placed in a layer

    def imports(name):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        found |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        dynamic = {node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "attr", "")
                   == "import_module"}
        if dynamic:                                               # importlib.import_module("ddil_" ...): methods
            found |= {"ddil_pd", "ddil_lcm", "ddil_dmd2", "teacher"}
        return (found & project) - {name}
    upward = [(m, n) for m in project for n in imports(m) if level[n] >= level[m] and not (m == n)]
    assert not upward, upward
    assert imports("common") == set() and imports("unet") == set()


# --- Flags (DESIGN §4, §7) ---

def _parse(argv, default_source="fwd"):
    p = cli.add_ddil_args(cli.add_common_args(cli.Parser(prog="x")))
    args = p.parse_args(argv)
    presets = {"smoke": dict(dataset="synthetic", iters=10, batch_size=4, lr=1e-3, ema=0.9, guidance=1.0,
                             log_every=1, save_every=1, eval_every=0, eval_samples=0)}
    return cli.resolve(p, args, "m", {**presets, "cifar10": presets["smoke"]}, default_source)


def test_beta_flags_bare_explicit_default_and_ddil():
    base = ["--preset", "smoke"]
    assert _parse(base + ["--beta-fwd"]).priors == [1.0, 0.0, 0.0]
    assert _parse(base + ["--beta-fwd", "--beta-student"]).priors == [0.5, 0.0, 0.5]
    assert _parse(base + ["--beta-fwd", "3", "--beta-teacher", "1"]).priors == [0.75, 0.25, 0.0]
    assert _parse(base).priors == [1.0, 0.0, 0.0]
    assert _parse(base, default_source="student").priors == [0.0, 0.0, 1.0]
    a = _parse(base + ["--ddil"])
    assert a.priors == pytest.approx([0.5, 0.1, 0.4]) and a.prior_schedule == "linear"
    assert (a.prior_warmup, a.buffer_size, a.buffer_refresh, a.prior_start) == (0.3, 4096, 0.25, [1, 0, 0])
    a = _parse(base + ["--ddil", "--beta-student", "0.9", "--prior-schedule", "cosine", "--buffer-size", "0"])
    assert a.priors == pytest.approx([0.5 / 1.5, 0.1 / 1.5, 0.9 / 1.5]) and a.prior_schedule == "cosine"
    assert a.buffer_size == 0
    assert "ddil" in a.out and "beta_student=0.9" in a.out and a.out.endswith("-s0")
    b = _parse(base + ["--reflected"])
    assert b.threshold_teacher and b.threshold_student


@pytest.mark.parametrize("argv, needle", [
    (["--beta-fwd", "-1"], "--beta-fwd"), (["--beta-teacher", "abc"], "--beta-teacher"),
    (["--beta-student", "nan"], "--beta-student"), (["--prior-schedule", "exp"], "--prior-schedule"),
    (["--prior-start", "1,2"], "--prior-start"), (["--expert-prob", "1.5"], "--expert-prob")])
def test_invalid_flags_are_one_line_errors_naming_the_flag(argv, needle):
    with pytest.raises(SystemExit) as e:
        _parse(["--preset", "smoke", *argv])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_all_zero_weights_is_an_error():
    with pytest.raises(common.UserError, match="--beta-fwd/--beta-teacher/--beta-student"):
        _parse(["--preset", "smoke", "--beta-fwd", "0", "--beta-student", "0"])


@pytest.mark.slow
def test_bad_input_from_the_command_line_never_prints_a_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    cases = [["ddil_pd.py", "--beta-fwd", "-2"], ["ddil_pd.py", "--beta-fwd", "0"],
             ["ddil_pd.py", "--prior-schedule", "warm"], ["teacher.py", "--data-dir", str(tmp_path / "missing.zip")],
             ["teacher.py", "--out", str(bad)]]
    for script, *argv in cases:
        r = run([script, "--preset", "smoke", *argv])
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (bad / "ckpt.pt").read_bytes() == b"PK\x03\x04 truncated"     # never overwritten


@pytest.mark.slow
def test_nonsense_values_and_bad_files_are_one_line_errors(tmp_path, teacher_ckpt, monkeypatch):
    # Each one used to be accepted silently or to end in a traceback.
    for module in (ddil_pd, lcm, ddil_dmd2):
        for argv, needle in ((["--lr", "0"], "--lr"), (["--lr=-1e-4"], "--lr"), (["--ema", "5"], "--ema"),
                             (["--guidance=-1"], "--guidance"), (["--device", "cuda"], "CUDA is not available"),
                             (["--device", "tpu9"], "--device")):
            with pytest.raises((common.UserError, SystemExit), match=needle):   # parse error or check
                module.parse_args(["--preset", "smoke", *argv])
    import teacher
    with pytest.raises(SystemExit, match="--lr: '0' must be > 0"):
        teacher.parse_args(["--preset", "smoke", "--lr", "0"])
    student = tmp_path / "student.pt"
    runs.save_checkpoint(str(student), dict(step=1, unet={}, config={}, nets=dict(student={}, ema={})))
    with pytest.raises(common.UserError, match="distilled student"):
        runs.load_teacher(str(student), "cpu")
    # image folders: a member that is not an image, a member with a bad CRC
    import zipfile
    for name, corrupt in (("notimage", False), ("badcrc", True)):
        path = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("train/cat/0001.png", b"this is not a png" if not corrupt else _png_bytes())
        if corrupt:                                   # flip a byte of the stored member: its CRC no longer matches
            data = bytearray(path.read_bytes())
            i = data.index(b"IHDR")
            data[i + 10] ^= 0xFF
            path.write_bytes(bytes(data))
        with pytest.raises(common.UserError, match="train/cat/0001.png"):
            runs.load_images("cifar10", str(path))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run(["ddil_pd.py", "--preset", "smoke", "--teacher", teacher_ckpt, "--out", str(blocker / "run")])
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _png_bytes():
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_help_shows_every_presets_value():
    r = run(["ddil_pd.py", "--help"])
    assert "(default: None)" not in r.stdout and "(preset)" not in r.stdout
    flat = " ".join(r.stdout.split())
    assert "training iterations (preset: smoke 80, gmm 300, cifar10 40000, gmm2 1200, quick 100)" in flat
    assert "max-age" in flat and "(preset: smoke 20, gmm 20, cifar10 100, gmm2 20, quick 20)" in flat


def test_missing_cifar10_offline_is_one_line_naming_the_ways_out(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(common.UserError) as e:
        runs.load_images("cifar10")
    assert "--data-dir" in str(e.value) and "--dataset synthetic" in str(e.value)


# --- Data ---

def test_synthetic_dataset_is_deterministic_balanced_and_separable():
    x, y = runs.synthetic_dataset(500)
    x2, y2 = runs.synthetic_dataset(500)
    assert x.dtype == np.uint8 and x.shape == (500, 3, 32, 32) and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.bincount(y, minlength=10).tolist() == [50] * 10
    # Nearest class mean on raw pixels separates the palettes: a weak but real learnability check.
    warm = x[y < 5].reshape(-1, 3, 1024).mean(-1)
    cool = x[y >= 5].reshape(-1, 3, 1024).mean(-1)
    assert warm[:, 0].mean() > cool[:, 0].mean() + 10 and cool[:, 2].mean() > warm[:, 2].mean() + 10


@pytest.mark.skipif(not os.environ.get("DDIL_DATA"), reason="DDIL_DATA (the CIFAR-10 JPEG zip) not set")
def test_image_folder_zip_loads_real_cifar10_slice():
    from PIL import Image
    import io
    import zipfile
    path = os.environ["DDIL_DATA"]
    x, y = runs.load_images("cifar10", data_dir=path, limit=100)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8
    assert sorted(set(y.tolist())) == list(range(10))       # the spread slice keeps every class
    names = sorted(n for n in zipfile.ZipFile(path).namelist() if n.startswith("train/") and n.endswith(".jpg"))
    first = np.asarray(Image.open(io.BytesIO(zipfile.ZipFile(path).read(names[0]))).convert("RGB"))
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), first) and y[0] == 0     # airplane = class 0
    assert names[-1].split("/")[1] == "truck" and y[-1] == 9


# --- Checkpoints, resume, teacher ---

def test_run_log_writes_the_mean_of_the_steps_actually_taken(tmp_path):
    # A run resumed at step 7 with --log-every 5 logs at step 10 the mean of steps 8-10 (3 values), not
    # their sum over 5; a key added n times per step (DMD2's critic updates) is averaged over all n.
    log = runs.RunLog(str(tmp_path), 20, start_step=7)
    for step, v in ((8, 1.0), (9, 2.0), (10, 6.0)):
        log.add(loss=torch.tensor(v), count=step)
        log.add(critic=torch.tensor(v)), log.add(critic=torch.tensor(-v))
    log.write(10, lr=0.5)
    log.add(loss=torch.tensor(4.0))
    log.write(11)
    first, second = read_log(tmp_path)
    assert first["loss"] == 3.0 and first["count"] == 9.0 and first["critic"] == 0.0 and first["lr"] == 0.5
    assert second["loss"] == 4.0 and "critic" not in second                 # cleared by each write


def test_end_of_step_saves_once_and_evaluates_on_schedule(monkeypatch):
    # --save-every 4, --eval-every 6, 14 iterations: checkpoints at 4, 6 (for the evaluation), 8, 12 (both
    # schedules), 14 (last), each once; evaluations at 6 and 12 (the last step's is the run's final one, in
    # finish()).
    saves, evals = [], []
    args = argparse.Namespace(save_every=4, eval_every=6, eval_samples=50, iters=14, out="unused", device="cpu")
    stop = argparse.Namespace(requested=False)
    for step in range(1, 14):
        runs.end_of_step(args, step, lambda: saves.append(step), stop, lambda: evals.append(step))
    stop.requested = True                                  # Ctrl-C: save at this step, then stop (exit 130)
    with pytest.raises(common.Stopped, match="stopped at step 14"):
        runs.end_of_step(args, 14, lambda: saves.append(14), stop, lambda: evals.append(14))
    assert saves == [4, 6, 8, 12, 14] and evals == [6, 12]
    # --eval-at adds evaluations (a learning curve), each after its checkpoint; never at the last step (finish's).
    saves, evals = [], []
    args = argparse.Namespace(save_every=100, eval_every=0, eval_at=[2, 5, 14], eval_samples=50, iters=14)
    for step in range(1, 15):
        runs.end_of_step(args, step, lambda: saves.append(step), argparse.Namespace(requested=False),
                         lambda: evals.append(step))
    assert evals == [2, 5] and saves == [2, 5, 14]


@pytest.mark.slow
def test_non_finite_weights_are_never_saved_and_a_diverged_run_stops_with_one_line(tmp_path, teacher_ckpt):
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint(path, dict(step=4, nets=dict(student={"w": torch.ones(3)})))
    before = open(path, "rb").read()
    with pytest.raises(common.UserError, match="step 6: non-finite weights in student.w"):
        runs.save_checkpoint(path, dict(step=6, nets=dict(student={"w": torch.tensor([1.0, float("nan"), 0.0])})))
    assert open(path, "rb").read() == before                     # the last good checkpoint is kept
    with pytest.raises(common.UserError, match="step 3: loss nan"):
        runs.check_finite(2, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0))
    # A learning-rate blow-up on the smoke preset: NaN within a few steps; the run stops, exits non-zero, names
    # the step, and writes neither samples nor a non-finite checkpoint (LCM; DMD2's critic too).
    for script, extra in (("ddil_lcm.py", ["--lr", "1e6"]), ("ddil_dmd2.py", ["--lr", "1e6", "--lr-critic", "1e6"])):
        out = tmp_path / script
        r = run([script, "--preset", "smoke", "--iters", "8", "--batch-size", "4", "--save-every", "1",
                 "--log-every", "1", "--eval-samples", "0", "--teacher", teacher_ckpt, "--out", str(out), *extra])
        assert r.returncode == 1 and "done:" not in r.stdout, r.stdout[-500:]
        assert r.stderr.startswith("error: step ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (out / "samples.png").exists()
        if (out / "ckpt.pt").exists():
            ckpt = runs.load_checkpoint(str(out / "ckpt.pt"))
            assert all(bool(torch.isfinite(v).all()) for net in ckpt["nets"].values() for v in net.values()
                       if torch.is_floating_point(v))
    # DMD2's distribution-matching gradient no longer hides a NaN coming from the scores
    nan_teacher = GaussianDenoiser(torch.full((3, 32, 32), float("nan")))
    _, extra = dm_loss(torch.zeros(2, 3, 32, 32), nan_teacher, GaussianDenoiser(torch.zeros(3, 32, 32)))
    assert torch.isnan(extra["grad"]).all()


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:          # killed between a log write and the checkpoint
        f.writelines(json.dumps({"step": s}) + "\n" for s in (5, 10, 15))
    log = runs.RunLog(str(tmp_path), 20, start_step=10)       # resumed from the step-10 checkpoint
    log.write(15, loss=1.0)
    assert [r["step"] for r in read_log(tmp_path)] == [5, 10, 15]


@pytest.mark.slow
def test_a_run_directory_has_one_owner_and_one_configuration(tmp_path, teacher_ckpt):
    base = ["--preset", "smoke", "--batch-size", "2", "--eval-samples", "0", "--teacher", teacher_ckpt]
    out = tmp_path / "lcm"
    slow = subprocess.Popen([PY, "ddil_lcm.py", *base, "--iters", "400", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "log.jsonl").exists() and slow.poll() is None:
            time.sleep(0.1)
        r = run(["ddil_lcm.py", *base, "--iters", "400", "--out", str(out)])          # a second live process
        assert r.returncode == 75 and "in use by pid" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert runs.run_dir_in_use(str(out))                              # what ablate's status reads
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    assert not runs.run_dir_in_use(str(out))
    config = (out / "config.json").read_text()
    for script, argv, needle in (("ddil_dmd2.py", ["--iters", "400"], "holds a lcm run"),
                                 ("ddil_lcm.py", ["--iters", "500"], "other settings (iters 400 -> 500")):
        r = run([script, *base, *argv, "--out", str(out)])
        assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (out / "config.json").read_text() == config                     # nothing written
    runs.lock_run_dir(str(out))                  # the killed owner's lock is not stuck: this process gets it
    runs._LOCKS.pop(os.path.realpath(out)).close()


@pytest.mark.slow
def test_ctrl_c_exits_130_after_saving_and_a_finished_run_does_nothing(tmp_path, teacher_ckpt):
    argv = [PY, "ddil_lcm.py", "--preset", "smoke", "--batch-size", "2", "--iters", "300", "--eval-samples", "0",
            "--log-every", "1", "--teacher", teacher_ckpt, "--out", str(tmp_path / "a")]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not read_log(tmp_path / "a"):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "stopped at step" in out and "Traceback" not in err, err
    assert runs.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"] >= 1
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while len(read_log(tmp_path / "a")) < 3:                       # resumed and running again
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)                                  # a second Ctrl-C: stop now, one line
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    short = ["ddil_lcm.py", "--preset", "smoke", "--batch-size", "2", "--iters", "2", "--eval-samples", "0",
             "--teacher", teacher_ckpt, "--out", str(tmp_path / "b")]
    assert run(short).returncode == 0
    made = {f: os.stat(tmp_path / "b" / f).st_mtime_ns for f in ("samples.png", "ckpt.pt", "log.jsonl")}
    r = run(short)                                              # finished: says so, redoes nothing
    assert r.returncode == 0 and "is finished (step 2); nothing to do" in r.stdout
    assert {f: os.stat(tmp_path / "b" / f).st_mtime_ns for f in made} == made


def test_a_finished_run_needs_its_evaluation_at_the_asked_count(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), iters=5, reevaluate=False, eval_samples=8)
    (tmp_path / "samples.png").write_bytes(b"")
    assert not runs.finished(args, 5)                                   # no metrics.json yet
    (tmp_path / "metrics.json").write_text(json.dumps({"evals": {"8": {"step": 4}}}))
    assert not runs.finished(args, 5)                                   # evaluated at an older step
    (tmp_path / "metrics.json").write_text(json.dumps({"evals": {"8": {"step": 5}}}))
    assert runs.finished(args, 5) and not runs.finished(args, 4)
    assert not runs.finished(argparse.Namespace(**{**vars(args), "eval_samples": 16}), 5)   # another count
    assert not runs.finished(argparse.Namespace(**{**vars(args), "reevaluate": True}), 5)


def test_long_phases_print_progress_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert list(runs.progress(range(3), "phase", every=0.0)) == [0, 1, 2]
    assert capsys.readouterr().out.splitlines() == ["phase: 1/3 (0 s)", "phase: 2/3 (0 s)", "phase: 3/3 (0 s)"]
    log = runs.RunLog(str(os.path.dirname(__file__)) + "/nonexistent-dir", 10)
    log.tick(3, every=0.0)
    assert capsys.readouterr().out.startswith("step 3/10 |")


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(path, {"step": 2})
    assert runs.load_checkpoint(path)["step"] == 1
    with open(path, "r+b") as f:      # truncation (e.g. a full disk) is a one-line UserError
        f.truncate(100)
    with pytest.raises(common.UserError, match="unreadable checkpoint"):
        runs.load_checkpoint(path)


def test_a_second_ctrl_c_during_a_checkpoint_write_waits_for_the_write(tmp_path, monkeypatch):
    # It used to interrupt torch.save: torch's zip writer then raised over the exit (a traceback, exit 1).
    path, real = str(tmp_path / "ckpt.pt"), torch.save

    def interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)                      # the second Ctrl-C, mid-write
        real(obj, f)
    monkeypatch.setattr(torch, "save", interrupted)
    with runs.GracefulStop() as stop:
        stop.requested = True                                    # the first Ctrl-C asked for this save
        with pytest.raises(SystemExit) as e:
            runs.save_checkpoint(path, {"step": 3, "w": torch.ones(2)})
    assert e.value.code == 130 and runs.load_checkpoint(path)["step"] == 3 and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.slow
def test_teacher_resume_is_bitwise_identical(tmp_path, monkeypatch):
    """Interrupt (SIGINT at step 3, saved at the step boundary) -> rerun resumes -> same parameters
    as an uninterrupted run, on the CPU."""
    import teacher
    argv = ["--preset", "smoke", "--iters", "6", "--batch-size", "8", "--log-every", "2", "--save-every", "100",
            "--ch", "32", "--ch-mult", "1,2", "--sample-steps", "1"]
    teacher.main(argv + ["--out", str(tmp_path / "a")])
    original = common.ema_update
    calls = []

    def interrupt_at_third(*a, **k):
        original(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(common, "ema_update", interrupt_at_third)
    with pytest.raises(common.Stopped):                                    # stopped after saving
        teacher.main(argv + ["--out", str(tmp_path / "b")])
    assert runs.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 3
    monkeypatch.setattr(common, "ema_update", original)
    teacher.main(argv + ["--out", str(tmp_path / "b")])
    a, b = (runs.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in "ab")
    assert a["step"] == b["step"] == 6
    for net in ("model", "ema"):
        for k in a["nets"][net]:
            assert torch.equal(a["nets"][net][k], b["nets"][net][k]), (net, k)


@pytest.mark.slow
def test_smoke_teacher_loss_falls_and_leaves_run_files(tiny_teacher):
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (tiny_teacher / f).exists(), f
    losses = [json.loads(line)["loss"] for line in open(tiny_teacher / "log.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    cfg = json.load(open(tiny_teacher / "config.json"))
    assert cfg["method"] == "teacher" and cfg["iters"] == 24 and "torch" in cfg["versions"]


# --- (4) the smoke runs leave DESIGN §7's files; (5) a killed run resumes bit for bit ---

PD_RUN = ["ddil_pd.py", "--preset", "smoke", "--iters", "6", "--batch-size", "4", "--eval-samples", "0"]
PD_DDIL = ["--ddil", "--reflected", "--buffer-size", "32", "--save-every", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def pd_ddil_run(teacher_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pd_ddil"))
    r = run([*PD_RUN, *PD_DDIL, "--teacher", teacher_ckpt, "--out", out])
    assert r.returncode == 0, r.stderr
    return out


def _check_pd_run_files(out, iters, ddil):
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert os.path.exists(os.path.join(out, f)), f
    last = read_log(out)[-1]
    assert (last["step"], last["round"], last["n"]) == (iters, 2, 4)        # 16 -> 8 -> 4 steps
    assert {"loss", "loss_fwd", "frac_fwd", "frac_teacher", "frac_student", "clip_pct", "lr"} <= last.keys()
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["threshold_teacher"] == config["threshold_student"] == ddil
    if ddil:
        assert any(r.get("frac_student", 0) > 0 for r in read_log(out))


@pytest.mark.slow
def test_pd_smoke_runs_leave_run_files(teacher_ckpt, pd_ddil_run, tmp_path):
    r = run([*PD_RUN, "--teacher", teacher_ckpt, "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    _check_pd_run_files(str(tmp_path), 6, ddil=False)
    _check_pd_run_files(pd_ddil_run, 6, ddil=True)
    # Training moved the student off its teacher, and the two runs (baseline, DDIL) trained different students.
    teacher, base, ddil = (runs.load_checkpoint(p)["nets"]["ema"] for p in
                           (teacher_ckpt, str(tmp_path / "ckpt.pt"), os.path.join(pd_ddil_run, "ckpt.pt")))
    assert any(not torch.equal(base[k], teacher[k]) for k in teacher)
    assert any(not torch.equal(base[k], ddil[k]) for k in teacher)


@pytest.mark.slow
def test_pd_killed_run_resumes_bitwise(teacher_ckpt, pd_ddil_run, tmp_path):
    """SIGKILL twice: after the first checkpoint (step 2, round 1: the resumed run then crosses into
    round 2) and after a round-2 checkpoint (step 4: restores the round teacher and the replay buffer);
    the final weights equal those of the uninterrupted pd_ddil_run bit for bit."""
    out = str(tmp_path)
    cmd = [PY, *PD_RUN, *PD_DDIL, "--teacher", teacher_ckpt, "--out", out]
    for ready in (lambda: os.path.exists(os.path.join(out, "ckpt.pt")),
                  lambda: any(r["step"] >= 5 for r in read_log(out))):          # ckpt at step 4, round 2
        assert kill_after(cmd, ready), "the run finished before it could be killed"
    r = run(cmd[1:])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = assert_same_nets(os.path.join(pd_ddil_run, "ckpt.pt"), os.path.join(out, "ckpt.pt"), ("student", "ema"))
    assert a["step"] == 6 and b["round"] == 1


# --- ddil_lcm.py end to end, baseline and --ddil --reflected; a killed run resumes ---

LCM_FAST = ["ddil_lcm.py", "--preset", "smoke", "--iters", "6", "--eval-samples", "0", "--log-every", "2",
            "--batch-size", "8"]
# DDIL runs kept small: short teacher rollouts and a small replay buffer (same code paths as the defaults).
LCM_DDIL = ["--ddil", "--reflected", "--buffer-size", "16", "--teacher-rollout-steps", "8"]


@pytest.mark.slow
def test_lcm_clips_the_gradient_norm_at_one_by_default(teacher_ckpt, tmp_path, monkeypatch):
    # diffusers' LCM distillation script clips at max_grad_norm 1.0; PD and DMD2 here clip too.
    seen, real = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm, *a, **k: (seen.append(max_norm),
                                                                                         real(p, max_norm, *a, **k))[1])
    lcm.main(["--preset", "smoke", "--iters", "2", "--batch-size", "2", "--eval-samples", "0", "--log-every", "1",
              "--teacher", teacher_ckpt, "--out", str(tmp_path)])
    assert seen == [1.0, 1.0]
    assert all(r["grad_norm"] > 0 for r in read_log(tmp_path))
    assert lcm.parse_args(["--preset", "smoke", "--grad-clip", "0"]).grad_clip == 0


@pytest.fixture(scope="module")
def lcm_ddil_run(teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm_ddil")
    r = run([*LCM_FAST, *LCM_DDIL, "--teacher", teacher_ckpt, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["baseline", "ddil"])
def test_lcm_smoke_run_leaves_its_files(mode, teacher_ckpt, lcm_ddil_run, tmp_path):
    out = lcm_ddil_run if mode == "ddil" else tmp_path
    if mode == "baseline":
        r = run([*LCM_FAST, "--teacher", teacher_ckpt, "--out", str(out)])
        assert r.returncode == 0, r.stderr
    for name in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (out / name).is_file(), name
    ckpt = runs.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 6 and set(ckpt["nets"]) == {"student", "target", "ema"}
    last = read_log(out)[-1]
    assert "loss" in last and "frac_fwd" in last
    if mode == "ddil":
        assert ckpt["sampler"]["buffers"]["student"] is not None      # backward states reached the replay buffer


@pytest.mark.slow
def test_lcm_killed_run_resumes_bitwise(teacher_ckpt, lcm_ddil_run, tmp_path):
    cmd = [PY, *LCM_FAST, *LCM_DDIL, "--teacher", teacher_ckpt, "--out", str(tmp_path), "--save-every", "2"]
    assert kill_after(cmd, lambda: (tmp_path / "ckpt.pt").exists()), "the run finished before it could be killed"
    r = run(cmd[1:])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, _ = assert_same_nets(lcm_ddil_run / "ckpt.pt", tmp_path / "ckpt.pt", ("student", "target", "ema"))
    assert a["step"] == 6


# --- make_generator: K-step multistep consistency sampling, against a written-out loop ---

@pytest.mark.slow
def test_lcm_generator_is_multistep_consistency_sampling(lcm_ddil_run):
    ckpt = runs.load_checkpoint(str(lcm_ddil_run / "ckpt.pt"))
    assert ckpt["config"]["threshold_student"]                   # --reflected: the student's x̂_0 is clipped
    noise, labels, renoise = common.seeded_batch(range(4), "cpu")
    got = lcm.make_generator(ckpt, "cpu")(noise, labels, renoise)
    net = runs.build_unet(ckpt["unet"], "cpu")
    net.load_state_dict(ckpt["nets"]["ema"])
    z, labels, renoise = common.seeded_batch(range(4), "cpu")
    idx = [50, 38, 25, 13]                                       # LCM's 999, 759, 499, 259 on N = 50
    with torch.no_grad():
        for i, n in enumerate(idx):
            x0 = lcm.consistency_fn(net, z, torch.full((4,), n / 50), labels).clamp(-1, 1)   # x̂_0 = f_θ(z, τ_i)
            if i + 1 < len(idx):                                 # re-noise to τ_{i+1} with fresh ε
                a, sg = common.alpha_sigma(idx[i + 1] / 50)
                z = a * x0 + sg * renoise(z)
    torch.testing.assert_close(got, x0, atol=1e-5, rtol=1e-5)


# --- ddil_dmd2.py end to end (subprocesses on the tiny teacher) ---

DMD2_SMALL = ["ddil_dmd2.py", "--preset", "smoke", "--iters", "4", "--batch-size", "4", "--eval-samples", "0",
              "--log-every", "2"]


@pytest.mark.slow
def test_dmd2_beta_fwd_threshold_teacher_run_clips_the_teacher_and_nothing_else(teacher_ckpt, tmp_path):
    # The same seed with and without --threshold-teacher: the first step's critic update (which never calls
    # the teacher) is identical; the generator's DM loss differs exactly because the teacher's x̂_0 overshot.
    logs = {}
    for name, extra in (("clip", ["--threshold-teacher"]), ("raw", [])):
        out = tmp_path / name
        r = run([*DMD2_SMALL, "--teacher", teacher_ckpt, "--beta-fwd", *extra, "--iters", "1", "--log-every", "1",
                 "--out", str(out)])
        assert r.returncode == 0, r.stderr
        for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
            assert (out / f).exists(), f
        logs[name] = read_log(out)[0]
    clip, raw = logs["clip"], logs["raw"]
    assert clip["frac_fwd"] == 1 and clip["clip_pct"] == raw["clip_pct"] > 0       # the same raw estimates overshoot
    assert clip["critic_loss"] == raw["critic_loss"] and clip["loss"] != raw["loss"]


@pytest.mark.slow
def test_dmd2_ddil_reflected_run_resumes_bitwise_after_kill(teacher_ckpt, tmp_path):
    argv = [*DMD2_SMALL, "--save-every", "2", "--teacher", teacher_ckpt, "--ddil", "--reflected", "--buffer-size", "16"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = run([*argv, "--out", str(ref)])
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (ref / f).exists(), f
    assert kill_after([PY, *argv, "--out", str(out)], lambda: (out / "ckpt.pt").exists())
    killed_at = runs.load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert killed_at < 4
    r = run([*argv, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {killed_at}" in r.stdout
    a, _ = assert_same_nets(ref / "ckpt.pt", out / "ckpt.pt", ("student", "critic", "ema"))
    assert a["step"] == 4


@pytest.mark.slow
def test_dmd2_gan_head_trains_and_is_checkpointed(teacher_ckpt, tmp_path):
    out = tmp_path / "gan"
    r = run([*DMD2_SMALL, "--iters", "2", "--batch-size", "2", "--fake-updates", "1", "--gan-weight", "0.01",
             "--teacher", teacher_ckpt, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    ckpt = runs.load_checkpoint(str(out / "ckpt.pt"))
    head0 = ddil_dmd2.gan_head(ckpt["unet"]["ch"] * ckpt["unet"]["ch_mult"][-1]).state_dict()
    assert ckpt["nets"]["head"].keys() == head0.keys()
    log = read_log(out)[-1]
    assert {"gan_loss", "dm_grad_norm", "gan_grad_norm"} <= log.keys() and log["gan_grad_norm"] > 0


# --- Seeds, naming, metrics.json, command line ---

def test_samples_do_not_depend_on_batch_size():
    generate = lambda noise, labels, renoise: torch.tanh(noise + labels[:, None, None, None] / 5 + renoise(noise))
    a, la = scoring.generate_samples(generate, 11, "cpu", batch_size=3, progress=False)
    b, lb = scoring.generate_samples(generate, 11, "cpu", batch_size=7, progress=False)
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [i % 10 for i in range(11)]
    assert a.dtype == torch.uint8 and a.shape == (11, 3, 32, 32)


def test_every_preset_table_covers_the_same_presets():
    import teacher
    tables = {"teacher.PRESETS": teacher.PRESETS, "ddil_pd.PRESETS": ddil_pd.PRESETS, "ddil_lcm.PRESETS": lcm.PRESETS,
              "ddil_dmd2.PRESETS": ddil_dmd2.PRESETS, "cli.DDIL_PRESETS": cli.DDIL_PRESETS,
              "scoring.DEFAULT_SAMPLES": scoring.DEFAULT_SAMPLES, "runs.ETA_MIN": runs.ETA_MIN}
    for name, table in tables.items():
        assert set(table) == set(cli.PRESET_NAMES), name


def test_a_teacher_is_scored_at_the_sample_count_its_students_evaluate_at():
    for name, n in scoring.DEFAULT_SAMPLES.items():
        assert {m.PRESETS[name]["eval_samples"] for m in (ddil_pd, lcm, ddil_dmd2)} == {n}, name


def test_metric_names():
    assert metrics.metric_name("fid", 10_000, "train") == "fid10k_train"
    assert metrics.metric_name("fid", 100, "train", 500) == "fid100_train500"
    assert metrics.metric_name("precision", 10_000, "train", 10_000) == "precision10k_train10k"
    assert metrics.metric_name("lpips_div", 250) == "lpips_div250"
    assert metrics.metric_name("precision", 10_000, "train", 10_000, k=3) == "precision10k_train10k_k3"


def test_metric_networks_run_without_tf32_and_the_cache_knows_the_device(monkeypatch, tmp_path):
    # PyTorch allows TF32 in cuDNN convolutions by default: features would change from GPU to GPU.
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]
    monkeypatch.setitem(metrics.MEMO, ("inception", "cpu"), Recorder())
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    # The two flags are read and written through torch's own properties (cuBLAS serves its flag
    # from a module __getattr__), and restored here rather than by monkeypatch: its undo deletes
    # an instance attribute the module never had under some pytest versions.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        metrics.inception_features(images, "cpu", progress=False)
        metrics._logits(nn.Sequential(Recorder(), nn.Linear(2048, 10)), images.float())
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen and all(s == (False, False) for s in seen)
    assert after == (True, True)                                  # the caller's setting is restored
    ref = metrics.reference(images, "train", True, "cpu", progress=False)
    assert ref["key"].endswith("-cpu")


def test_non_finite_samples_are_an_error_and_nothing_is_scored_or_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    diverged = lambda noise, labels, renoise: torch.where(labels[:, None, None, None] == 3, float("nan"), noise)
    with pytest.raises(common.UserError, match="runs/x: 1 of 5 samples are not finite"):
        scoring.generate_samples(diverged, 5, "cpu", progress=False, label="runs/x")
    with pytest.raises(common.UserError, match="not finite"):
        scoring.teacher_samples(lambda z, t, y: z * float("inf"), 4, "cpu", 4, cache_key="bad")
    assert not os.listdir(tmp_path)


def test_an_optional_metric_without_weights_is_skipped_not_fatal(tmp_path, monkeypatch):
    # Offline, with no DDIL_LPIPS_BACKBONE and no ../shared copy, LPIPS cannot download AlexNet: the other
    # metrics are computed and metrics.json says what was skipped and why.
    import lpips
    monkeypatch.delenv("DDIL_LPIPS_BACKBONE", raising=False)
    monkeypatch.setattr(metrics, "SHARED_LPIPS", str(tmp_path / "absent.pt"))
    monkeypatch.setattr(lpips, "LPIPS", lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    images, labels = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(10)
    scores, info = scoring.score_samples(images, labels, train, None, "tiny", "cpu", progress=False)
    why = info["skipped"]["lpips_div10"]
    assert "DDIL_LPIPS_BACKBONE" in why and "lpips_div10" not in scores and "fid10_train" in scores
    path = str(tmp_path / "metrics.json")
    scoring.merge_metrics(path, scores, dict(n=10, **info))
    data = json.load(open(path))
    assert data["skipped"] == {"lpips_div10": why} and data["fid10_train"] == scores["fid10_train"]
    scoring.merge_metrics(path, {"lpips_div10": 0.3}, dict(n=10, skipped={}))   # computed later: no longer skipped
    assert "skipped" not in json.load(open(path))


def test_metrics_json_merges_sample_counts(tmp_path):
    path = str(tmp_path / "metrics.json")
    record = lambda n: dict(step=5, n=n, time_s=dict(total_s=1.0))
    scoring.merge_metrics(path, {"fid100_train500": 3.0}, record(100))
    scoring.merge_metrics(path, {"fid200_train500": 2.0}, record(200))
    scoring.merge_metrics(path, {"fid100_train500": 1.0}, record(100))
    data = json.load(open(path))
    assert data["fid100_train500"] == 1.0 and data["fid200_train500"] == 2.0
    assert sorted(data["evals"]) == ["100", "200"] and len(data["history"]) == 3


@pytest.mark.slow
def test_eval_cli_errors_are_one_line():
    with pytest.raises(common.UserError, match="exactly one of"):
        evaluation.main([])
    with pytest.raises(SystemExit, match="START:STOP"):
        evaluation.main(["--images", "x.zip", "--slice", "a:b"])
    with pytest.raises(common.UserError, match="not a run directory"):
        evaluation.main(["/nonexistent-run"])


# --- ablate.py: grids and paired statistics ---

STUDIED = {"priors": {"beta_fwd", "beta_teacher", "beta_student", "priors", "prior_schedule"},
           "threshold": {"threshold_teacher", "threshold_student", "threshold_critic", "sample_clip"}}


def test_ablation_rows_differ_only_in_the_studied_flags(monkeypatch):
    # The resolved configuration of every row (what the run actually trains with), compared across the rows
    # of each study: only the studied settings may differ; and each row resolves to what its name says.
    for m in ("pd", "lcm", "dmd2"):
        for study, keys in STUDIED.items():
            configs = {name: ablate.resolved_config(m, flags, "smoke", 0, []) for name, flags in ablate.grid(study, m, "smoke")}
            ref = configs[ablate.reference(study, m)]
            for name, cfg in configs.items():
                differ = {k for k in cfg.keys() | ref.keys() if cfg.get(k) != ref.get(k)}
                assert differ <= keys, (m, study, name, differ - keys)
        pri = {name: ablate.resolved_config(m, f, "smoke", 0, []) for name, f in ablate.grid("priors", m)}
        assert len(pri) == 7 and {c["buffer_size"] for c in pri.values()} == {4096}
        assert pri["fwd100"]["priors"] == [1, 0, 0] and pri["student100"]["priors"] == [0, 0, 1]
        assert pri["fwd50-student50"]["priors"] == [0.5, 0, 0.5]
        for s in ("constant", "linear", "cosine", "step"):
            assert pri[f"ddil-{s}"]["prior_schedule"] == s and pri[f"ddil-{s}"]["priors"] == pytest.approx([.5, .1, .4])
        assert {pri[k]["prior_schedule"] for k in ("fwd100", "student100", "fwd50-student50")} == {"constant"}
        th = {name: ablate.resolved_config(m, f, "smoke", 0, []) for name, f in ablate.grid("threshold", m)}
        where = {name: {k for k in STUDIED["threshold"] if c.get(k)} for name, c in th.items()}
        expect = {"none": set(), "sampling": {"sample_clip"}, "teacher": {"threshold_teacher"},
                  "student": {"threshold_student", "sample_clip"},
                  "teacher+student": {"threshold_teacher", "threshold_student", "sample_clip"}}
        if m == "dmd2":
            expect.update({"critic": {"threshold_critic"}, "teacher+critic": {"threshold_teacher", "threshold_critic"},
                           "all": STUDIED["threshold"]})
        assert where == expect, m
        paper = {name: ablate.resolved_config(m, f, "smoke", 0, []) for name, f in ablate.grid("paper", m, "smoke")}
        if m == "dmd2":     # the buffer-only row: the baseline plus the buffer, nothing else of DDIL
            differ = {k for k in paper["buffer"].keys() | paper["baseline"].keys()
                      if paper["buffer"].get(k) != paper["baseline"].get(k)}
            assert differ <= {"buffer_size", "buffer_refresh", "rollout_chunk", "max_age", "prior_schedule",
                              "beta_fwd", "beta_teacher", "beta_student"}, differ
            assert paper["buffer"]["priors"] == paper["baseline"]["priors"] and paper["buffer"]["buffer_size"] > 0
        assert "buffer" not in dict(ablate.grid("paper", m, "gmm"))        # the first benchmark's grid as published
        assert paper["baseline"]["priors"] == [float(s == importlib.import_module(f"ddil_{m}").BASELINE_SOURCE) for s in common.SOURCES]
        assert paper["baseline"]["sample_clip"] == (m == "pd")          # each method's official default
        assert paper["reflected-ddil"]["threshold_teacher"] and paper["reflected-ddil"]["threshold_student"]
        two = {name: ablate.resolved_config(m, f, "smoke", 0, []) for name, f in ablate.grid("paper2", m, "smoke")}
        assert list(two) == list(paper) and all(c["steps"] == 2 for c in two.values())       # paper at 2 steps
        assert all({k for k in c if c[k] != paper[name][k]} == {"steps"} for name, c in two.items()), m
    assert ablate.reference("priors", "dmd2") == "student100" and ablate.reference("priors", "pd") == "fwd100"
    assert ablate.parse_args(["--method", "lcm", "--study", "all", "--preset", "gmm2"])[0].study == list(ablate.STUDIES)
    assert ablate.parse_args(["--method", "lcm", "--study", "all", "--preset", "gmm"])[0].study == \
        ["priors", "threshold", "paper"]                                 # the first benchmark's grids as published
    for cuda, launch, preset in ((False, [], "gmm2"), (True, [], "cifar10"), (False, ["--launcher", "slurm"], "cifar10"),
                                 (False, ["--launcher", "slurm", "--gpus-per-job", "0"], "gmm2")):
        with monkeypatch.context() as m:                     # auto: cifar10 where GPUs are, else the benchmark that can answer
            m.setattr(torch.cuda, "is_available", lambda: cuda)
            assert ablate.parse_args(["--method", "lcm", "--study", "paper", *launch])[0].preset == preset, (cuda, launch)


@pytest.mark.slow
def test_a_runs_record_counts_its_own_cpu_time_beside_its_wall_time(tmp_path):
    # Oracle: the run's process reports its own CPU time (time.process_time). The record's cpu_s is that plus
    # the interpreter's start-up, and leaves out the second the run spends asleep, which wall_s includes.
    script = tmp_path / "burn.py"
    script.write_text("import json, os, sys, time\n"
                      "out = sys.argv[sys.argv.index('--out') + 1]\n"
                      "time.sleep(1.0)\n"
                      "t = time.process_time()\n"
                      "while time.process_time() - t < 0.5:\n    pass\n"
                      "json.dump({'own_cpu_s': time.process_time()}, open(os.path.join(out, 'metrics.json'), 'w'))\n")
    run = argparse.Namespace(name="burn-s0", argv=[str(script)], identity={"burn": 1}, settings=[],
                             record=lambda results: os.path.join(results, "records", "burn-s0"))
    assert ablate.RunJob(run, str(tmp_path / "runs"), str(tmp_path / "res"))() == "done"
    record = json.load(open(tmp_path / "res" / "records" / "burn-s0" / "ablate.json"))
    own = json.load(open(tmp_path / "res" / "records" / "burn-s0" / "metrics.json"))["own_cpu_s"]
    assert own <= record["cpu_s"] <= own + 2.0, (own, record)
    assert record["wall_s"] >= record["cpu_s"] + 0.9 and record["attempts"] == 1, record
    # A run resumed from attempts counted before CPU time was recorded: its CPU time is unknown, not partial.
    os.remove(tmp_path / "res" / "records" / "burn-s0" / "ablate.json")
    runs.write_json(str(tmp_path / "runs" / "burn-s0" / "attempts.json"), dict(attempts=1, wall_s=5.0))
    assert ablate.RunJob(run, str(tmp_path / "runs"), str(tmp_path / "res"))() == "done"
    record = json.load(open(tmp_path / "res" / "records" / "burn-s0" / "ablate.json"))
    assert record["cpu_s"] is None and record["attempts"] == 2 and record["wall_s"] > 6.0, record


@pytest.mark.slow
def test_a_grid_never_reuses_a_run_trained_with_other_settings(teacher_ckpt, tmp_path):
    # Rows shared between studies are one run; the same row with another budget (what follows `--`) is
    # another run, in its own directory: a 2000-iteration reference row never serves a 20000-iteration table.
    T = ["--teacher", teacher_ckpt]
    short, _ = ablate.plan(["pd"], ["priors", "paper"], "smoke", [0], ["--iters", "2", *T])
    by_setting = {s: r.name for r in short for s in r.settings}
    assert by_setting["priors:ddil-linear"] == by_setting["paper:ddil"]
    longer, _ = ablate.plan(["pd"], ["threshold"], "smoke", [0], ["--iters", "20", *T])
    assert not {r.name for r in short} & {r.name for r in longer}
    for other in (["--eval-samples", "30"], ["--guidance", "2"], ["--data-dir", str(tmp_path)]):
        again, _ = ablate.plan(["pd"], ["paper"], "smoke", [0], ["--iters", "2", *T, *other])
        assert not {r.name for r in again} & {r.name for r in short}, other
    run = short[0]                              # a record under its name with other settings: an error
    os.makedirs(run.record(str(tmp_path)))
    scoring.merge_metrics(os.path.join(run.record(str(tmp_path)), "metrics.json"), {}, dict(n=1))
    runs.write_json(os.path.join(run.record(str(tmp_path)), "ablate.json"), dict(identity={"iters": 3}))
    with pytest.raises(common.UserError, match="other settings"):
        ablate.is_done(run, str(tmp_path))


@pytest.mark.slow
def test_budgets_train_a_run_per_count_and_draw_one_curve_from_their_final_evaluations(teacher_ckpt, tmp_path,
                                                                                      monkeypatch):
    # PD anneals its learning rate within each round, so a mid-run evaluation does not stand for a shorter run:
    # --budgets plans one run per count (its own --iters), and the curve joins the runs' final evaluations.
    T = ["--teacher", teacher_ckpt]
    runs_, tables = ablate.plan(["pd"], ["paper"], "smoke", [0, 1], T, only=["baseline"], budgets=[100, 200, 400])
    assert len(runs_) == 6 and len({r.name for r in runs_}) == 6 and len(tables[("paper", "pd")]) == 3
    same, _ = ablate.plan(["pd"], ["paper"], "smoke", [0], T + ["--iters", "100"], only=["baseline"])
    assert same[0].name in {r.name for r in runs_}          # --budgets N is the run `-- --iters N` is: records are found
    fd = {100: 20.0, 200: 12.0, 400: 11.7}                  # gains 40 %, then 2.5 %: the budget is 200
    for planned in runs_:
        n = planned.config["iters"]
        assert planned.argv[-2:] == ["--iters", str(n)] and n in fd
        out = tmp_path / "trained" / planned.name
        out.mkdir(parents=True)
        if n == 400:                                         # a mid-run evaluation (-- --eval-at 100): not a point
            scoring.merge_metrics(str(out / "metrics.json"), {"fd_px1k_exact": 99.0}, dict(n=1000, step=100))
        scoring.merge_metrics(str(out / "metrics.json"), {"fd_px1k_exact": fd[n] + planned.seed}, dict(n=1000, step=n))
        ablate.save_record(planned, str(out), str(tmp_path / "results"), dict(wall_s=60.0, cpu_s=30.0))
    monkeypatch.setattr(ablate, "launch_local", lambda *a: pytest.fail("a recorded run was trained again"))
    argv = ["--method", "pd", "--study", "paper", "--only", "baseline", "--preset", "smoke", "--seeds", "0,1",
            "--runs", str(tmp_path / "empty"), "--results", str(tmp_path / "results"), "--curves"]
    ablate.main(argv + ["--budgets", "400,100,200", "--", *T])
    text = open(tmp_path / "results" / "curves-pd.md").read()
    assert text.count("## baseline") == 1 and "seeds 0,1" in text
    for n, v in fd.items():                                  # the mean over seeds 0 and 1: fd + 0.5
        assert f"| {n} | {v + 0.5:.4g} |" in text
    assert "Budget: **200 iterations**" in text
    no_curves = [a for a in argv if a != "--curves"]
    for bad, match in ((no_curves + ["--budgets", "100"], "only with --curves"),
                       (argv + ["--budgets", "100", "--", *T, "--iters", "5"], "no --iters after"),
                       (argv + ["--budgets", "100", "--", *T, "--iters=5"], "no --iters after"),
                       ([a if a != "0,1" else "recorded" for a in argv] + ["--tables", "--budgets", "100"], "not 'recorded'")):
        with pytest.raises(SystemExit, match=match):
            ablate.parse_args(bad)


def test_a_runs_init_is_named_by_its_weights_and_a_table_says_whether_its_rows_share_it(teacher_ckpt, tmp_path):
    """weights_sha depends on the EMA weights alone: the same weights in another checkpoint (other step, no
    optimiser) hash the same, one weight moved by one ulp does not. A table's header names the one hash, or
    each row's hashes when they differ, or says that records without one cannot be checked."""
    ckpt = runs.load_checkpoint(teacher_ckpt)
    same = {"unet": ckpt["unet"], "nets": {"ema": ckpt["nets"]["ema"]}, "step": ckpt["step"] + 1}
    torch.save(same, tmp_path / "same.pt")
    assert runs.weights_sha(str(tmp_path / "same.pt")) == runs.weights_sha(teacher_ckpt)
    moved = {k: v.clone() for k, v in ckpt["nets"]["ema"].items()}
    w = next(k for k, v in moved.items() if v.is_floating_point())
    moved[w].view(-1)[0] = torch.nextafter(moved[w].view(-1)[0], torch.tensor(float("inf"), dtype=moved[w].dtype))
    torch.save({**same, "nets": {"ema": moved}}, tmp_path / "moved.pt")
    assert runs.weights_sha(str(tmp_path / "moved.pt")) != runs.weights_sha(teacher_ckpt)
    assert report.init_line({"base": {0: "aa", 1: "aa"}, "ddil": {0: "aa"}}).endswith("EMA weights sha256 aa.")
    mixed = report.init_line({"base": {0: "aa", 1: "aa"}, "ddil": {0: "aa", 1: "bb", 2: None}})
    assert mixed.startswith("**Not every run started from the same UNet**")
    assert "base: aa (seeds 0,1); ddil: aa (seeds 0), bb (seeds 1), not recorded (seeds 2)" in mixed
    assert "cannot be checked" in report.init_line({"base": {0: None}, "ddil": {0: None}})


def test_a_grid_refuses_to_start_its_runs_from_another_unet_than_its_records_did(teacher_ckpt, tmp_path, monkeypatch):
    """A record keeps the hash of the UNet its run started from. A grid whose UNet is missing (--teacher auto
    would train one, with other weights on another CPU) or hashes otherwise stops with one line before it
    trains anything, naming the copy of the recorded UNet under --results; with that UNet in place it goes on."""
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "lcm", "--study", "paper", "--preset", "smoke", "--results", "results", "--dry-run"]
    grid, _ = ablate.plan(["lcm"], ["paper"], "smoke", [0], [])
    unet, _ = runs.teacher_checkpoint(argparse.Namespace(**{"init": "auto", **grid[0].config}))
    sha = runs.weights_sha(teacher_ckpt)
    os.makedirs("results/init")
    shutil.copyfile(teacher_ckpt, "results/init/ckpt.pt")         # the recorded UNet, committed beside the records
    for name, config, sha_kept in (("lcm-smoke-0123456789-s0", dict(init_path=unet, teacher_path="exact"), sha),
                                   ("lcm-smoke-9876543210-s0", dict(teacher_path=unet), None)):   # predates the hash
        os.makedirs(f"results/records/{name}")
        runs.write_json(f"results/records/{name}/config.json", config)
        runs.write_json(f"results/records/{name}/ablate.json", dict(identity={}, init_sha=sha_kept))
    monkeypatch.setattr(ablate, "train_teacher", lambda run: pytest.fail("a UNet was trained over the records' one"))
    put = f"mkdir -p {os.path.dirname(unet)} && cp results/init/* {os.path.dirname(unet)}/"
    with pytest.raises(common.UserError, match=f"started from UNet {sha} .*no finished UNet there.*{re.escape(put)}"):
        ablate.main([a for a in argv if a != "--dry-run"] + ["--", "--iters", "2"])
    os.makedirs(os.path.dirname(unet))
    ckpt = runs.load_checkpoint(teacher_ckpt)                       # another UNet of the same settings
    ckpt["nets"]["ema"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in ckpt["nets"]["ema"].items()}
    torch.save(ckpt, unet)
    other = runs.weights_sha(unet)
    with pytest.raises(common.UserError, match=f"started from UNet {sha} .*this one is UNet {other}"):
        ablate.main(argv + ["--", "--iters", "2"])
    os.remove("results/init/ckpt.pt")                               # and with no copy of the recorded one
    with pytest.raises(common.UserError, match="no copy of it is under results"):
        ablate.main(argv + ["--", "--iters", "2"])
    shutil.copyfile(teacher_ckpt, unet)
    assert ablate.main(argv + ["--", "--iters", "2"]) is None       # the dry run lists the grid


def test_a_table_uses_one_metric_key_per_column_and_refuses_mixed_counts():
    rows = {"base": {0: {"fid100_train500": 3.0, "teacher_mse100_ddim64": 0.1}},
            "ddil": {0: {"fid100_train500": 2.0, "teacher_mse100_ddim64": 0.2}}}
    summary, cols = report.summarise(rows, "base")
    assert cols == {"fid_train500": "fid100_train500", "teacher_mse_ddim64": "teacher_mse100_ddim64"}
    assert summary[1]["d_fid_train500"] == -1.0
    rows["ddil"][0]["teacher_mse100_exact256"] = 0.3            # another reference: its own column
    assert "teacher_mse_exact256" in report.summarise(rows, "base")[1]
    rows["ddil"][0] = {"fid1k_train500": 2.0, "teacher_mse100_ddim64": 0.2}
    with pytest.raises(common.UserError, match="fid100_train500 vs fid1k_train500"):
        report.summarise(rows, "base")


@pytest.mark.slow
def test_tables_regenerate_from_committed_records_alone(teacher_ckpt, tmp_path, monkeypatch):
    import runs as runs_module                                      # `runs` below is the planned runs
    # A fresh clone has the records (config, metrics, wall time), not the runs: the grid counts them as done,
    # trains nothing, and writes its tables from them.
    extra = ["--teacher", teacher_ckpt, "--iters", "2", "--eval-samples", "20"]
    runs, _ = ablate.plan(["lcm"], ["paper"], "smoke", [0, 1], extra)
    for i, run in enumerate(runs):
        out = tmp_path / "trained" / run.name
        out.mkdir(parents=True)
        scoring.merge_metrics(str(out / "metrics.json"), {"fid20_train500": 10.0 + i, "teacher_mse20_ddim64": 0.1 * i},
                                 dict(n=20))
        runs_module.write_json(str(out / "config.json"), dict(teacher_path=teacher_ckpt))
        ablate.save_record(run, str(out), str(tmp_path / "results"), dict(wall_s=60.0, cpu_s=None if i == 0 else 30.0))
    monkeypatch.setattr(ablate, "launch_local", lambda *a: pytest.fail("a recorded run was trained again"))
    ablate.main(["--method", "lcm", "--study", "paper", "--preset", "smoke", "--seeds", "0,1", "--runs", str(tmp_path / "empty"),
                 "--results", str(tmp_path / "results"), "--shift-samples", "0", "--", *extra])
    table = open(tmp_path / "results" / "paper-lcm.md").read()
    assert "fid20_train500" in table and "Held fixed across rows:" in table and "iters=2" in table
    assert f"Every run started from the same UNet (--init, or the UNet teacher): EMA weights sha256 " \
           f"{runs_module.weights_sha(teacher_ckpt)}." in table
    assert "| baseline |" in table and "| reflected-ddil |" in table
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    cpu = [row[cells[0].index("cpu_min")] for row in cells[1:4]]      # CPU time: a row's mean only where every seed has one
    assert sorted(cpu) == ["", "0.5 ± 0", "0.5 ± 0"], cpu
    # --tables needs no teacher either (its checkpoint gone here): it takes the one the records name.
    os.remove(tmp_path / "results" / "paper-lcm.md")
    argv = ["--method", "lcm", "--study", "paper", "--preset", "smoke", "--seeds", "0,1", "--tables", "--runs",
            str(tmp_path / "empty"),
            "--results", str(tmp_path / "results"), "--shift-samples", "0", "--",
            *[a if a != teacher_ckpt else str(tmp_path / "gone.pt") for a in extra]]
    ablate.main(argv)
    assert open(tmp_path / "results" / "paper-lcm.md").read() == table
    # --seeds recorded on a grid in progress (no reflected-ddil record yet): the table of the recorded rows.
    for run in runs:
        if "paper:reflected-ddil" in run.settings:
            shutil.move(tmp_path / "results" / "records" / run.name, tmp_path / run.name)
    ablate.main([a if a != "0,1" else "recorded" for a in argv])
    partial = open(tmp_path / "results" / "paper-lcm.md").read()
    ablate.main(["--only", "baseline,ddil"] + argv)
    assert partial == open(tmp_path / "results" / "paper-lcm.md").read() + "\nNot recorded on these seeds yet: reflected-ddil.\n"
    with pytest.raises(SystemExit, match="'recorded' reads the seeds from the records: only with --tables"):
        ablate.main([a if a != "0,1" else "recorded" for a in argv if a != "--tables"])     # a grid to train
    shutil.rmtree(tmp_path / "results" / "records" / runs[0].name)
    with pytest.raises(common.UserError, match="3 of 6 runs have no record"):   # reflected-ddil moved away, and one more
        ablate.main(argv)


# --- Grids beyond one process: the local launcher, submitit, concurrent ablate.py ---

def test_the_shift_table_is_the_seed_mean_of_the_records_and_needs_baseline_or_ddil(tmp_path):
    """The covariate-shift table is the mean over seeds of each record's shift<n>.json, read with no
    checkpoint; a paper study run with --only rows other than baseline and ddil has none and writes none."""
    class Rec:
        def __init__(self, name):
            self.name = name

        def record(self, results):
            return os.path.join(results, "records", self.name)
    curves = {("baseline", 0): ([1, 2], [3, 5]), ("baseline", 1): ([3, 4], [5, 7]),
              ("ddil", 0): ([1, 1], [1, 2]), ("ddil", 1): ([1, 1], [3, 4])}
    rows = {}
    for (setting, seed), (fwd, own) in curves.items():
        rows.setdefault(setting, {})[seed] = Rec(f"{setting}-s{seed}")
        os.makedirs(tmp_path / "records" / f"{setting}-s{seed}")
        runs.write_json(str(tmp_path / "records" / f"{setting}-s{seed}" / "shift8.json"), dict(forward=fwd, own=own, samples=8))
    report.write_shift("lcm", "gmm2", [("buffer", {0: Rec("buffer-s0")})], str(tmp_path), 8)
    assert not (tmp_path / "shift-lcm.md").exists()
    report.write_shift("lcm", "gmm2", list(rows.items()), str(tmp_path), 8)
    text = (tmp_path / "shift-lcm.md").read_text()
    assert "| baseline | (a) forward | 2 | 3 |" in text and "| baseline | (b) own rollout | 4 | 6 |" in text
    assert "| ddil | (b) own rollout | 2 | 3 |" in text and "seeds 0,1, 8 samples" in text


def test_tables_report_the_out_of_range_share_of_x0_per_step_and_in_training(tmp_path):
    """From each record: metrics.json's x0_oor (per sampler step, a share) and the log's mean clip_pct /
    clip_student_pct (percent); the table shows their mean over seeds, as percent (not in the first
    benchmark's published form)."""
    class Rec:
        def __init__(self, name):
            self.name, self.config = name, {"eval_samples": 10}

        def record(self, results):
            return os.path.join(results, "records", self.name)
    given = {("none", 0): ([0.0, 0.01], [(1.0, 2.0), (3.0, 4.0)]), ("none", 1): ([0.0, 0.03], [(2.0, 0.0)]),
             ("teacher", 0): ([0.0, 0.0], [(5.0, 1.0)]), ("teacher", 1): ([0.0, 0.0], [(7.0, 1.0)]),
             ("student", 0): ([0.0, 0.0], []), ("student", 1): ([0.0, 0.0], [(1.0, 1.0)])}   # seed 0: no clip rates
    results = {}
    for (setting, seed), (oor, logged) in given.items():
        run = Rec(f"{setting}-s{seed}")
        os.makedirs(run.record(str(tmp_path)))
        runs.write_json(os.path.join(run.record(str(tmp_path)), "metrics.json"),
                          {"evals": {"10": {"metrics": ["fd_px10_exact", "x0_oor10"]}}, "fd_px10_exact": 1.0 + seed,
                           "x0_oor10": oor})
        runs.write_json(os.path.join(run.record(str(tmp_path)), "ablate.json"), {"wall_s": 60})
        with open(os.path.join(run.record(str(tmp_path)), "log.jsonl"), "w") as f:
            f.writelines(json.dumps({"step": i, "clip_pct": a, "clip_student_pct": b}) + "\n" for i, (a, b) in enumerate(logged))
            f.write('{"step": 9, "clip_pct"')                       # a line cut short by a crash: skipped
        results.setdefault(setting, {})[seed] = report.read_record(run, str(tmp_path))
    rows, cols = report.summarise(results, "none")
    none = rows[0]
    assert none["x0_oor"] == pytest.approx([0.0, 0.02]) and none["train_oor"] == pytest.approx([(2 + 2) / 2, (3 + 0) / 2])
    assert "train_oor" not in rows[2] and rows[2]["x0_oor"] == [0.0, 0.0]
    configs = [{"steps": 2, "seed": s} for s in (0, 1, 0, 1, 0, 1)]
    for preset, shown in (("gmm2", True), ("gmm", False)):
        report.write_outputs(rows, cols, study="threshold", method="lcm", preset=preset, ref="none", seeds=[0, 1],
                             configs=configs, out_dir=str(tmp_path / preset), adjusted=preset not in ablate.FIRST_PUBLISHED)
        text = (tmp_path / preset / "threshold-lcm.md").read_text()
        assert ("| none | 2 | 1.5 | 0 | 2 |" in text and "| teacher | 6 | 1 | 0 | 0 |" in text) == shown, text
        assert ("Not shown: student (a seed's record lacks" in text) == shown and "| student | 1 |" not in text


LAUNCH = ["--method", "lcm", "--study", "paper", "--only", "baseline,ddil", "--preset", "smoke", "--shift-samples", "0"]


def _launch_extra(teacher_ckpt):
    return ["--teacher", teacher_ckpt, "--iters", "6", "--batch-size", "2", "--eval-samples", "4", "--save-every", "1",
            "--log-every", "1"]


def _records(results):
    """{run: numeric metrics} of a grid's records (what its tables are made from)."""
    out = {}
    for name in sorted(os.listdir(os.path.join(results, "records"))):
        m = json.load(open(os.path.join(results, "records", name, "metrics.json")))
        out[name] = {k: v for k, v in m.items() if isinstance(v, (int, float, list))}
    return out


def _table_without_times(path):
    """The table's rows, every column but the wall and CPU times (which differ from run to run)."""
    rows = [line.split(" | ") for line in open(path).read().splitlines() if line.startswith("| ")]
    times = [i for i, c in enumerate(rows[0]) if c in ("wall_min", "cpu_min")]
    assert len(times) == 2, rows[0]                            # a grid made here records both
    return [[c for i, c in enumerate(r) if i not in times] for r in rows]


@pytest.fixture(scope="module")
def sequential_grid(teacher_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("seq")
    os.environ["DDIL_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")     # shared by the grids below
    ablate.main([*LAUNCH, "--threads", "1", "--runs", str(d / "runs"), "--results", str(d / "res"), "--",
                 *_launch_extra(teacher_ckpt)])
    return d


@pytest.mark.slow
def test_local_launcher_runs_in_parallel_and_gives_the_sequential_table(sequential_grid, teacher_ckpt, tmp_path, capsys):
    ablate.main([*LAUNCH, "--jobs", "2", "--threads", "1", "--runs", str(tmp_path / "runs"), "--results",
                 str(tmp_path / "res"), "--", *_launch_extra(teacher_ckpt)])
    out = capsys.readouterr().out
    assert "[2/2 done | 0 running | 0 left" in out and "shared caches for synthetic" in out
    assert _records(tmp_path / "res") == _records(sequential_grid / "res")
    assert _table_without_times(tmp_path / "res" / "paper-lcm.md") == \
        _table_without_times(sequential_grid / "res" / "paper-lcm.md")
    for name in os.listdir(tmp_path / "runs"):                   # parallel runs log to their own directory
        assert (tmp_path / "runs" / name / "stdout.log").is_file()


@pytest.mark.slow
def test_two_ablate_processes_on_one_grid_do_each_run_once(sequential_grid, teacher_ckpt, tmp_path):
    argv = [PY, "ablate.py", *LAUNCH, "--threads", "1", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--", *_launch_extra(teacher_ckpt)]
    env = {**os.environ, "DDIL_CACHE": os.environ["DDIL_CACHE"]}
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for name in os.listdir(tmp_path / "runs"):
        steps = [r["step"] for r in read_log(tmp_path / "runs" / name)]
        assert steps == sorted(set(steps)) == list(range(1, 7)), (name, steps)      # one writer, one pass
    assert _records(tmp_path / "res") == _records(sequential_grid / "res")


def test_a_stopped_grids_summary_counts_every_outcome(monkeypatch, tmp_path):
    """launch_local with planted outcomes, one run at a time: a failure, a finished run, a run that sends the
    grid's stop (SIGTERM to this process, as a signal to the whole process group does) and dies of it, and
    a run that never starts. Oracle: the planted outcomes, counted in the one-line summary."""
    class Planted:
        def __init__(self, run, runs_dir, results, env=None, log=None, stop=None):
            self.run = run

        def terminate(self):
            pass

        def __call__(self):
            if self.run.name == "r0":
                raise ablate.RunFailed("r0: exit 1: error: boom", 1)
            if self.run.name == "r2":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
                raise ablate.RunFailed("r2: exit -15: (empty log)", -signal.SIGTERM)
            return "done"

    monkeypatch.setattr(ablate, "RunJob", Planted)
    todo = [argparse.Namespace(name=f"r{i}", settings=[], argv=["x.py"]) for i in range(4)]
    args = argparse.Namespace(gpus=None, jobs=1, threads=1, runs=str(tmp_path), results=str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(common.Stopped, match=r"^stopped: 1 run\(s\) finished and recorded, 2 stopped or not "
                                             r"started, 1 failed \(r0: exit 1: error: boom\); rerun"):
        ablate.launch_local(todo, args)
    assert signal.getsignal(signal.SIGTERM) == before                 # the grid's handler is gone again


@pytest.mark.slow
def test_a_stopped_grid_waits_for_its_runs_and_a_rerun_resumes_them(sequential_grid, teacher_ckpt, tmp_path):
    """SIGTERM to ablate.py alone (as a scheduler or `kill` sends it): no new run starts, the running run saves
    its checkpoint (or, in its final evaluation, finishes it and is recorded) and ablate waits for it, so no run
    is left running without its record. Oracle: the run directories, records and attempt counts on disk."""
    extra = ["--teacher", teacher_ckpt, "--iters", "20", "--batch-size", "2", "--eval-samples", "16",
             "--save-every", "1", "--log-every", "1"]
    argv = [PY, "ablate.py", *LAUNCH, "--threads", "1", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--", *extra]
    env = {**os.environ, "DDIL_CACHE": os.environ["DDIL_CACHE"]}

    def grid_until(ready):
        p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        _wait_for(lambda: ready() or p.poll() is not None, timeout=300, what="the first run")
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
        return p.returncode, out, err

    def first():
        made = [d for d in os.listdir(tmp_path / "runs") if not d.startswith("_")] if (tmp_path / "runs").is_dir() else []
        return tmp_path / "runs" / made[0] if made else None

    # 1. Mid-training: the run saves and stops; the grid's second run never starts.
    code, out, err = grid_until(lambda: first() is not None and len(read_log(first())) >= 2)
    run_dir = first()
    assert code == 130 and "Traceback" not in err, err
    assert "no new run starts" in out and "stopped: 0 run(s) finished and recorded, 2 stopped or not started" in out
    assert runs.load_checkpoint(str(run_dir / "ckpt.pt"))["step"] >= 2
    assert not runs.run_dir_in_use(str(run_dir))                  # its process is over, not orphaned
    assert sorted(os.listdir(tmp_path / "runs")) == [run_dir.name]          # the second run never started
    counts = json.load(open(run_dir / "attempts.json"))
    assert counts["attempts"] == counts["cpu_attempts"] == 1 and counts["cpu_s"] > 0, counts
    # 2. Rerun, stopped in the final evaluation: the run finishes it and is recorded before ablate exits.
    code, out, err = grid_until(lambda: (run_dir / "samples.png").is_file())
    assert code == 130 and "stopped: 1 run(s) finished and recorded, 1 stopped or not started" in out, (out, err)
    assert not runs.run_dir_in_use(str(run_dir))
    record = json.load(open(tmp_path / "res" / "records" / run_dir.name / "ablate.json"))
    assert record["attempts"] == 2 and record["cpu_s"] is not None, record
    assert len(os.listdir(tmp_path / "runs")) == 1


@pytest.mark.slow
def test_a_grid_stopped_while_its_teacher_trains_waits_for_the_teacher_to_save(tmp_path):
    """--teacher auto trains the grid's teacher (teacher.py, a subprocess) before any run. SIGTERM to ablate.py
    alone reaches the teacher, which saves and stops, and ablate waits for it and exits 130 with one line: the
    teacher is neither left training on its own nor killed unsaved. Oracle: its checkpoint and lock on disk."""
    import teacher
    argv = [PY, os.path.join(ROOT, "ablate.py"), *LAUNCH, "--only", "baseline", "--threads", "1"]
    p = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    teacher_dir = tmp_path / "runs" / "teacher-smoke-s0"
    _wait_for(lambda: read_log(teacher_dir) or p.poll() is not None, timeout=300, what="the teacher's first log line")
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in err, (out, err)
    assert out.strip().splitlines()[-1] == ("stopped while training the grid's teacher (its last checkpoint is "
                                           "kept); rerun the same command to resume"), out
    step = runs.load_checkpoint(str(teacher_dir / "ckpt.pt"))["step"]
    assert 20 <= step < teacher.PRESETS["smoke"]["iters"], step
    assert not runs.run_dir_in_use(str(teacher_dir))             # the teacher is over, not orphaned
    assert not (tmp_path / "runs" / "_prepare").exists() and sorted(os.listdir(tmp_path / "runs")) == [teacher_dir.name]


# --- Resume and bad input: every resume exact, every bad input one line ---

@pytest.mark.parametrize("module, nets", [(ddil_pd, ("student", "ema")), (lcm, ("student", "ema", "target")),
                                          (ddil_dmd2, ("student", "ema", "critic"))])
@pytest.mark.slow
def test_a_run_with_mid_run_evaluations_resumes_bitwise(module, nets, teacher_ckpt, tmp_path, monkeypatch):
    """--eval-every 3 --save-every 3, 6 iterations: one run uninterrupted, one killed at step 4 (after the
    step-3 checkpoint and evaluation, before any later save) and resumed. The evaluation stands in for
    scoring.evaluate_checkpoint by doing what it does to the RNGs (builds a network, draws noise from torch, NumPy
    and Python), so the final weights agree bit for bit only if the evaluation leaves the streams alone."""
    import random
    evaluated = []

    def evaluate_checkpoint(run_dir, *a, **k):
        evaluated.append(run_dir)
        nn.Linear(8, 8), torch.randn(64), np.random.rand(8), random.random()
    monkeypatch.setattr(scoring, "evaluate_checkpoint", evaluate_checkpoint)
    argv = ["--preset", "smoke", "--iters", "6", "--batch-size", "4", "--eval-every", "3", "--eval-samples", "10",
            "--save-every", "3", "--seed", "5", "--teacher", teacher_ckpt, "--ddil", "--rollout-chunk", "2"]
    module.main(argv + ["--out", str(tmp_path / "whole")])
    assert evaluated.count(str(tmp_path / "whole")) == 2           # at step 3 and at the end

    end_of_step = runs.end_of_step

    def killed_at_4(args, step, *rest):
        if step == 4:
            raise KeyboardInterrupt                                 # like kill -9: nothing saved at step 4
        return end_of_step(args, step, *rest)
    monkeypatch.setattr(runs, "end_of_step", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        module.main(argv + ["--out", str(tmp_path / "resumed")])
    assert runs.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["step"] == 3
    monkeypatch.setattr(runs, "end_of_step", end_of_step)
    module.main(argv + ["--out", str(tmp_path / "resumed")])
    assert_same_nets(tmp_path / "whole" / "ckpt.pt", tmp_path / "resumed" / "ckpt.pt", nets)


def test_the_evaluation_classifier_is_the_same_whatever_the_global_rng():
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(60) % 10
    spec = dict(metrics.CLASSIFIERS["tiny"], epochs=1)
    nets = []
    for seed in (0, 123):
        torch.manual_seed(seed)
        nets.append(metrics.train_classifier(images, labels, spec, "cpu", progress=False)[0])
        assert torch.initial_seed() == seed                         # and it never reseeds the caller's stream
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


def _record(results, name, metrics, seed, identity):
    rec = os.path.join(results, "records", name)
    os.makedirs(rec, exist_ok=True)
    with open(os.path.join(rec, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(rec, "ablate.json"), "w") as f:
        json.dump(dict(identity=identity, wall_s=60.0), f)


def test_a_record_lacking_a_metric_of_its_table_is_an_error_not_a_dropped_seed(tmp_path):
    """Three seeds of two rows; one record's metrics.json is emptied: --tables must refuse, not average
    the two seeds left (which gives another interval under the same 'seeds 0,1,2' header)."""
    runs, tables = ablate.plan(["pd"], ["paper"], "smoke", [0, 1, 2], [], only=["baseline", "ddil"],
                               teachers={})
    rows = tables[("paper", "pd")]
    results = {}
    for setting, by_seed in rows:
        results[setting] = {}
        for seed, run in by_seed.items():
            m = {"fd_px100_exact": 1.0 + seed + (setting == "ddil"),
                 "evals": {str(run.config["eval_samples"]): {"metrics": ["fd_px100_exact"]}}}
            run.config["eval_samples"] = run.config["eval_samples"]
            _record(str(tmp_path), run.name, m, seed, run.identity)
            results[setting][seed] = report.read_record(run, str(tmp_path))
    report.check_complete(results, rows, "paper", "pd", str(tmp_path))          # complete: no error
    victim = rows[1][1][2]
    with open(os.path.join(victim.record(str(tmp_path)), "metrics.json"), "w") as f:
        f.write("{}")
    results["ddil"][2] = report.read_record(victim, str(tmp_path))
    with pytest.raises(common.UserError, match=f"{victim.name}/metrics.json lacks fd_px100_exact"):
        report.check_complete(results, rows, "paper", "pd", str(tmp_path))
    with open(os.path.join(victim.record(str(tmp_path)), "metrics.json"), "w") as f:
        f.write('{"evals": ')                                       # a truncated copy
    with pytest.raises(common.UserError, match="metrics.json: unreadable"):
        report.read_record(victim, str(tmp_path))


@pytest.mark.slow
def test_a_refused_start_writes_nothing_and_the_corrected_command_runs(tmp_path, teacher_ckpt):
    student = tmp_path / "student.pt"
    runs.save_checkpoint(str(student), dict(step=1, unet={}, config={}, nets=dict(student={}, ema={})))
    out = tmp_path / "run"
    base = ["--preset", "smoke", "--iters", "2", "--batch-size", "4", "--eval-samples", "0", "--out", str(out)]
    with pytest.raises(common.UserError, match="distilled student"):
        ddil_pd.main(base + ["--teacher", str(student)])
    with pytest.raises(common.UserError, match="--data-dir"):
        ddil_pd.main(base + ["--teacher", teacher_ckpt, "--data-dir", str(tmp_path / "nothing.zip")])
    assert not (out / "config.json").exists()
    ddil_pd.main(base + ["--teacher", teacher_ckpt])                 # the corrected command is not refused
    assert runs.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2


@pytest.mark.slow
def test_stale_checkpoint_temporaries_are_removed_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = f"{path}.{int(dead.stdout)}.tmp", f"{path}.{os.getppid()}.tmp"
    for f in (stale, live):
        open(f, "wb").write(b"partial")
    runs.save_checkpoint(path, dict(step=1))
    assert not os.path.exists(stale) and os.path.exists(live)       # a live writer's temporary is left alone

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(common.UserError, match="No space left on device.*last complete checkpoint is kept"):
        runs.save_checkpoint(path, dict(step=2))
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", os.path.basename(live)])   # no partial file left
    assert runs.load_checkpoint(path)["step"] == 1


def test_broken_run_files_resume_or_are_one_line_errors(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    runs.RunLog(str(out), 10, start_step=2)                        # a crash mid-line: resumed, line dropped
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    (out / "config.json").write_text('{"method": "pd", ')
    args = ddil_pd.parse_args(["--preset", "smoke", "--out", str(out)])
    with pytest.raises(common.UserError, match="config.json: unreadable"):
        runs.prepare_run(args, "pd")
    (out / "metrics.json").write_text("[1, 2")
    with pytest.raises(common.UserError, match="metrics.json: unreadable"):
        scoring.merge_metrics(str(out / "metrics.json"), {"x": 1.0}, dict(n=1))


def test_a_data_folder_skips_hidden_files_and_refuses_more_classes_than_the_unet_has(tmp_path):
    png = _png_bytes()
    for c in ("cat", "dog"):
        (tmp_path / "ok" / "train" / c).mkdir(parents=True)
        (tmp_path / "ok" / "train" / c / "0.png").write_bytes(png)
    (tmp_path / "ok" / "train" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "ok" / "train" / "cat" / "._0.png").write_bytes(b"AppleDouble")
    x, y = runs.load_images("cifar10", str(tmp_path / "ok"))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    for c in range(11):
        (tmp_path / "many" / "train" / f"c{c:02d}").mkdir(parents=True)
        (tmp_path / "many" / "train" / f"c{c:02d}" / "0.png").write_bytes(png)
    with pytest.raises(common.UserError, match="11 class folders"):
        runs.load_images("cifar10", str(tmp_path / "many"))


@pytest.mark.slow
def test_a_resumed_student_whose_teacher_changed_width_is_one_line(tmp_path, teacher_ckpt):
    teacher = str(tmp_path / "teacher.pt")
    shutil.copyfile(teacher_ckpt, teacher)
    argv = ["--preset", "smoke", "--iters", "2", "--batch-size", "4", "--eval-samples", "0",
            "--out", str(tmp_path / "run"), "--teacher", teacher]
    ddil_pd.main(argv)
    wide = runs.load_checkpoint(teacher)                          # the file replaced by a wider teacher
    wide["unet"] = {**wide["unet"], "ch": wide["unet"]["ch"] * 2}
    wide["nets"] = {k: runs.build_unet(wide["unet"], "cpu").state_dict() for k in ("model", "ema")}
    runs.save_checkpoint(teacher, wide)
    with pytest.raises(common.UserError, match="run/ckpt.pt does not fit this run"):
        ddil_pd.main(argv)


BAD_INPUTS = [   # (script, argv, what the one-line error must name)
    ("ddil_dmd2.py", ["--lr-critic", "nan"], "--lr-critic"),
    ("ddil_dmd2.py", ["--grad-clip", "nan"], "--grad-clip"),
    ("ddil_dmd2.py", ["--gan-weight", "nan"], "--gan-weight"),
    ("ddil_pd.py", ["--lr", "inf"], "--lr"),
    ("ddil_lcm.py", ["--huber-c", "inf"], "--huber-c"),
    ("ddil_lcm.py", ["--timestep-scaling", "inf"], "--timestep-scaling"),
    ("teacher.py", ["--attn-res", "7"], "--attn-res"),
    ("teacher.py", ["--dropout", "2"], "--dropout"),
    ("teacher.py", ["--ch-mult", "0"], "--ch-mult"),
    ("teacher.py", ["--seed", str(2 ** 64 + 1)], "--seed"),
    ("ddil_pd.py", ["--pres", "gmm"], "--pres"),                    # no abbreviations
    ("eval.py", ["--images", ".", "--slice", "0:10:0"], "--slice"),
    ("eval.py", ["--time-features", "2", "--device", "tpu9"], "--device"),
    ("eval.py", ["--images", ".", "--out", "/nonexistent/dir/m.json"], "--out"),
    ("ablate.py", ["--method", "pd", "--study", "paper", "--seeds", "0,0"], "--seeds"),
    ("ablate.py", ["--method", "pd", "--study", "paper", "--dry-run", "--", "--pres", "gmm"], "--pres"),
    ("ddil_lcm.py", ["--teacher", "exact"], "--teacher exact"),      # the smoke preset's data has no closed form
    ("ddil_pd.py", ["--init", "some.pt"], "--init some.pt: only with --teacher exact"),
    ("eval.py", ["--teacher", "exact", "--dataset", "cifar10"], "--teacher exact"),
]


def test_bad_inputs_are_one_line_errors_naming_the_flag(tmp_path):
    """Each script's main() as its command line runs it (cli.run_main): the exit message is one line
    naming the flag; nothing is trained (--dry-run where the script has it)."""
    import teacher
    mains = {"ddil_pd.py": ddil_pd.main, "ddil_lcm.py": lcm.main, "ddil_dmd2.py": ddil_dmd2.main,
             "teacher.py": teacher.main, "eval.py": evaluation.main, "ablate.py": ablate.main}
    for script, argv, needle in BAD_INPUTS:
        trainer = script not in ("eval.py", "ablate.py")
        with pytest.raises(SystemExit) as e:
            cli.run_main(mains[script], [*(["--preset", "smoke"] if trainer else []), *argv,
                                            *(["--dry-run"] if trainer else [])])
        message = str(e.value.code)
        assert e.value.code not in (0, None) and len(message.strip().splitlines()) == 1, (script, argv, message)
        assert needle in message, (script, argv, message)


@pytest.mark.slow
def test_eval_refuses_a_student_as_teacher_an_undecodable_image_and_a_run_in_training(tmp_path, teacher_ckpt):
    student = tmp_path / "student.pt"
    runs.save_checkpoint(str(student), dict(step=1, unet={}, config={}, nets=dict(student={}, ema={})))
    with pytest.raises(common.UserError, match="distilled student"):
        evaluation.main(["--teacher", str(student), "--device", "cpu"])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    with pytest.raises(common.UserError, match="a.png is not a readable image"):
        evaluation.main(["--images", str(tmp_path / "imgs"), "--device", "cpu"])
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([PY, "-c", "import runs, sys, time; runs.lock_run_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(run_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.UserError, match="being trained by another process"):
            evaluation.main([str(run_dir), "--device", "cpu"])
    finally:
        holder.kill()
        holder.wait()


# --- A real single-node SLURM (slurm_up.sh; .ci/run starts it) ---

def _slurm_reason():
    if not shutil.which("sbatch"):
        return "no SLURM here (sbatch not found): bring one up with `sudo bash slurm_up.sh`"
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return f"SLURM not reachable (sinfo: {(r.stderr.strip().splitlines() or ['no nodes'])[-1]})"
    if subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True).returncode != 0:
        return "SLURM without accounting (sacct fails): slurm_up.sh starts slurmdbd"
    return None


slurm = pytest.mark.skipif(_slurm_reason() is not None, reason=str(_slurm_reason()))
SLURM = ["--launcher", "slurm", "--gpus-per-job", "0", "--cpus-per-job", "1", "--time", "20"]


def _wait_for(cond, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _slurm_argv(tmp_path, teacher_ckpt, extra=()):
    return [*LAUNCH, *SLURM, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), *extra, "--",
            *_launch_extra(teacher_ckpt)]


@pytest.mark.slow
@slurm
def test_slurm_grid_with_a_requeue_gives_the_uninterrupted_records(sequential_grid, teacher_ckpt, tmp_path):
    """Two runs on the real SLURM: `scontrol requeue` while one trains. The grid's first job makes the shared
    caches and submits the runs; a second ablate.py with --wait blocks on the queued jobs; the requeued run
    resumes from its checkpoint and every record equals the uninterrupted local grid's, with 2 attempts."""
    argv = _slurm_argv(tmp_path, teacher_ckpt)
    r = run(["ablate.py", *argv])                                    # submits the first job and returns
    assert r.returncode == 0 and "submitted job" in r.stdout, r.stderr
    _wait_for(lambda: (tmp_path / "runs").is_dir() and len(list((tmp_path / "runs").glob("lcm-*/submitit/job.json"))) == 2,
              what="the first job to submit the runs")
    victim = sorted((tmp_path / "runs").glob("lcm-*"))[0]
    _wait_for(lambda: any(row["step"] >= 2 for row in read_log(victim)), what="training to start")
    job_id = json.load(open(victim / "submitit" / "job.json"))["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    waited = run(["ablate.py", *argv[:argv.index("--")], "--wait", *argv[argv.index("--"):]])
    assert waited.returncode == 0, waited.stdout[-2000:] + waited.stderr
    assert (tmp_path / "res" / "paper-lcm.md").is_file()          # --wait blocked until both were done
    assert json.load(open(tmp_path / "res" / "records" / victim.name / "ablate.json"))["attempts"] == 2
    assert _records(tmp_path / "res") == _records(sequential_grid / "res")


@pytest.mark.slow
@slurm
def test_slurm_time_limit_signal_requeues_and_a_failing_job_says_why(sequential_grid, teacher_ckpt, tmp_path):
    """The time-limit warning: sbatch is asked for SIGUSR2 --signal-delay seconds before the limit, and the
    run that receives it saves, requeues itself and resumes; its record shows two attempts and every step
    ran once. The test sends the signal itself (scancel --signal, what slurmctld sends at the warning
    time) once the run trains: a real one-minute limit would race SLURM's coarse timer against the job's
    start-up, before submitit's handler exists. With a 10-minute limit submitit counts any such signal as
    the time limit's (not a preemption), so the timeout path is the one taken. A run that fails is
    reported with its own one-line error, not submitit's log path."""
    one = ["--method", "lcm", "--study", "paper", "--only", "baseline", "--preset", "smoke", "--shift-samples", "0"]
    argv = [*one, *SLURM, "--time", "10", "--signal-delay", "50", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--", *_launch_extra(teacher_ckpt), "--iters", "40"]
    r = run(["ablate.py", *argv])                                    # submits the first job and returns
    assert r.returncode == 0 and "submitted job" in r.stdout, r.stderr
    _wait_for(lambda: (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("lcm-*/submitit/job.json")),
              what="the first job to submit the run")
    (victim,) = (tmp_path / "runs").glob("lcm-*")
    _wait_for(lambda: any(row["step"] >= 2 for row in read_log(victim)), what="training to start")
    job_id = json.load(open(victim / "submitit" / "job.json"))["job_id"]
    scripts = list((victim / "submitit").glob("*.sh"))
    assert scripts and all("#SBATCH --signal=USR2@50" in open(f).read() for f in scripts), scripts
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    attempts = lambda: json.load(open(victim / "attempts.json"))["attempts"] if (victim / "attempts.json").is_file() else 0
    _wait_for(lambda: attempts() >= 2, what="the run to requeue itself and start again")
    waited = run(["ablate.py", *argv[:argv.index("--")], "--wait", *argv[argv.index("--"):]])
    assert waited.returncode == 0, waited.stdout[-2000:] + waited.stderr
    record = json.load(open(tmp_path / "res" / "records" / victim.name / "ablate.json"))
    assert record["attempts"] >= 2 and 0 < record["cpu_s"] < 2 * record["wall_s"], record   # the handler kept its CPU time
    steps = [row["step"] for row in read_log(victim)]
    assert steps == list(range(1, 41))                              # every step once: resumed, not restarted
    bad = [*one, *SLURM, "--runs", str(tmp_path / "bad"), "--results",
           str(tmp_path / "badres"), "--wait", "--", *_launch_extra(teacher_ckpt), "--lr", "1e30"]
    r = run(["ablate.py", *bad])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the run diverged" in r.stderr and "run.log" in r.stderr, r.stderr


@pytest.mark.slow
@slurm
def test_sbatch_refusal_is_one_line_naming_the_flag(teacher_ckpt, tmp_path):
    argv = [*LAUNCH, "--launcher", "slurm", "--gpus-per-job", "1", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--", *_launch_extra(teacher_ckpt)]
    r = run(["ablate.py", *argv])
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sbatch refused" in r.stderr and "--gpus-per-job" in r.stderr, r.stderr


@pytest.mark.slow
def test_the_teacher_evaluates_itself_at_the_end_with_its_own_sampler(tmp_path, monkeypatch):
    import teacher
    seen = []

    def evaluate_checkpoint(run_dir, make_generator, make_student, n, device, sampler=None, **k):
        ckpt = runs.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
        x = make_generator(ckpt, "cpu")(torch.randn(2, 3, 32, 32), torch.arange(2))
        seen.append((run_dir, n, sampler, make_student, tuple(x.shape)))
    monkeypatch.setattr(scoring, "evaluate_checkpoint", evaluate_checkpoint)
    teacher.main(["--preset", "smoke", "--iters", "2", "--batch-size", "4", "--eval-samples", "4", "--sample-steps", "2",
                  "--log-every", "1", "--out", str(tmp_path)])
    assert seen == [(str(tmp_path), 4, "ddim2", None, (2, 3, 32, 32))]


def test_mixture_teachers_do_not_flip_and_mixture_students_distil_the_exact_teacher(tmp_path, teacher_ckpt, capsys):
    import teacher
    assert [teacher.parse_args(["--preset", p]).hflip for p in ("smoke", "gmm", "gmm2")] == [True, False, False]
    assert teacher.parse_args(["--preset", "gmm2", "--hflip"]).hflip is True
    for module in (ddil_pd, lcm, ddil_dmd2):
        assert module.parse_args(["--preset", "gmm2"]).teacher == "exact"
        assert module.parse_args(["--preset", "gmm"]).teacher == "exact"
        assert module.parse_args(["--preset", "smoke"]).teacher == "auto"
    # A run directory started before --init existed resumes: its settings read as the old behaviour.
    before = {"method": "pd", "lr": 1e-3, "teacher_path": "t.pt"}
    assert runs._settings({**before, "init": "auto", "init_path": "t.pt"}) == runs._settings(before)
    assert runs._settings({**before, "init": "u.pt", "init_path": "u.pt"}) != runs._settings(before)
    with pytest.raises(common.UserError, match="--init /nonexistent.pt: no such checkpoint"):
        runs.teacher_checkpoint(argparse.Namespace(teacher="exact", init="/nonexistent.pt"))
    # The exact teacher is what the loss sees; the student starts from --init's weights.
    args = argparse.Namespace(teacher="exact", init=teacher_ckpt, teacher_path="exact", init_path=teacher_ckpt,
                              dataset="gmm2")
    net, init = runs.load_networks(args, "cpu")
    assert isinstance(net, gmm.ExactTeacher) and net.mixture is gmm.mixture("gmm2")
    # The smoke teacher was trained with flips: as the init of a mixture run it is named as such.
    assert runs.load_checkpoint(teacher_ckpt)["config"]["hflip"] is True
    assert f"warning: {teacher_ckpt} was trained with horizontal flips, but gmm2" in capsys.readouterr().out
    assert torch.equal(init["nets"]["ema"]["conv_in.weight"], runs.load_checkpoint(teacher_ckpt)["nets"]["ema"]["conv_in.weight"])


def test_without_cuda_auto_is_the_quick_mixture_run_with_the_exact_teacher(monkeypatch):
    import teacher
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module in (ddil_pd, lcm, ddil_dmd2):
        args = module.parse_args([])
        assert (args.preset, args.preset_reason, args.dataset, args.teacher) == ("quick", "auto: no CUDA", "gmm2", "exact")
        assert args.eval_samples == scoring.DEFAULT_SAMPLES["quick"]
    init = teacher.parse_args([])
    assert (init.preset, init.dataset, init.hflip) == ("quick", "gmm2", False)


def test_a_mixture_data_set_is_sampled_once_and_read_back_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    monkeypatch.setattr(runs, "_MIXTURE_SETS", {})
    x, y = runs.load_images("gmm", split="test")
    want_x, want_y = gmm.dataset(10_000, "test", "gmm")
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("mixture-gmm-test-n10000-")
    runs._MIXTURE_SETS.clear()                                     # a new process: read from the cache
    monkeypatch.setattr(gmm, "dataset", lambda *a: pytest.fail("sampled again"))
    x2, y2 = runs.load_images("gmm", split="test", limit=100)
    assert torch.equal(x2, want_x[:100]) and torch.equal(y2, want_y[:100])


def test_exact_context_rows_are_the_floor_and_the_exact_teachers_ddim(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    rows = scoring.exact_context("gmm2", 2, 20)
    # Written out: the floor is `python gmm.py --mixture gmm2 --samples 20`, the DDIM row the exact denoiser's
    # two DDIM steps from the seeded noise of sample i, both quantised to 8 bits.
    mix, labels = gmm.mixture("gmm2"), torch.arange(20) % 10
    floor = gmm.main(["--mixture", "gmm2", "--samples", "20"])
    exact = gmm.ExactTeacher("gmm2")
    noise, y, _ = common.seeded_batch(range(20), "cpu")
    x = common.sample(lambda z, t, y: common.denoise(exact, z, t, y, 1.0), noise, y, [1.0, 0.5, 0.0])
    ddim = mix.metrics(gmm.levels(x) / 127.5 - 1, y)
    for row, want in (("exact samples (the floor)", floor), ("exact teacher, DDIM 2", ddim)):
        got = rows[row]
        for k in scoring.CONTEXT_METRICS:
            assert got[metrics.metric_name(k, 20, "exact")] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (row, k)
    assert torch.equal(y, labels)
    monkeypatch.setattr(scoring, "generate_samples", lambda *a, **k: pytest.fail("recomputed"))
    assert scoring.exact_context("gmm2", 2, 20) == rows                     # cached: read back, not recomputed
    assert [p.name for p in tmp_path.iterdir()] == [f"exact-context-gmm2-ddim2-w1-n20-{runs.code_sha(gmm, common)}.json"]


@pytest.mark.slow
def test_a_run_on_the_second_mixture_distils_the_exact_teacher_end_to_end(tmp_path, teacher_ckpt):
    out = tmp_path / "l"
    r = run(["ddil_lcm.py", "--preset", "smoke", "--dataset", "gmm2", "--init", teacher_ckpt, "--iters", "2",
             "--eval-samples", "20", "--log-every", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    config = json.load(open(out / "config.json"))
    assert (config["teacher"], config["teacher_path"], config["init_path"]) == ("exact", "exact", teacher_ckpt)
    metrics = json.load(open(out / "metrics.json"))
    assert {"nll20_exact", "fd_px_struct20_exact", "teacher_mse20_exact256", "unpaired_mse20_exact256"} <= metrics.keys()
    assert len(metrics["x0_oor20"]) == 4 and "clip_student_pct" in read_log(out)[0]
    assert not any(k.startswith("teacher_mse20_ddim") for k in metrics)         # no UNet teacher to agree with
    # It ends beside the floor and the exact teacher's DDIM at its own step count, its own row from metrics.json.
    table = r.stdout[r.stdout.index("the run beside the exact benchmark's references (gmm2, N = 20"):].splitlines()
    assert [line.split("  ")[0] for line in table[2:5]] == ["exact samples (the floor)", "exact teacher, DDIM 4, w 1.5",
                                                           "this run (4 steps)"]
    assert f"{metrics['fd_px20_exact']:.4g}" == table[4].split()[-2]
