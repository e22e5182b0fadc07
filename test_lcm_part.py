"""Tests of ddil_lcm.py (LCM consistency distillation + DDIL); the lead merges them into test_ddil.py.

Oracles: the exact boundary condition of LCM's scalings; an analytic Gaussian teacher (data
N(mu_y, s^2) per class has a closed-form denoiser, DDIM step and consistency function); an
independent few-line reference of vanilla LCM; an uninterrupted run for the kill-and-resume check.
CPU only. One tiny teacher (teacher.py --preset smoke --iters 20) is shared by the script tests.
"""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import ddil_lcm as lcm
from common import _bc

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--preset", "smoke", "--iters", "6", "--eval-samples", "0", "--log-every", "2", "--batch-size", "8"]
# DDIL runs kept small: short teacher rollouts and a small replay buffer (same code paths as the defaults).
FAST_DDIL = ["--ddil", "--reflected", "--buffer-size", "16", "--teacher-rollout-steps", "8"]


# --- Analytic oracle: x_0 ~ N(mu_y, s^2 I) per class (row NULL_CLASS of mu = the unconditional mean) ---

class GaussianTeacher(torch.nn.Module):
    """Exact denoiser x̂_0(z_t) = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z_t - alpha mu), returned as
    v = (alpha z - x̂_0) / sigma so that common.denoise (CFG, thresholding) works on it."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s                        # mu [11, 3, 32, 32]; s a float

    def x0(self, z, t, y):
        a, sg = (_bc(v, z) for v in common.alpha_sigma(t))
        mu = self.mu[y]
        return mu + a * self.s ** 2 / (a ** 2 * self.s ** 2 + sg ** 2) * (z - a * mu)

    def forward(self, z, t, y):
        a, sg = (_bc(v, z) for v in common.alpha_sigma(t))
        return (a * z - self.x0(z, t, y)) / sg


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


# --- (1) boundary condition ---

def test_boundary_condition_exact_for_any_network():
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


def test_sampling_schedule_is_lcms_and_flags_are_checked():
    times = lcm.sampling_times(50, 4)
    assert [round(1000 * t) - 1 for t in times[:-1]] == [999, 759, 499, 259] and times[-1] == 0.0
    with pytest.raises(common.UserError, match="--steps"):
        lcm.parse_args(["--preset", "smoke", "--steps", "6", "--skip", "10"])
    with pytest.raises(common.UserError, match="--huber-c"):
        lcm.parse_args(["--preset", "smoke", "--huber-c", "0"])
    assert lcm.parse_args(["--preset", "smoke"]).priors == [1.0, 0.0, 0.0]     # baseline: forward data only


# --- (2) the teacher's DDIM step inside the loss, against the closed form ---

@pytest.mark.parametrize("clip", [None, "static"])
def test_teacher_step_in_loss_matches_closed_form(clip):
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

def test_exact_consistency_function_zeroes_the_loss():
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


# --- Script-level tests: one tiny teacher for all ---

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    subprocess.run([sys.executable, "teacher.py", "--preset", "smoke", "--iters", "20", "--log-every", "5",
                    "--out", str(out)], cwd=HERE, check=True, capture_output=True)
    return str(out / "ckpt.pt")


# --- (4) baseline reduction: --beta-fwd alone is vanilla LCM, bit for bit ---

def test_beta_fwd_alone_is_vanilla_lcm_bitwise(tiny_teacher, tmp_path):
    args = lcm.parse_args(["--preset", "smoke", "--teacher", tiny_teacher, "--beta-fwd", "--batch-size", "8",
                           "--out", str(tmp_path)])
    B, N, k, w, c = args.batch_size, args.solver_steps, args.skip, args.guidance, args.huber_c
    data = common.Dataset(*common.load_images("synthetic"), "cpu")
    teacher, ckpt = common.load_teacher(tiny_teacher, "cpu")
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


# --- (5) the script runs end to end, baseline and --ddil --reflected ---

def run_script(*argv):
    proc = subprocess.run([sys.executable, "ddil_lcm.py", *argv], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def ddil_run(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm_ddil")
    run_script(*FAST, *FAST_DDIL, "--teacher", tiny_teacher, "--out", str(out))
    return out


@pytest.mark.parametrize("mode", ["baseline", "ddil"])
def test_smoke_run_leaves_its_files(mode, tiny_teacher, ddil_run, tmp_path):
    out = ddil_run if mode == "ddil" else tmp_path
    if mode == "baseline":
        run_script(*FAST, "--teacher", tiny_teacher, "--out", str(out))
    for name in ("config.json", "log.jsonl", "ckpt.pt", "samples.png"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and set(ckpt["nets"]) == {"student", "target", "ema"}
    last = [line for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert '"loss"' in last and "frac_fwd" in last
    if mode == "ddil":
        assert ckpt["sampler"]["student"] is not None      # backward states reached the replay buffer


# --- (6) a killed run resumes and ends where an uninterrupted run ends ---

def test_killed_run_resumes_bitwise(tiny_teacher, ddil_run, tmp_path):
    argv = [*FAST, *FAST_DDIL, "--teacher", tiny_teacher, "--out", str(tmp_path), "--save-every", "2"]
    proc = subprocess.Popen([sys.executable, "ddil_lcm.py", *argv], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_path = tmp_path / "ckpt.pt"
    while not ckpt_path.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt_path, weights_only=True)["step"] < 6, "the run finished before it could be killed"
    resumed = run_script(*argv)
    assert "resumed from" in resumed.stdout
    got = torch.load(ckpt_path, weights_only=True)
    want = torch.load(ddil_run / "ckpt.pt", weights_only=True)    # the same command, never interrupted
    assert got["step"] == want["step"] == 6
    for name in ("student", "target", "ema"):
        for key, value in want["nets"][name].items():
            assert torch.equal(got["nets"][name][key], value), (name, key)


# --- make_generator: K-step multistep consistency sampling, against a written-out loop ---

def test_generator_is_multistep_consistency_sampling(ddil_run):
    ckpt = torch.load(ddil_run / "ckpt.pt", weights_only=True)
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
