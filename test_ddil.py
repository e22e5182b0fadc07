"""The DDIL test suite: CPU-only, minutes, every test against an oracle.

Oracles: the analytic Gaussian teacher (data N(mu, diag s^2) per class has the exact denoiser
x̂_0(z_t) = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu)), closed-form
formulas written out independently here, and bitwise comparisons against uninterrupted runs.

    python -m pytest -q test_ddil.py
"""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from common import alpha_sigma

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


# --- Oracles and fixtures ---

class GaussianTeacher(nn.Module):
    """Exact v-prediction 'network' for data x_0 ~ N(mu_y, diag s^2): class y has mean mu[y]
    (the null class 10 the mixture mean's Gaussian approximation is not needed: tests use y < 10
    or a single class). Returns v = (alpha_t z - x̂_0) / sigma_t, so common.denoise inverts it."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32))   # [C, 3, 32, 32]
        self.register_buffer("s", torch.as_tensor(s, dtype=torch.float32))     # [3, 32, 32] or scalar

    def x0(self, z, t, y):
        alpha_t, sigma_t = (common._bc(a, z) for a in alpha_sigma(t))
        mu = self.mu[y.clamp(max=len(self.mu) - 1)]
        return mu + alpha_t * self.s ** 2 / (alpha_t ** 2 * self.s ** 2 + sigma_t ** 2) * (z - alpha_t * mu)

    def forward(self, z, t, y):
        alpha_t, sigma_t = (common._bc(a, z) for a in alpha_sigma(t))
        return (alpha_t * z - self.x0(z, t, y)) / sigma_t


def run(args, **kw):
    """Run a script as a user would; returns the CompletedProcess (text)."""
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A smoke teacher trained for a few iterations: shared by every script test."""
    out = tmp_path_factory.mktemp("teacher")
    r = run(["teacher.py", "--preset", "smoke", "--iters", "24", "--log-every", "4", "--save-every", "12",
             "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


# --- Diffusion conventions (DESIGN §3) ---

def test_schedule_and_parameterisation_round_trip():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    alpha_t, sigma_t = alpha_sigma(t)
    torch.testing.assert_close(alpha_t ** 2 + sigma_t ** 2, torch.ones(5))
    logsnr = 2 * torch.log(alpha_t / sigma_t)
    assert logsnr.max() <= 20.01 and logsnr.min() >= -20.01          # float32 rounding of 1 - T_MIN
    torch.testing.assert_close(logsnr[[0, -1]], torch.tensor([20.0, -20.0]), atol=1e-2, rtol=0)
    x0, eps = torch.randn(2, 4, 3, 32, 32)
    t = torch.rand(4)
    a, s = (common._bc(v, x0) for v in alpha_sigma(t))
    z, v = a * x0 + s * eps, a * eps - s * x0
    x0_hat, eps_hat = common.to_x0_eps(z, t, v)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)


def test_ddim_step_with_true_x0_eps_lands_on_the_forward_point():
    x0, eps = torch.randn(2, 8, 3, 32, 32)
    t, s = torch.full((8,), 0.8), torch.full((8,), 0.3)
    at, st = (common._bc(v, x0) for v in alpha_sigma(t))
    as_, ss = (common._bc(v, x0) for v in alpha_sigma(s))
    z_t = at * x0 + st * eps
    torch.testing.assert_close(common.ddim_step(z_t, t, s, x0, eps), as_ * x0 + ss * eps, atol=1e-6, rtol=0)
    # eps recomputed from (z_t, x0) stays on the same line: same point.
    torch.testing.assert_close(common.ddim_step(z_t, t, s, x0), as_ * x0 + ss * eps, atol=1e-5, rtol=0)


def test_threshold_static_dynamic_against_imagen_formula():
    torch.manual_seed(0)
    x = 1.5 * torch.randn(6, 3, 32, 32)
    for mode in ("static", "dynamic"):
        y = common.threshold(x, mode, 0.9)
        assert y.abs().max() <= 1 + 1e-6                                         # data range kept
        torch.testing.assert_close(common.threshold(y, mode, 0.9), y)            # idempotent in range
    inside = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(common.threshold(inside, "dynamic", 0.995), inside)     # s = max(1, q) = 1
    assert torch.equal(common.threshold(x, None), x)
    # Imagen dynamic thresholding, written independently in numpy.
    xn = x.numpy().reshape(6, -1)
    s = np.maximum(1.0, np.quantile(np.abs(xn), 0.9, axis=1))[:, None]
    ref = np.clip(xn, -s, s) / s
    np.testing.assert_allclose(common.threshold(x, "dynamic", 0.9).numpy().reshape(6, -1), ref, atol=1e-6)
    np.testing.assert_allclose(common.threshold(x, "static").numpy(), np.clip(x.numpy(), -1, 1))


def test_gaussian_teacher_through_sample_reproduces_mean_and_std():
    """DDIM with the exact denoiser transports N(0, I) to the data N(mu, s^2) (probability-flow ODE)."""
    torch.manual_seed(0)
    mu = torch.linspace(-0.5, 0.5, 3 * 32 * 32).reshape(1, 3, 32, 32)
    s = torch.full((3, 32, 32), 0.3)
    net = GaussianTeacher(mu, s)
    noise = torch.randn(2000, 3, 32, 32)
    y = torch.zeros(2000, dtype=torch.long)
    x = common.sample(lambda z, t, y: common.denoise(net, z, t, y), noise, y, torch.linspace(1, 0, 201).tolist())
    assert (x.mean(0) - mu[0]).abs().mean() < 0.01            # standard error ~ 0.3/sqrt(2000) = 0.007
    assert abs(x.std(0).mean() - 0.3) < 0.01
    # Classifier-free guidance with equal cond/uncond predictions is the identity.
    z = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(common.denoise(net, z, 0.5, y[:4], 3.0), common.denoise(net, z, 0.5, y[:4]))


def test_cfg_is_the_linear_extrapolation_on_v():
    mu = torch.randn(11, 3, 32, 32)
    net = GaussianTeacher(mu, 0.5)
    z, y, w = torch.randn(4, 3, 32, 32), torch.arange(4), 2.5
    cond = common.denoise(net, z, 0.4, y)
    uncond = common.denoise(net, z, 0.4, torch.full_like(y, common.NULL_CLASS))
    torch.testing.assert_close(common.denoise(net, z, 0.4, y, w), uncond + w * (cond - uncond), atol=1e-5, rtol=0)


# --- Rollouts and the DDIL sampler (DESIGN §4) ---

def test_rollout_sources_and_dagger_mixture():
    torch.manual_seed(0)
    teacher = GaussianTeacher(torch.zeros(1, 3, 32, 32), 0.5)
    student = GaussianTeacher(torch.full((1, 3, 32, 32), 0.3), 0.5)     # a biased student
    t_fn = lambda z, t, y: common.denoise(teacher, z, t, y)
    s_fn = lambda z, t, y: common.denoise(student, z, t, y)
    times = [1.0, 0.75, 0.5, 0.25, 0.0]
    noise, y = torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)
    j = torch.tensor([0, 1, 2, 3, 3, 2])
    z_t = common.rollout(s_fn, t_fn, noise, y, times, j, expert_prob=1.0, teacher_steps=32)
    z_s = common.rollout(s_fn, t_fn, noise, y, times, j, expert_prob=0.0)
    assert torch.equal(z_t[0], noise[0]) and torch.equal(z_s[0], noise[0])          # j = 0: pure noise
    for b in range(1, 6):   # independent references: the teacher's fine DDIM grid, the student's own grid
        ref_t = common.sample(t_fn, noise[b:b + 1], y[:1], torch.linspace(1, times[j[b]], 8 * j[b] + 1).tolist())
        ref_s = common.sample(s_fn, noise[b:b + 1], y[:1], times[:j[b] + 1])
        torch.testing.assert_close(z_t[b:b + 1], ref_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(z_s[b:b + 1], ref_s, atol=1e-6, rtol=0)
    assert (z_t[1:] - z_s[1:]).abs().mean() > 1e-3
    assert common.fine_grid(0.75, 0.5, 32) == [0.75 + (0.5 - 0.75) * i / 8 for i in range(9)]


class _Data:
    """Stand-in for common.Dataset: constant images, labels 0..9."""

    def batch(self, n, hflip=False):
        return torch.zeros(n, 3, 32, 32), torch.arange(n) % 10


def _draw_sources(sampler, progress, n=4000):
    ident = lambda z, t, y: torch.zeros_like(z)
    b = sampler.draw(n, progress, torch.tensor([0.5]), [1.0, 0.5, 0.0], ident, ident)
    return torch.bincount(b["source"], minlength=3).double() / n, b


def test_ddil_sampler_realised_fractions_match_priors_and_schedules():
    torch.manual_seed(0)
    end, start = [0.5, 0.1, 0.4], [1.0, 0.0, 0.0]
    closed_form = {"constant": lambda u: 1.0, "linear": lambda u: u,
                   "cosine": lambda u: 0.5 - 0.5 * math.cos(math.pi * u), "step": lambda u: float(u >= 1)}
    for schedule, w in closed_form.items():
        sampler = common.DDILSampler(_Data(), end, start, schedule, warmup=0.4)
        for progress in (0.0, 0.1, 0.2, 0.39, 0.4, 0.8):
            u = w(min(1.0, progress / 0.4))
            expect = (1 - u) * torch.tensor(start, dtype=torch.float64) + u * torch.tensor(end, dtype=torch.float64)
            torch.testing.assert_close(sampler.priors(progress), expect)
            frac, b = _draw_sources(sampler, progress)
            assert (frac - expect).abs().max() < 0.03, (schedule, progress, frac, expect)   # 4 sd at n = 4000
            assert b["x_t"].shape == (4000, 3, 32, 32) and b["t"].shape == b["y"].shape == (4000,)


def test_replay_buffer_refresh_fifo_and_state_dict():
    torch.manual_seed(0)
    calls = []
    counting = lambda z, t, y: (calls.append(len(z)), torch.zeros_like(z))[1]
    sampler = common.DDILSampler(_Data(), [0, 0, 1], buffer_size=100, refresh=0.25)
    times = [1.0, 0.5, 0.0]
    # Rollouts with j = 0 make no student call; count fresh states through the buffer pointer instead.
    sampler.draw(40, 1.0, torch.tensor([0.5]), times, counting, counting)
    assert sampler.buffers["student"][4] == 40                  # empty buffer: all 40 fresh
    sampler.draw(40, 1.0, torch.tensor([0.5]), times, counting, counting)
    assert sampler.buffers["student"][4] == 50                  # then ceil(0.25 * 40) = 10 fresh
    for _ in range(10):
        sampler.draw(40, 1.0, torch.tensor([0.5]), times, counting, counting)
    assert sampler.buffers["student"][4] == 100 and sampler.buffers["student"][3] == (50 + 100) % 100
    state = sampler.state_dict()
    other = common.DDILSampler(_Data(), [0, 0, 1], buffer_size=100, refresh=0.25)
    other.load_state_dict(state)
    assert torch.equal(other.buffers["student"][0], sampler.buffers["student"][0])
    fresh = common.DDILSampler(_Data(), [0, 0, 1], buffer_size=0)
    fresh.draw(40, 1.0, torch.tensor([0.5]), times, counting, counting)
    assert fresh.buffers["student"] is None                     # size 0: nothing kept


# --- Flags (DESIGN §4, §7) ---

def _parse(argv, default_source="fwd"):
    p = common.add_ddil_args(common.add_common_args(common.Parser(prog="x")))
    args = p.parse_args(argv)
    presets = {"smoke": dict(dataset="synthetic", iters=10, batch_size=4, lr=1e-3, ema=0.9, guidance=1.0,
                             log_every=1, save_every=1, eval_every=0, eval_samples=0)}
    return common.resolve(p, args, "m", {**presets, "cifar10": presets["smoke"]}, default_source)


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


def test_missing_cifar10_offline_is_one_line_naming_the_ways_out(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(common.UserError) as e:
        common.load_images("cifar10")
    assert "--data-dir" in str(e.value) and "--dataset synthetic" in str(e.value)


# --- Data ---

def test_synthetic_dataset_is_deterministic_balanced_and_separable():
    x, y = common.synthetic_dataset(500)
    x2, y2 = common.synthetic_dataset(500)
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
    x, y = common.load_images("cifar10", data_dir=path, limit=100)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8
    assert sorted(set(y.tolist())) == list(range(10))       # the spread slice keeps every class
    names = sorted(n for n in zipfile.ZipFile(path).namelist() if n.startswith("train/") and n.endswith(".jpg"))
    first = np.asarray(Image.open(io.BytesIO(zipfile.ZipFile(path).read(names[0]))).convert("RGB"))
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), first) and y[0] == 0     # airplane = class 0
    assert names[-1].split("/")[1] == "truck" and y[-1] == 9


# --- Checkpoints, resume, teacher ---

def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2})
    assert common.load_checkpoint(path)["step"] == 1
    with open(path, "r+b") as f:      # truncation (e.g. a full disk) is a one-line UserError
        f.truncate(100)
    with pytest.raises(common.UserError, match="unreadable checkpoint"):
        common.load_checkpoint(path)


def test_teacher_resume_is_bitwise_identical(tmp_path, monkeypatch):
    """Interrupt (SIGINT at step 3, saved at the step boundary) -> rerun resumes -> same parameters
    as an uninterrupted run, on the CPU."""
    import teacher
    argv = ["--preset", "smoke", "--iters", "6", "--batch-size", "8", "--log-every", "2", "--save-every", "100",
            "--ch", "32", "--ch-mult", "1,2"]
    teacher.main(argv + ["--out", str(tmp_path / "a")])
    original = common.ema_update
    calls = []

    def interrupt_at_third(*a, **k):
        original(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(common, "ema_update", interrupt_at_third)
    assert teacher.main(argv + ["--out", str(tmp_path / "b")]) is None        # stopped
    assert common.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 3
    monkeypatch.setattr(common, "ema_update", original)
    teacher.main(argv + ["--out", str(tmp_path / "b")])
    a, b = (common.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in "ab")
    assert a["step"] == b["step"] == 6
    for net in ("model", "ema"):
        for k in a["nets"][net]:
            assert torch.equal(a["nets"][net][k], b["nets"][net][k]), (net, k)


def test_smoke_teacher_loss_falls_and_leaves_run_files(tiny_teacher):
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (tiny_teacher / f).exists(), f
    losses = [json.loads(line)["loss"] for line in open(tiny_teacher / "log.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    cfg = json.load(open(tiny_teacher / "config.json"))
    assert cfg["method"] == "teacher" and cfg["iters"] == 24 and "torch" in cfg["versions"]
