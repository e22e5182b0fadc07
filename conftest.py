"""Shared by the two test files: the analytic Gaussian teacher (the oracle most tests use), running a
script as a user would, and the smoke teacher every script test distils (trained once per session)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import common
import ddil_dmd2
import ddil_lcm as lcm
import runs
from common import _bc, alpha_sigma

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


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
    a, b = runs.load_checkpoint(str(a_path)), runs.load_checkpoint(str(b_path))
    assert a["step"] == b["step"]
    for name in names:
        for k, v in a["nets"][name].items():
            assert torch.equal(v, b["nets"][name][k]), (name, k)
    return a, b


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


def GaussianDenoiser(mu, s=0.5):
    """The analytic teacher with one class: data N(mu, s^2) per pixel whatever the label."""
    return GaussianTeacher(mu[None], s)


def dm_loss(x, teacher, critic, clips=((None, 0.995), (None, 0.995)), guidance=1.5, seed=0):
    torch.manual_seed(seed)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    return ddil_dmd2.distribution_matching_loss(x, y, teacher, critic, guidance, 0.02, 0.98, *clips)
