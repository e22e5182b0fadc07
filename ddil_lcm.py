"""LCM-style consistency distillation of the teacher, with DDIL and reflected diffusion.

Latent Consistency Models (Luo et al. 2023, arXiv 2310.04378: §4.2, Algorithm 1 "latent consistency
distillation"), run here in pixel space, on the consistency models of Song et al. 2023 (arXiv
2303.01469: §3 parameterisation, §4 consistency distillation, Algorithm 1 multistep sampling). DDIL
(Garrepalli et al., arXiv 2410.11971) only changes where the training states z_{t_{n+k}} come from
(DESIGN §4); the loss is LCM's.

    skeleton     t_n = n / N, n = 0..N (--solver-steps N); t_0 = 0 is the boundary; n ~ U{0..N-k} (--skip k)
    consistency  f_θ(z, t) = c_skip(t) z + c_out(t) x̂_0,θ(z, t)                                   (CM §3)
                 c_skip = σ_d² / ((s t)² + σ_d²),  c_out = s t / sqrt((s t)² + σ_d²),  s = 1000 · 10,  σ_d = 0.5
    teacher      ẑ_{t_n} = α_{t_n} x̂_0^w + σ_{t_n} (z_{t_{n+k}} − α_{t_{n+k}} x̂_0^w) / σ_{t_{n+k}}   (one DDIM step)
                 x̂_0^w = x̂_0^∅ + w (x̂_0^c − x̂_0^∅)  (CFG; LCM writes w = 1 + ω);  ẑ_{t_0} = x̂_0^w
    loss         L = d(f_θ(z_{t_{n+k}}, t_{n+k}), sg f_θ⁻(ẑ_{t_n}, t_n)),   θ⁻ ← μ θ⁻ + (1 − μ) θ   (LCM Alg. 1)
                 d = pseudo-Huber sqrt(‖Δ‖² + c²) − c over the image (iCT), or the per-pixel mean of Δ²
    sampling     x̂_0 = f_θ(z_{τ_i}, τ_i);  z_{τ_{i+1}} = α_{τ_{i+1}} x̂_0 + σ_{τ_{i+1}} ε_fresh       (CM Alg. 1)

Thresholding: --threshold-teacher clips the teacher's guided x̂_0 before its DDIM step; --threshold-student
clips the target f_θ⁻ (and implies --sample-clip); --sample-clip clamps f_θ at every step of the multistep
sampler, in DDIL rollouts and at inference (off by default, as diffusers' LCMScheduler). Gradients are
clipped at norm 1 (--grad-clip, as diffusers' LCM distillation script).

Departures from LCM, all deliberate: pixel space (no VAE); one fixed guidance w = --guidance instead
of LCM's ω ~ U[2, 14] with a w-embedding (the student bakes the teacher's CFG in and samples with
w = 1); continuous time t = t_discrete / 1000, so LCM's 1000-step timesteps map onto t_n = n / N.

    python ddil_lcm.py --preset smoke                              # baseline: forward-diffused data only
    python ddil_lcm.py --preset smoke --ddil --reflected           # + DDIL mixture + thresholding
    python ddil_lcm.py --preset cifar10 --ddil --data-dir ../shared/data/cifar10-jpeg-train.zip

Expected result: the smoke preset is a pipeline check (80 iterations of a 1.2 M-parameter UNet on
synthetic shapes, seed 0, 2-core CPU). On the exact benchmark (--preset gmm) results/gmm/ has its metrics.
samples.png shows the class shapes after 4 steps. cifar10: ~35 min per run on one H100 (estimated
from FLOPs, README); metrics come from ablate.py runs.
"""

import os

import torch

import cli
import common
import runs
import scoring
from common import _bc
from teacher import ensure_teacher

METHOD = "lcm"
BASELINE_SOURCE = "fwd"   # the inputs of the method without DDIL (DESIGN §4)

# Preset values of every flag whose default is None. cifar10: 20k iterations of 128, ~9.5 TFLOP each
# (teacher CFG step, target and student forward, student backward): ~35 min on one H100 at 100 TFLOP/s
# (an estimate; bench.py measures it). --ddil adds its rollouts: bench.py's DDIL overhead row.
PRESETS = {
    "smoke": dict(dataset="synthetic", iters=80, batch_size=16, lr=5e-4, ema=0.99, warmup=10, guidance=1.5,
                  log_every=10, save_every=40, eval_every=0, eval_samples=100),
    "gmm": dict(dataset="gmm", iters=300, batch_size=32, lr=5e-4, ema=0.99, warmup=20, guidance=1.0,
                log_every=25, save_every=100, eval_every=0, eval_samples=1000),
    "cifar10": dict(dataset="cifar10", iters=20_000, batch_size=128, lr=2e-4, ema=0.999, warmup=500, guidance=1.5,
                    log_every=200, save_every=2000, eval_every=0, eval_samples=10_000),
}
# gmm2: the second exact benchmark (gmm.py MIXTURES) with the first one's sizes, but for the learning rate and the
# budget, chosen on its baseline's learning curves alone (results/gmm2/README.md, "Learning curves"): at the gmm
# preset's 5e-4 the student drifts from the exact teacher; at 1e-4 fd_px improves to 400 iterations and is flat
# (within 5 %) from 400 to 800, the pre-registered rule's budget.
PRESETS["gmm2"] = dict(PRESETS["gmm"], dataset="gmm2", iters=400, lr=1e-4)
# quick: the first run on a CPU (--preset auto without CUDA): gmm2 with the exact teacher, briefly.
PRESETS["quick"] = dict(PRESETS["gmm2"], iters=100, log_every=10, save_every=50, eval_samples=200)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(p)
    cli.add_ddil_args(p)
    g = p.add_argument_group("LCM consistency distillation (Luo et al. 2023, Alg. 1)")
    g.add_argument("--solver-steps", type=cli.positive_int, default=50,
                   help="N: skeleton t_n = n/N, n = 0..N, of the teacher's ODE solver (LCM: 50 DDIM timesteps)")
    g.add_argument("--skip", type=cli.positive_int, default=1,
                   help="k: skipping interval, pairs (t_{n+k}, t_n); 1 on the 50-step skeleton is LCM's k = 20 "
                        "on 1000 DDPM steps")
    g.add_argument("--steps", type=cli.positive_int, default=4,
                   help="K: multistep consistency sampling steps, at skeleton indices N - floor(iN/K) "
                        "(N = 50, K = 4: LCM's timesteps 999, 759, 499, 259)")
    g.add_argument("--target-ema", type=cli.fraction, default=0.95,
                   help="μ: decay of the target network θ⁻ <- μ θ⁻ + (1 - μ) θ, kept apart from --ema (LCM: 0.95)")
    g.add_argument("--loss", choices=["huber", "l2"], default="huber",
                   help="d: pseudo-Huber sqrt(‖Δ‖² + c²) - c over the image (iCT, robust to outlier targets) "
                        "or l2: per-pixel mean of Δ²")
    g.add_argument("--huber-c", type=cli.positive, default=0.03,
                   help="c of the pseudo-Huber d: iCT's 0.00054 sqrt(D) for D = 3·32·32 pixels")
    g.add_argument("--timestep-scaling", type=cli.positive, default=10.0,
                   help="LCM's boundary scaling: c_skip, c_out are evaluated at s t with s = 1000 × this (LCM: 10)")
    g.add_argument("--warmup", type=cli.count, default=None, help="learning-rate warm-up iterations (preset)")
    g.add_argument("--grad-clip", type=cli.nonnegative, default=1.0,
                   help="clip the gradient norm of θ (diffusers' LCM distillation script: max_grad_norm 1.0); 0 = off")
    cli.preset_help(p, PRESETS)
    args = p.parse_args(argv)
    cli.resolve(p, args, METHOD, PRESETS, default_source=BASELINE_SOURCE, sample_clip=False)   # LCMScheduler: no clip
    N, k, K = args.solver_steps, args.skip, args.steps
    if K * k > N:
        raise common.UserError(f"--steps {K} × --skip {k} exceeds --solver-steps {N}: every sampling time must sit "
                               f"at a skeleton index >= k to train as z_(t_(n+k)); lower --steps or --skip or raise "
                               f"--solver-steps")
    if not args.huber_c > 0:
        raise common.UserError(f"--huber-c {args.huber_c}: c must be > 0 (c = 0 has no gradient at Δ = 0)")
    if not args.grad_clip >= 0:
        raise common.UserError(f"--grad-clip {args.grad_clip}: give a maximum gradient norm >= 0 (0 = off)")
    if not args.timestep_scaling > 0:
        raise common.UserError(f"--timestep-scaling {args.timestep_scaling}: must be > 0")
    return args


# --- Skeleton and sampling schedule ---

def sampling_times(N, K):
    """LCM's K-step inference schedule on the skeleton, descending, ending at 0: indices
    N - floor(i N / K), i = 0..K-1 (diffusers' LCMScheduler). N = 50, K = 4: indices 50, 38, 25, 13 =
    LCM's timesteps 999, 759, 499, 259 (t_discrete = 20 n - 1). Every index is >= ceil(N / K) >= k."""
    return [(N - i * N // K) / N for i in range(K)] + [0.0]


# --- LCM: boundary scalings, consistency function, teacher solver step, loss ---

SIGMA_DATA = 0.5     # σ_d of LCM's scalings (CM's EDM value)


def boundary_scalings(t, timestep_scaling=10.0):
    """(c_skip, c_out) of LCM (diffusers' scalings_for_boundary_conditions) at t_discrete = 1000 t:
    c_skip(0) = 1 and c_out(0) = 0 exactly, so f_θ(z, 0) = z. Already at t = 1/50 (s t = 200)
    c_skip ≈ 6e-6: away from the boundary f_θ is the student's x̂_0."""
    st = 1000.0 * timestep_scaling * torch.as_tensor(t, dtype=torch.float32)
    return SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2), st / (st ** 2 + SIGMA_DATA ** 2).sqrt()


def consistency_fn(net, z, t, y, timestep_scaling=10.0):
    """f_θ(z, t) = c_skip(t) z + c_out(t) x̂_0,θ(z, t)  (CM §3). x̂_0,θ from the v-network with w = 1:
    the student has the teacher's CFG baked in. z: [B, 3, 32, 32]; t: float or [B]. Returns fp32."""
    c_skip, c_out = (_bc(c.to(z.device), z) for c in boundary_scalings(t, timestep_scaling))
    return c_skip * z + c_out * common.denoise(net, z, t, y)


def teacher_step(teacher, z, t, s, y, guidance, clip):
    """Ψ: one CFG DDIM step of the teacher from t to s (LCM §4.2 with a DDIM solver). Guiding x̂_0 and
    then stepping equals LCM's combination of the two DDIM steps, (1 + ω) Ψ_c − ω Ψ_∅, since the step is
    affine in x̂_0; the guided x̂_0 is thresholded (teacher clip) before the step. At s = 0 the step
    returns x̂_0 itself. Returns ẑ_s [B, 3, 32, 32] and the un-thresholded x̂_0 (for the clip %)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=z.device)
    x0_raw = common.denoise(teacher, z, t, y, guidance)
    x0 = common.threshold(x0_raw, *clip)
    z_s = common.ddim_step(z, t, s, x0)
    return torch.where(_bc(s == 0, z), x0, z_s), x0_raw


def distance(pred, target, kind, c):
    """d per example [B]: 'l2' the per-pixel mean of Δ²; 'huber' the pseudo-Huber sqrt(‖Δ‖² + c²) − c
    on the whole image (iCT, Song & Dhariwal 2023, arXiv 2310.14189, §3.3). Huber is the default, with
    iCT's c = 0.00054 sqrt(3·32·32) ≈ 0.03: 32×32 pixel space is the setting iCT tuned c on, and the
    distance grows like ‖Δ‖, not ‖Δ‖², on large residuals (off-manifold DDIL states, an early θ⁻)."""
    sq = (pred.float() - target.float()).square().flatten(1)
    return sq.mean(1) if kind == "l2" else (sq.sum(1) + c * c).sqrt() - c


def lcm_loss(f_theta, f_target, teacher, z, n_k, y, *, N, k, guidance, clip_teacher, clip_target, loss, huber_c):
    """LCM Algorithm 1 on a batch of skeleton states z = z_{t_{n+k}} [B, 3, 32, 32] at indices n_k = n + k
    [B] (long, in {k..N}). f_theta / f_target: (z, t, y) -> consistency function of θ / θ⁻.
    Returns the per-example loss [B] and the clip fractions (device scalars)."""
    t_nk, t_n = n_k.float() / N, (n_k - k).float() / N                           # t_{n+k}, t_n
    with torch.no_grad():                  # sg(·): the target carries no gradient (LCM Alg. 1)
        z_n, x0_teacher = teacher_step(teacher, z, t_nk, t_n, y, guidance, clip_teacher)   # ẑ_{t_n}
        target_raw = f_target(z_n, t_n, y)                  # f_θ⁻(ẑ_{t_n}, t_n); = ẑ_{t_0} at t_n = 0
        target = common.threshold(target_raw, *clip_target)                 # student clip on the target
    pred = f_theta(z, t_nk, y)                                               # f_θ(z_{t_{n+k}}, t_{n+k})
    clips = dict(clip=common.out_of_range(x0_teacher), clip_target=common.out_of_range(target_raw),
                 clip_student=common.out_of_range(pred))
    return distance(pred, target, loss, huber_c), clips


@torch.no_grad()
def update_target(target, net, mu):
    """θ⁻ <- sg(μ θ⁻ + (1 − μ) θ) with LCM's fixed μ (no warm-up, unlike the evaluation EMA)."""
    torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), 1 - mu)


# --- One training step's loss on the DDIL batch ---

def step_loss(args, sampler, progress, student, target, teacher):
    """Draw the DDIL batch on the skeleton and return (per-example loss [B], clip fractions, source [B]).
    Forward states sit at t_{n+k}, n ~ U{0..N-k}; backward states at the K-step schedule's times,
    which are skeleton times with index >= k (parse_args checks K k <= N), trained as z_{t_{n+k}}."""
    N, k = args.solver_steps, args.skip
    clip_teacher = cli.clip_spec(args, args.threshold_teacher)
    clip_student = cli.clip_spec(args, args.threshold_student)           # the target f_θ⁻
    clip_sample = cli.clip_spec(args, args.sample_clip)                   # the student's sampler
    f_theta = lambda z, t, y: consistency_fn(student, z, t, y, args.timestep_scaling)
    f_target = lambda z, t, y: consistency_fn(target, z, t, y, args.timestep_scaling)
    # Rollouts use the ONLINE student θ: DAgger's current policy visits the states it is trained on next.
    student_fn = lambda z, t, y: common.threshold(f_theta(z, t, y), *clip_sample)
    teacher_fn = lambda z, t, y: common.denoise(teacher, z, t, y, args.guidance, clip=clip_teacher)
    with torch.no_grad(), runs.autocast(args):
        b = sampler.draw(args.batch_size, progress=progress, fwd_times=torch.arange(k, N + 1) / N,
                         times=sampling_times(N, args.steps), student_fn=student_fn, teacher_fn=teacher_fn,
                         renoise=torch.randn_like)     # multistep consistency sampling: fresh ε each step
    z = b["x_t"]                                                          # [B, 3, 32, 32]
    if z.is_cuda:
        z = z.contiguous(memory_format=torch.channels_last)
    n_k = (b["t"] * N).round().long()                                     # skeleton index n + k
    with runs.autocast(args):
        loss, clips = lcm_loss(f_theta, f_target, teacher, z, n_k, b["y"], N=N, k=k, guidance=args.guidance,
                               clip_teacher=clip_teacher, clip_target=clip_student, loss=args.loss,
                               huber_c=args.huber_c)
    return loss, clips, b["source"]


# --- Sampling (samples.png and eval.py) ---

def make_student(ckpt, device):
    """(x0_fn, times, stochastic): x0_fn(z, t, y) = f_θ(z, t) of nets['ema'] with the run's scalings and
    sampling-time clipping (--sample-clip), the K-step schedule, and re-noising with fresh noise (stochastic)."""
    cfg = ckpt["config"]
    net = runs.build_unet(ckpt["unet"], device)
    net.load_state_dict(ckpt["nets"]["ema"])
    net.eval().requires_grad_(False)
    clip = (cfg["threshold_mode"] if cfg["sample_clip"] else None, cfg["threshold_percentile"])
    times = sampling_times(cfg["solver_steps"], cfg["steps"])
    return (lambda z, t, y: common.threshold(consistency_fn(net, z, t, y, cfg["timestep_scaling"]), *clip)), times, True


def make_generator(ckpt, device):
    """generate(noise, labels, renoise) -> x̂_0 [B, 3, 32, 32]: K-step multistep consistency sampling;
    renoise(z) gives the fresh ε of each re-noising (global-RNG noise when None)."""
    x0_fn, times, _ = make_student(ckpt, device)
    return lambda noise, labels, renoise=None: common.sample(x0_fn, noise, labels, times, renoise or torch.randn_like)


def evaluate(run_dir, n_samples=None, device=None, **options):
    """A run's metrics.json: its sampler's samples scored, and its agreement with its teacher (scoring.py)."""
    return scoring.evaluate_checkpoint(run_dir, make_generator, make_student, n_samples, device, **options)


# --- Training loop ---

def train(args):
    runs.announce(args, METHOD)
    ensure_teacher(args)                            # first: --teacher auto may train it (and reseed)
    device = torch.device(args.device)
    runs.seed_everything(args.seed)
    data = runs.Dataset(*runs.load_images(args.dataset, args.data_dir), device)
    teacher, init_ckpt = runs.load_networks(args, device)          # the student starts from init_ckpt
    ckpt_path = runs.prepare_run(args, METHOD)
    unet_config = {**init_ckpt["unet"], "dropout": 0.0}
    # student θ (online), target θ⁻ (LCM's EMA, part of the loss), ema (evaluation weights): all start
    # as the teacher's EMA weights.
    nets = {name: runs.build_unet(unet_config, device) for name in ("student", "target", "ema")}
    for net in nets.values():
        net.load_state_dict(init_ckpt["nets"]["ema"])
    student, target, ema = nets["student"], nets["target"].requires_grad_(False), nets["ema"].requires_grad_(False)
    opt = runs.optimizer(student.parameters(), args.lr, device)
    sampler = cli.make_sampler(args, data)
    step = 0
    if os.path.exists(ckpt_path):                                             # resume
        with runs.resuming(ckpt_path):   # a checkpoint that does not fit: one line
            ckpt = runs.load_checkpoint(ckpt_path, device)
            for name, net in nets.items():
                net.load_state_dict(ckpt["nets"][name])
            opt.load_state_dict(ckpt["opts"]["student"])
            sampler.load_state_dict(ckpt["sampler"])
            runs.set_rng_state(ckpt["rng"])
            step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    print(f"LCM student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters; skeleton "
          f"N={args.solver_steps}, k={args.skip}; sampling times {sampling_times(args.solver_steps, args.steps)}; "
          f"priors (fwd, teacher, student) = {[round(p, 3) for p in args.priors]}")
    model, target_model, teacher_model = (runs.maybe_compile(n, args) for n in (student, target, teacher))

    def save():
        runs.save_checkpoint(ckpt_path, dict(
            step=step, config=vars(args), unet=unet_config, nets={n: net.state_dict() for n, net in nets.items()},
            opts=dict(student=opt.state_dict()), rng=runs.rng_state(), sampler=sampler.state_dict()))

    evaluate_now = lambda: evaluate(args.out, args.eval_samples, args.device)
    log = runs.RunLog(args.out, args.iters, step)
    per_source = common.SourceStats(device)
    with runs.GracefulStop() as stop:
        while step < args.iters:
            lr = runs.lr_at(step, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, clips, source = step_loss(args, sampler, step / args.iters, model, target_model, teacher_model)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or float("inf"))
            runs.check_finite(step, loss=loss.mean(), grad_norm=gnorm)
            opt.step()
            update_target(target, student, args.target_ema)
            common.ema_update(ema, student, args.ema, step)
            per_source.add(loss, source)
            log.add(loss=loss.detach().mean(), clip_pct=100 * clips["clip"], clip_target_pct=100 * clips["clip_target"],
                    clip_student_pct=100 * clips["clip_student"],
                    grad_norm=gnorm)
            step += 1
            if step % args.log_every == 0 or step == args.iters:
                log.write(step, **per_source.summary("loss"), **sampler.log_stats(), lr=lr)
            log.tick(step)
            runs.end_of_step(args, step, save, stop, evaluate_now)
    return runs.finish(args, ckpt_path, make_generator, evaluate_now)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return cli.dry_run(args)
    return train(args)


if __name__ == "__main__":
    cli.run_main(main)
