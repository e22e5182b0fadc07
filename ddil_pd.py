"""Progressive Distillation (PD) + DDIL: distil the teacher into a K-step DDIM student.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv 2202.00512,
Algorithm 2; DDIL: Garrepalli et al., arXiv 2410.11971 (the input mixture and thresholding, DESIGN §4).

Rounds halve the sampler's step count from N_0 = --start-steps to K = --steps. In a round whose
student takes n steps (step 1/n) the round teacher η takes two DDIM half-steps (0.5/n each) from z_t:

    t' = t - 0.5/n,  t'' = t - 1/n
    z_t'  = alpha_t'  x̂_η(z_t)  + sigma_t'  (z_t  - alpha_t  x̂_η(z_t))  / sigma_t          (DDIM)
    z_t'' = alpha_t'' x̂_η(z_t') + sigma_t'' (z_t' - alpha_t' x̂_η(z_t')) / sigma_t'
    x̃ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)     (Alg. 2: the x̂_0
        that makes ONE student DDIM step t -> t'' land on z_t''; at t'' = 0 it is x̂_η(z_t'))
    L_θ = max(SNR_t, 1) ‖x̂_θ(z_t) - x̃‖²,  SNR_t = alpha_t² / sigma_t²        ("truncated SNR" weighting)

and after the round the student becomes the next round's teacher (η ← θ). The inputs z_t come from
the DDIL mixture: forward diffusion at t = i/n (PD's own source, the baseline), teacher backward
rollouts, and the student's own n-step DDIM rollouts, all at times of the student's current grid.
Round 1's teacher is the CFG-guided original teacher, so guidance is baked into every student.
The DDIL prior schedule (--prior-schedule, --prior-warmup) restarts in every round (progress is the
position within the round) and the replay buffer is emptied between rounds: both belong to one grid.

Thresholding: --threshold-teacher clips the round teacher's x̂_0 in both half-steps; --threshold-student
clips the target x̃ (and implies --sample-clip); --sample-clip clamps the student's x̂_0 at every step of
its sampler, in DDIL rollouts and at inference. It is on by default, as in the official PD (Google's
CIFAR-10 config, eval_clip_denoised=True), so the baseline row samples with clipping as theirs does.

    python ddil_pd.py --preset smoke                            # baseline PD (forward inputs only)
    python ddil_pd.py --preset smoke --ddil --reflected         # + DDIL mixture + thresholding
    python ddil_pd.py --preset cifar10 --ddil --data-dir ../shared/data/cifar10-jpeg-train.zip

Measured (smoke, seed 0, --eval-samples 0, otherwise idle 2-core CPU): baseline 42 s, final loss
1.0e-3; --ddil --reflected 57 s, final loss 1.5e-3 (losses of different input mixtures are not
comparable); both 4-step samples.png look like the teacher's 32-step ones. Rerunning resumes from ckpt.pt.
"""

import copy
import os

import torch

import cli
import common
import runs
import scoring
from common import alpha_sigma, ddim_step, threshold
from teacher import ensure_teacher

METHOD = "pd"
BASELINE_SOURCE = "fwd"   # the inputs of the method without DDIL (DESIGN §4)

# Preset values of every flag whose default is None.
# smoke: rounds 16 -> 8 -> 4 (two rounds of 40 iterations), about a minute on a 2-core CPU.
# cifar10: rounds 64 -> 32 -> 16 -> 8 -> 4, 10k iterations each at batch 128 (the paper: 50k per round
# from 8192 steps; we start at twice the teacher preset's 32 sampling steps, so round 1's teacher is at
# least the sampler the teacher was judged with). Estimated from the teacher preset's rate, not
# measured: about 1 h baseline on one H100 in bf16 (2 CFG teacher forwards at 2B + 1 student
# forward/backward per iteration); --ddil adds its buffered rollouts (bench.py's DDIL overhead row).
# lr 5e-5, no warm-up, linear anneal to 0 within each round, grad clip 1: Google's cifar_distill.py.
PRESETS = {
    "smoke": dict(dataset="synthetic", start_steps=16, iters=80, batch_size=16, lr=5e-4, warmup=5, ema=0.99,
                  guidance=1.5, log_every=10, save_every=40, eval_every=0, eval_samples=100),
    # gmm: the exact benchmark on 2 CPU cores (gmm.py; teacher.py --preset gmm), no guidance: rounds 16 -> 8 -> 4.
    "gmm": dict(dataset="gmm", start_steps=16, iters=300, batch_size=32, lr=5e-4, warmup=10, ema=0.99,
                guidance=1.0, log_every=25, save_every=100, eval_every=0, eval_samples=1000),
    "cifar10": dict(dataset="cifar10", start_steps=64, iters=40_000, batch_size=128, lr=5e-5, warmup=0,
                    ema=0.999, guidance=1.5, log_every=200, save_every=2000, eval_every=0, eval_samples=10_000),
}
# gmm2: the second exact benchmark (gmm.py MIXTURES) with the first one's sizes, except the budget: 1200 iterations
# (600 per round), where the baseline's learning curve (a run per budget, since PD anneals within each round:
# ablate.py --budgets 300,600,1200,2400; results/gmm2/curves) stops improving fd_px by 5 % per doubling.
PRESETS["gmm2"] = dict(PRESETS["gmm"], dataset="gmm2", iters=1200)
# quick: the first run on a CPU (--preset auto without CUDA): gmm2 with the exact teacher, briefly.
PRESETS["quick"] = dict(PRESETS["gmm2"], iters=100, log_every=10, save_every=50, eval_samples=200)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(p)
    cli.add_ddil_args(p)
    g = p.add_argument_group("progressive distillation (Salimans & Ho 2022, Alg. 2)")
    g.add_argument("--steps", type=cli.positive_int, default=4,
                   help="K: DDIM steps of the final student (the last round's n)")
    g.add_argument("--start-steps", type=cli.positive_int, default=None,
                   help="N_0: DDIM steps of the original teacher in round 1; each round halves it, so "
                        "N_0 / K must be a power of two >= 2; --iters is split equally over the "
                        "log2(N_0 / K) rounds (preset)")
    g.add_argument("--warmup", type=cli.count, default=None,
                   help="learning-rate warm-up iterations at the start of each round; the rate then "
                        "anneals linearly to 0 by the round's end (Google's PD configs) (preset)")
    g.add_argument("--grad-clip", type=cli.nonnegative, default=1.0, help="clip the gradient norm of θ (0 = off)")
    cli.preset_help(p, PRESETS)
    args = p.parse_args(argv)
    cli.resolve(p, args, METHOD, PRESETS, default_source=BASELINE_SOURCE, sample_clip=True)   # eval_clip_denoised
    ratio = args.start_steps // args.steps
    if args.start_steps % args.steps or ratio < 2 or ratio & (ratio - 1):
        raise common.UserError(f"--start-steps {args.start_steps} / --steps {args.steps} must be a power of two "
                               ">= 2 (each PD round halves the steps), e.g. --start-steps 16 --steps 4")
    if args.grad_clip < 0:
        raise common.UserError(f"--grad-clip {args.grad_clip}: give a maximum gradient norm >= 0 (0 = off)")
    if args.iters < num_rounds(args):
        raise common.UserError(f"--iters {args.iters} is fewer than the {num_rounds(args)} PD rounds "
                               f"from --start-steps {args.start_steps} to --steps {args.steps}")
    return args


# --- PD rounds: which round a step belongs to, and its grid ---

def num_rounds(args):
    return (args.start_steps // args.steps).bit_length() - 1          # log2(N_0 / K)


def round_starts(args):
    """First step of each round and --iters at the end: the iterations split equally over the rounds."""
    R = num_rounds(args)
    return [r * args.iters // R for r in range(R)] + [args.iters]


def student_steps(args, r):
    """n, the student's step count in round r (0-based): N_0 / 2^(r+1); the round teacher takes 2n."""
    return args.start_steps >> (r + 1)


def grid(n):
    """The n-step student grid [1, (n-1)/n, ..., 0] (descending, for the sampler) and the forward
    training times t = i/n, i = 1..n (Alg. 2's t = i/N, i ~ Cat[1..N])."""
    return torch.linspace(1, 0, n + 1).tolist(), torch.arange(1, n + 1, dtype=torch.float32) / n


# --- PD target and loss (Alg. 2) ---

def pd_target(teacher_fn, z_t, t, y, n, clip=(None, 0.995)):
    """x̃ [B, 3, 32, 32]: the x̂_0 that makes one student DDIM step t -> t'' = t - 1/n land where two
    teacher DDIM half-steps land. teacher_fn(z, t, y) -> raw x̂_0 (CFG inside); `clip` thresholds it in
    both half-steps (--threshold-teacher). z_t: [B, 3, 32, 32]; t: [B] on the student grid i/n.
    Also returns the raw teacher x̂_0 of both half-steps [2B, 3, 32, 32] (for the clip statistic)."""
    t1, t2 = t - 0.5 / n, t - 1.0 / n                                     # t', t''
    x0_a = teacher_fn(z_t, t, y)
    z_1 = ddim_step(z_t, t, t1, threshold(x0_a, *clip))                  # z_t'
    x0_b = teacher_fn(z_1, t1, y)
    z_2 = ddim_step(z_1, t1, t2, threshold(x0_b, *clip))                 # z_t''
    # "x-target implied by z_teacher" (Google dpm.py): solve z_t'' = alpha_t'' x̃ + sigma_t'' (z_t -
    # alpha_t x̃) / sigma_t, one student DDIM step with x̂_0 = x̃, for x̃.
    alpha_t, sigma_t = (common._bc(a.to(z_t.device), z_t) for a in alpha_sigma(t))
    alpha_2, sigma_2 = (common._bc(a.to(z_t.device), z_t) for a in alpha_sigma(t2))
    x_tilde = (z_2 - (sigma_2 / sigma_t) * z_t) / (alpha_2 - (sigma_2 / sigma_t) * alpha_t)
    # At the last grid step (t'' = 0) the sampler returns x̂_0 itself instead of a DDIM step
    # (common.sampler_step), so the teacher's second half-step lands on x̂_η(z_t'): that is the target.
    # (The formula would give z_t'' at the clipped t'' = T_MIN: almost, but not exactly, x̂_η(z_t').)
    last = common._bc(t2 < 0.5 / n, z_t)
    return torch.where(last, threshold(x0_b, *clip), x_tilde), torch.cat([x0_a, x0_b])


def pd_loss(student, teacher_fn, z_t, t, y, n, clip_teacher, clip_student):
    """Per-example max(SNR_t, 1) ‖x̂_θ(z_t) - x̃‖² (mean over pixels) [B], and the shares of the raw
    teacher's and the student's x̂_0 pixels outside [-1, 1] (clip, clip_student: device scalars).
    The student's x̂_0 is not thresholded here (a clamp would zero its gradient); --threshold-student
    clips the target x̃ instead (and, through --sample-clip, the student's x̂_0 in rollouts and samples)."""
    with torch.no_grad():
        x_tilde, x0_teacher = pd_target(teacher_fn, z_t, t, y, n, clip_teacher)
        x_tilde = threshold(x_tilde, *clip_student)
    alpha_t, sigma_t = (a.to(z_t.device) for a in alpha_sigma(t))
    weight = (alpha_t ** 2 / sigma_t ** 2).clamp(min=1.0)               # max(SNR_t, 1), [B]
    x0_student = common.denoise(student, z_t, t, y)                      # x̂_θ(z_t), w = 1: CFG is baked in
    clips = dict(clip=common.out_of_range(x0_teacher), clip_student=common.out_of_range(x0_student))
    return weight * (x0_student - x_tilde).square().mean(dim=(1, 2, 3)), clips


# --- Sampling (samples.png and eval.py) ---

def make_student(ckpt, device):
    """(x0_fn, times, stochastic) of the run's K-step sampler: x0_fn(z, t, y) -> the EMA student's x̂_0
    with the run's sampling-time clipping (--sample-clip: on by default, as the official PD), on the
    K-step grid, DDIM (not stochastic). A checkpoint from an earlier round is sampled with K steps too,
    i.e. before the student was trained for them."""
    cfg = ckpt["config"]
    net = runs.build_unet(ckpt["unet"], device)
    net.load_state_dict(ckpt["nets"]["ema"])
    net.eval().requires_grad_(False)
    clip = (cfg["threshold_mode"] if cfg["sample_clip"] else None, cfg["threshold_percentile"])
    times, _ = grid(cfg["steps"])
    return (lambda z, t, y: common.denoise(net, z, t, y, 1.0, clip=clip)), times, False


def make_generator(ckpt, device):
    """generate(noise, labels, renoise) -> x̂_0 [B, 3, 32, 32] (DDIM is deterministic: renoise is ignored)."""
    x0_fn, times, _ = make_student(ckpt, device)
    return lambda noise, labels, renoise=None: common.sample(x0_fn, noise, labels, times)


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
    student = runs.build_unet(unet_config, device)
    student.load_state_dict(init_ckpt["nets"]["ema"])                 # θ ← η (Alg. 2, round 1)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = runs.optimizer(student.parameters(), args.lr, device)
    sampler = cli.make_sampler(args, data)
    clip_teacher = cli.clip_spec(args, args.threshold_teacher)
    clip_student = cli.clip_spec(args, args.threshold_student)      # the target x̃
    sample_clip = cli.clip_spec(args, args.sample_clip)              # the student's sampler (and rollouts)
    # Round 1's teacher is the original teacher with CFG; later rounds' teacher is a frozen copy of the
    # previous round's student, whose guidance is baked in (w = 1). Alg. 2 writes η ← θ; like Google's
    # code (which distils from the previous stage's EMA params) we copy the EMA, the net we sample with.
    round_teacher, step, rnd = teacher, 0, 0
    if os.path.exists(ckpt_path):                                         # resume
        with runs.resuming(ckpt_path):   # a checkpoint that does not fit: one line
            ckpt = runs.load_checkpoint(ckpt_path, device)
            student.load_state_dict(ckpt["nets"]["student"]), ema.load_state_dict(ckpt["nets"]["ema"])
            opt.load_state_dict(ckpt["opts"]["student"])
            sampler.load_state_dict(ckpt["sampler"])
            step, rnd = ckpt["step"], ckpt["round"]
            if rnd > 0:                                   # deepcopy, not build_unet: no draws from the RNG
                round_teacher = copy.deepcopy(ema).eval()
                round_teacher.load_state_dict(ckpt["nets"]["round_teacher"])
            runs.set_rng_state(ckpt["rng"])                                 # last: nothing may draw after it
        print(f"resumed from {ckpt_path} at step {step} (round {rnd + 1})")
    starts = round_starts(args)
    print(f"PD rounds (student steps): {[student_steps(args, r) for r in range(num_rounds(args))]}, "
          f"starting at steps {starts[:-1]}; {len(data)} training images ({args.dataset})")
    model, teacher_model = runs.maybe_compile(student, args), runs.maybe_compile(teacher, args)
    round_model = teacher_model if rnd == 0 else runs.maybe_compile(round_teacher, args)

    def save():
        runs.save_checkpoint(ckpt_path, dict(
            step=step, round=rnd, config=vars(args), unet=unet_config,
            # round 1's teacher is the --teacher checkpoint itself, so it is not stored twice
            nets=dict(student=student.state_dict(), ema=ema.state_dict(),
                      round_teacher=None if rnd == 0 else round_teacher.state_dict()),
            opts=dict(student=opt.state_dict()), rng=runs.rng_state(), sampler=sampler.state_dict()))

    # --- the DDIL mixture's callables: (z, t, y) -> x̂_0, thresholding passed explicitly ---
    # β_teach_bckwrd rollouts use the ORIGINAL teacher with CFG on --teacher-rollout-steps: it is the
    # expert whose trajectories DDIL imitates. Every visited state, whatever its source, is labelled by
    # the round teacher's two half-steps (DAgger: the expert labels the states the learner visits).
    # Student rollouts use the online student θ, DAgger's "current policy".
    teacher_fn = lambda z, t, y: common.denoise(teacher_model, z, t, y, args.guidance, clip=clip_teacher)
    student_fn = lambda z, t, y: common.denoise(model, z, t, y, 1.0, clip=sample_clip)

    evaluate_now = lambda: evaluate(args.out, args.eval_samples, args.device)
    log = runs.RunLog(args.out, args.iters, step)
    per_source = common.SourceStats(device)
    with runs.GracefulStop() as stop:
        while step < args.iters:
            r = sum(s <= step for s in starts[1:-1])
            if r != rnd:                                                  # Alg. 2 between rounds
                rnd = r
                round_teacher = copy.deepcopy(ema).eval().requires_grad_(False)   # η ← θ (EMA)
                round_model = runs.maybe_compile(round_teacher, args)
                student.load_state_dict(ema.state_dict())                 # θ ← η: start from the new teacher
                opt = runs.optimizer(student.parameters(), args.lr, device)   # fresh moments (Google's code)
                sampler.reset()                                           # buffered states lie on the old grid
            n = student_steps(args, rnd)
            times, fwd_times = grid(n)
            w_round = args.guidance if rnd == 0 else 1.0
            round_fn = lambda z, t, y: common.denoise(round_model, z, t, y, w_round)   # raw x̂_η
            k, length = step - starts[rnd], starts[rnd + 1] - starts[rnd]     # position within the round
            for group in opt.param_groups:
                group["lr"] = runs.lr_at(k, args.lr, args.warmup) * (1 - k / length)
            # The prior schedule runs within each round (progress = k / length): every round is a new
            # distillation problem on a new grid, and its student's early rollouts are off that grid's path.
            with torch.no_grad(), runs.autocast(args):
                b = sampler.draw(args.batch_size, progress=k / length, fwd_times=fwd_times, times=times,
                                 student_fn=student_fn, teacher_fn=teacher_fn, renoise=None)
            z_t = b["x_t"]                                                # [B, 3, 32, 32]
            if device.type == "cuda":
                z_t = z_t.contiguous(memory_format=torch.channels_last)
            with runs.autocast(args):
                losses, clips = pd_loss(model, round_fn, z_t, b["t"], b["y"], n, clip_teacher, clip_student)
                loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or float("inf"))
            runs.check_finite(step, loss=loss, grad_norm=gnorm)
            opt.step()
            common.ema_update(ema, student, args.ema, k)                  # EMA warm-up restarts each round
            per_source.add(losses, b["source"])
            log.add(loss=loss, clip_pct=100 * clips["clip"], clip_student_pct=100 * clips["clip_student"], grad_norm=gnorm)
            step += 1
            if step % args.log_every == 0 or step == args.iters:
                log.write(step, **per_source.summary("loss"), **sampler.log_stats(), round=rnd + 1, n=n,
                          lr=opt.param_groups[0]["lr"])
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
