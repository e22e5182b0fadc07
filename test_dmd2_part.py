"""Tests of ddil_dmd2.py (to be merged into test_ddil.py). CPU only; run: pytest -q test_dmd2_part.py"""

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

HERE = os.path.dirname(os.path.abspath(__file__))


class GaussianDenoiser(nn.Module):
    """Analytic oracle: data x_0 ~ N(mu, s^2) per pixel has the exact denoiser
    x̂_0(z_t) = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (z_t - alpha_t mu); returned as
    v = (alpha_t z - x̂_0) / sigma_t so that common.denoise recovers x̂_0. Ignores the label."""

    def __init__(self, mu, s=0.5):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, z, t, y, return_features=False):
        alpha_t, sigma_t = (common._bc(a, z) for a in common.alpha_sigma(t))
        x0 = self.mu + alpha_t * self.s ** 2 / (alpha_t ** 2 * self.s ** 2 + sigma_t ** 2) * (z - alpha_t * self.mu)
        return (alpha_t * z - x0) / sigma_t


def dm_loss(x, teacher, critic, clips=((None, 0.995), (None, 0.995)), guidance=1.5, seed=0):
    torch.manual_seed(seed)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    return ddil_dmd2.distribution_matching_loss(x, y, teacher, critic, guidance, 0.02, 0.98, *clips)


# --- The distribution-matching gradient against the Gaussian oracle ---

def test_grad_zero_when_fake_equals_real():
    mu = 0.3 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = mu + 0.5 * torch.randn(8, 3, 32, 32)
    loss, extra = dm_loss(x, GaussianDenoiser(mu), GaussianDenoiser(mu.clone()))
    assert torch.equal(extra["grad"], torch.zeros_like(x))
    assert torch.equal(loss, torch.zeros(8))


def test_descent_direction_points_from_fake_mean_to_real_mean():
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


def test_surrogate_gradient_is_grad():
    g = torch.Generator().manual_seed(3)
    mu_real, mu_fake = 0.3 * torch.randn(2, 3, 32, 32, generator=g)
    x = (mu_fake + 0.5 * torch.randn(4, 3, 32, 32, generator=g)).requires_grad_(True)
    loss, extra = dm_loss(x, GaussianDenoiser(mu_real), GaussianDenoiser(mu_fake))
    loss.mean().backward()                                   # the reduction used in training
    # autograd evaluates x - (x - grad), exact up to one rounding of x (|x| <= ~2): atol 1e-6 / N
    torch.testing.assert_close(x.grad, extra["grad"] / x.numel(), rtol=1e-6, atol=1e-6 / x.numel())
    assert extra["grad"].abs().max() > 0.1


# --- Thresholding flags: each touches only its own network's x̂_0 ---

def test_threshold_flags_touch_only_their_network():
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


# --- Baseline reduction: the sources of the generator's inputs ---

@pytest.fixture(scope="module")
def tiny_data():
    g = torch.Generator().manual_seed(0)
    return common.Dataset(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.arange(64) % 10, "cpu")


def draw(tiny_data, *flags, n=32):
    args = ddil_dmd2.parse_args(["--preset", "smoke", *flags])
    sampler = common.make_sampler(args, tiny_data)
    net = GaussianDenoiser(torch.zeros(3, 32, 32))
    fn = lambda z, t, y: common.denoise(net, z, t, y)
    torch.manual_seed(0)
    return args, ddil_dmd2.ddil_batch(sampler, n, 0.5, args.steps, fn, fn)


def test_baseline_is_backward_simulation_and_beta_fwd_is_forward(tiny_data):
    args, b = draw(tiny_data)
    assert args.priors == [0.0, 0.0, 1.0]
    assert (b["source"] == 2).all()
    assert set(b["t"].tolist()) <= {1.0, 0.75, 0.5, 0.25}
    args, b = draw(tiny_data, "--beta-fwd", "--threshold-teacher")
    assert args.priors == [1.0, 0.0, 0.0] and args.threshold_teacher and not args.threshold_critic
    assert (b["source"] == 0).all()
    assert set(b["t"].tolist()) <= {1.0, 0.75, 0.5, 0.25}
    _, b = draw(tiny_data, "--steps", "1")                     # one-step DMD2: G sees pure noise only
    assert (b["source"] == 2).all() and (b["t"] == 1.0).all()
    assert abs(b["x_t"].std().item() - 1.0) < 0.05
    _, b = draw(tiny_data, "--ddil", n=256)                   # the mixture is shuffled across the batch
    assert set(b["source"][:32].tolist()) != {int(b["source"][0])}


# --- The script end to end (subprocesses on a tiny teacher) ---

# One thread: at these tiny batches threads only add OpenMP barriers, which on a shared CPU spin for
# seconds per op (measured: 0.08 s vs 3.9 s for a batch-4 UNet forward with two other jobs running).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*argv):
    return subprocess.run([sys.executable, "ddil_dmd2.py", *argv], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    r = subprocess.run([sys.executable, "teacher.py", "--preset", "smoke", "--iters", "20", "--log-every", "5",
                        "--out", str(out)], cwd=HERE, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    return str(out / "ckpt.pt")


SMALL = ["--preset", "smoke", "--iters", "4", "--batch-size", "4", "--eval-samples", "0", "--log-every", "2"]


def test_beta_fwd_threshold_teacher_run(tiny_teacher, tmp_path):
    out = tmp_path / "d"
    r = run_script(*SMALL, "--teacher", tiny_teacher, "--beta-fwd", "--threshold-teacher", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (out / f).exists(), f
    assert "critic_loss" in r.stdout and "frac_fwd 1" in r.stdout


def test_ddil_reflected_run_resumes_bitwise_after_kill(tiny_teacher, tmp_path):
    argv = [*SMALL, "--iters", "4", "--save-every", "2", "--teacher", tiny_teacher, "--ddil", "--reflected",
            "--buffer-size", "16"]
    ref = tmp_path / "ref"
    r = run_script(*argv, "--out", str(ref))
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (ref / f).exists(), f
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "ddil_dmd2.py", *argv, "--out", str(out)], cwd=HERE, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "ckpt.pt").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = common.load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert killed_at < 4
    r = run_script(*argv, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'ckpt.pt'} at step {killed_at}" in r.stdout
    a, b = common.load_checkpoint(str(ref / "ckpt.pt")), common.load_checkpoint(str(out / "ckpt.pt"))
    assert a["step"] == b["step"] == 4
    for name in ("student", "critic", "ema"):
        for k, v in a["nets"][name].items():
            assert torch.equal(v, b["nets"][name][k]), (name, k)


def test_gan_head_trains_and_is_checkpointed(tiny_teacher, tmp_path):
    out = tmp_path / "gan"
    r = run_script(*SMALL, "--iters", "2", "--batch-size", "2", "--fake-updates", "1", "--gan-weight", "0.01",
                   "--teacher", tiny_teacher, "--out", str(out))
    assert r.returncode == 0, r.stderr
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    head0 = ddil_dmd2.gan_head(ckpt["unet"]["ch"] * ckpt["unet"]["ch_mult"][-1]).state_dict()
    assert ckpt["nets"]["head"].keys() == head0.keys()
    assert "gan_loss" in open(out / "log.jsonl").read()
