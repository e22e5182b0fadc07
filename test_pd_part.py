"""Tests of ddil_pd.py (issue 3), to be merged into test_ddil.py. CPU-only, every check against an oracle:
the analytic Gaussian teacher's exact x̂_0, Alg. 2 written out independently here, and bitwise
comparison with an uninterrupted run.

    python -m pytest -q test_pd_part.py
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import common
import ddil_pd
from common import alpha_sigma

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


class GaussianTeacher(nn.Module):
    """Exact v-prediction 'network' for data x_0 ~ N(mu_y, diag s^2): x̂_0(z_t) = mu + alpha_t s^2 /
    (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu); returns v = (alpha_t z - x̂_0) / sigma_t."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32))   # [C, 3, H, W]
        self.register_buffer("s", torch.as_tensor(s, dtype=torch.float32))

    def x0(self, z, t, y):
        alpha_t, sigma_t = (common._bc(a, z) for a in alpha_sigma(t))
        mu = self.mu[y]
        return mu + alpha_t * self.s ** 2 / (alpha_t ** 2 * self.s ** 2 + sigma_t ** 2) * (z - alpha_t * mu)

    def forward(self, z, t, y):
        alpha_t, sigma_t = (common._bc(a, z) for a in alpha_sigma(t))
        return (alpha_t * z - self.x0(z, t, y)) / sigma_t


# One intra-op thread for the ddil_pd runs (batches of 4): on a shared 2-core machine OpenMP's spinning
# threads made one --ddil run 3x slower (18 s vs 54 s); alone, 1 thread costs 10 s vs 8 s.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, **kw):
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    r = run(["teacher.py", "--preset", "smoke", "--iters", "20", "--log-every", "5", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return os.path.join(out, "ckpt.pt")


# --- (1) the target against the closed form, with the analytic teacher ---

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

def test_beta_fwd_alone_gives_the_vanilla_pd_loss_bitwise(tiny_teacher, tmp_path):
    args = ddil_pd.parse_args(["--preset", "smoke", "--beta-fwd", "--teacher", tiny_teacher, "--out", str(tmp_path)])
    assert args.priors == [1.0, 0.0, 0.0] and not (args.threshold_teacher or args.threshold_student)
    teacher, ckpt = common.load_teacher(tiny_teacher, "cpu")
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
def test_teacher_thresholding_changes_only_out_of_range_targets(mode):
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


# --- (4) the smoke runs leave DESIGN §7's files; (5) a killed run resumes bit for bit ---

RUN = ["ddil_pd.py", "--preset", "smoke", "--iters", "6", "--batch-size", "4", "--eval-samples", "0"]
DDIL = ["--ddil", "--reflected", "--buffer-size", "32", "--save-every", "2", "--log-every", "1"]


def _log(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.fixture(scope="module")
def ddil_run(tiny_teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pd_ddil"))
    r = run([*RUN, *DDIL, "--teacher", tiny_teacher, "--out", out], env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out


def _check_run_files(out, iters, ddil):
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert os.path.exists(os.path.join(out, f)), f
    last = _log(out)[-1]
    assert (last["step"], last["round"], last["n"]) == (iters, 2, 4)        # 16 -> 8 -> 4 steps
    assert {"loss", "loss_fwd", "frac_fwd", "frac_teacher", "frac_student", "clip", "lr"} <= last.keys()
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["threshold_teacher"] == config["threshold_student"] == ddil
    if ddil:
        assert any(r.get("frac_student", 0) > 0 for r in _log(out))


def test_smoke_runs_leave_run_files(tiny_teacher, ddil_run, tmp_path):
    r = run([*RUN, "--teacher", tiny_teacher, "--out", str(tmp_path)], env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    _check_run_files(str(tmp_path), 6, ddil=False)
    _check_run_files(ddil_run, 6, ddil=True)


def test_killed_run_resumes_bitwise(tiny_teacher, ddil_run, tmp_path):
    """SIGKILL twice: after the first checkpoint (step 2, round 1: the resumed run then crosses into
    round 2) and after a round-2 checkpoint (step 4: restores the round teacher and the replay buffer);
    the final weights equal those of the uninterrupted ddil_run bit for bit."""
    out = str(tmp_path)
    cmd = [PY, *RUN, *DDIL, "--teacher", tiny_teacher, "--out", out]
    for ready in (lambda: os.path.exists(os.path.join(out, "ckpt.pt")),
                  lambda: any(r["step"] >= 5 for r in _log(out))):          # ckpt at step 4, round 2
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
        while not ready() and p.poll() is None:
            time.sleep(0.01)
        assert p.poll() is None, "the run finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = run(cmd[1:], env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a = torch.load(os.path.join(ddil_run, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6 and b["round"] == 1
    for net in ("student", "ema"):
        assert all(torch.equal(a["nets"][net][k], v) for k, v in b["nets"][net].items())
