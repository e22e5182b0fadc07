"""DMD2 + DDIL: distribution matching distillation of the teacher into a K-step generator.

DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis",
arXiv 2405.14867; DMD: Yin et al. 2023, arXiv 2311.18828. DDIL: Garrepalli et al., arXiv 2410.11971.

Generator G (the student, initialised from the teacher's EMA weights) maps z_τ to x̂_0 at the K
fixed times τ_k = 1 - k/K (k = 0..K-1); K-step sampling re-noises each x̂_0 with fresh noise to the
next τ (K = 1: one step from pure noise). With x = G(z_τ) and two scores of the noised sample

    t ~ U[t_min, t_max],  z_t = alpha_t x + sigma_t ε
    p_real = x - x̂_0,real(z_t)     real score: the frozen teacher, CFG scale w
    p_fake = x - x̂_0,fake(z_t)     fake score: the critic, a trainable copy of the teacher, w = 1
    grad   = (p_real - p_fake) / mean|p_real|       DMD's distribution-matching gradient and weighting

the generator descends the KL(p_fake || p_real) gradient `grad` (applied through a surrogate loss,
see `distribution_matching_loss`). The critic follows the generator by the denoising loss on
detached generator samples, --fake-updates times per generator update (DMD2's two time-scale
update rule). An optional GAN head on the critic's bottleneck (DMD2's GAN loss on real data) adds
non-saturating softplus losses. No regression loss (DMD2 removes it).

Generator inputs z_τ come from the DDIL mixture (DESIGN §4). With no beta flag: DMD2's own backward
simulation of its multi-step generator (G's K-step sampler run under no_grad for j ~ U{0..K-1}
steps, fresh noise at every re-noising; pure noise when K = 1); --beta-fwd adds forward-diffused
data at the τ_k, --beta-teacher teacher DDIM rollouts.

Thresholding (reflected diffusion): --threshold-teacher clips x̂_0,real, --threshold-critic x̂_0,fake,
--threshold-student G's output (a straight-through clamp: the clipped value goes forward, the gradient
passes, so a pixel past ±1 is still pulled back; and G's sampler, --sample-clip); --reflected all three.
Clipping ONE of the two scores moves DMD's fixed point: with identical real and fake scores whose x̂_0
leaves [-1, 1], grad = 0 with no clipping or with both clipped, but teacher-only clipping pulls x inward
and critic-only clipping pushes it outward (test_oracles.py measures both). The threshold study keeps those
rows, and adds the consistent one, teacher+critic.

Defaults versus the official recipe: this script's default DMD2 has no GAN term (--gan-weight 0) and a
CFG-guided real score (--guidance, 1.5 at every preset), the text-to-image recipe; DMD2's official
class-conditional (ImageNet) recipe has a GAN term (3e-3) and no CFG (--guidance 1). The log carries the
DM and GAN gradient norms at x (dm_grad_norm, gan_grad_norm): DMD2's authors set the GAN weight by
matching them.

    python ddil_dmd2.py --preset smoke                                 # baseline DMD2 (CPU, minutes)
    python ddil_dmd2.py --preset smoke --beta-fwd --threshold-teacher  # forward inputs, clipped teacher
    python ddil_dmd2.py --preset cifar10 --ddil --reflected            # the paper's +Reflected+DDIL row

Expected result: the smoke preset is a pipeline check only (20 iterations of a 1.2 M-parameter UNet
on synthetic shapes, seed 0, 2-core CPU: generator loss stays near 0.1 and critic loss near 0.13,
both grad norms 0.2-0.4). On the exact benchmark (--preset gmm, 2-core CPU, ~3 min a run) the metrics of
its ablations, with seeds and intervals, are in results/gmm/. cifar10 metrics come from ablate.py runs.
Rerunning the same command resumes from ckpt.pt.
"""

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common
import runs
import scoring
from teacher import ensure_teacher

METHOD = "dmd2"
BASELINE_SOURCE = "student"   # the inputs of the method without DDIL (DESIGN §4)

# Preset values of every flag whose default is None (our choices, not tuned). A cifar10 iteration is
# 5 critic updates + 1 generator update + the DDIL draw of 6 x 128 inputs, ~56 TFLOP with the baseline's
# backward simulation: 6000 iterations take ~1-1.5 h on one H100 (an estimate; bench.py measures it).
PRESETS = {
    "smoke": dict(dataset="synthetic", iters=20, batch_size=16, lr=1e-4, lr_critic=1e-4, ema=0.9,
                  guidance=1.5, log_every=5, save_every=10, eval_every=0, eval_samples=100),
    "gmm": dict(dataset="gmm", iters=100, batch_size=16, lr=1e-4, lr_critic=1e-4, ema=0.95, guidance=1.0,
                log_every=10, save_every=50, eval_every=0, eval_samples=1000),
    "cifar10": dict(dataset="cifar10", iters=6000, batch_size=128, lr=2e-5, lr_critic=2e-5, ema=0.999,
                    guidance=1.5, log_every=100, save_every=1000, eval_every=0, eval_samples=10_000),
}
# gmm2: the second exact benchmark (gmm.py MIXTURES) with the first one's sizes, but for the generator's learning
# rate, chosen on its baseline's learning curves alone (results/gmm2/README.md, "Learning curves"): at 1e-4 fd_px
# worsens at every doubling; with the generator at 2e-5 and the critic at 1e-4 (a critic five times faster) it is
# flat (within 5 %) from 100 to 200 iterations, the pre-registered rule's budget, and worsens after (mode collapse).
PRESETS["gmm2"] = dict(PRESETS["gmm"], dataset="gmm2", lr=2e-5)
# quick: the first run on a CPU (--preset auto without CUDA): gmm2 with the exact teacher, briefly; it ends by
# printing its exact metrics beside the floor and the exact teacher's DDIM at the same step count.
PRESETS["quick"] = dict(PRESETS["gmm2"], iters=30, log_every=5, save_every=15, eval_samples=200)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(p)
    cli.add_ddil_args(p, critic=True)
    g = p.add_argument_group("DMD2 (Yin et al. 2024)")
    g.add_argument("--steps", type=cli.positive_int, default=4,
                   help="K: generator steps; G is trained and sampled at τ_k = 1 - k/K, k = 0..K-1")
    g.add_argument("--min-t", type=cli.fraction, default=0.02, help="t_min of the distribution-matching time t ~ U[t_min, t_max]")
    g.add_argument("--max-t", type=cli.fraction, default=0.98, help="t_max of the distribution-matching time t ~ U[t_min, t_max]")
    g.add_argument("--fake-updates", type=cli.positive_int, default=5,
                   help="critic (fake score μ_fake) updates per generator update: the two time-scale rule")
    g.add_argument("--lr-critic", type=cli.positive, default=None, help="AdamW learning rate of the critic μ_fake (preset)")
    g.add_argument("--warmup", type=cli.count, default=0, help="linear learning-rate warm-up iterations of both networks")
    g.add_argument("--grad-clip", type=cli.nonnegative, default=10.0,
                   help="clip each network's gradient to this global L2 norm (DMD2's max_grad_norm); 0 = off")
    g.add_argument("--gan-weight", type=cli.nonnegative, default=0.0,
                   help="λ_GAN of the generator's GAN loss softplus(-D(x)); 0 = no GAN head. Our default (no GAN, "
                        "CFG real score) is DMD2's text-to-image recipe; its class-conditional ImageNet recipe is "
                        "--gan-weight 3e-3 --guidance 1. Match dm_grad_norm and gan_grad_norm in the log to set it")
    g.add_argument("--gan-critic-weight", type=cli.nonnegative, default=1e-2,
                   help="weight of the head's loss softplus(-D(real)) + softplus(D(fake)) in the critic's loss "
                        "(DMD2's cls_loss_weight); used only with --gan-weight > 0")
    cli.preset_help(p, PRESETS)
    args = p.parse_args(argv)
    cli.resolve(p, args, METHOD, PRESETS, default_source=BASELINE_SOURCE, sample_clip=False)   # no clip in DMD2
    if not 0.0 <= args.min_t < args.max_t <= 1.0:
        raise common.UserError(f"--min-t {args.min_t} / --max-t {args.max_t}: need 0 <= min-t < max-t <= 1")
    if args.lr <= 0 or args.lr_critic <= 0:
        raise common.UserError("--lr / --lr-critic must be positive")
    if args.gan_weight < 0 or args.gan_critic_weight < 0 or args.grad_clip < 0:
        raise common.UserError("--gan-weight / --gan-critic-weight / --grad-clip must be >= 0")
    return args


# --- DMD2 losses ---

def distribution_matching_loss(x, y, teacher, critic, guidance, t_min, t_max, clip_real, clip_fake):
    """DMD's distribution-matching gradient for x = G(z_τ) [B, 3, 32, 32] (with grad). Returns the
    per-example surrogate loss [B] and a dict: grad, x0_real, x0_fake (thresholded) and clip
    (fraction of the teacher's un-thresholded x̂_0 outside [-1, 1])."""
    with torch.no_grad():                                  # both scores are frozen in this loss
        t = t_min + (t_max - t_min) * torch.rand(x.shape[0], device=x.device)
        z_t, _ = common.forward_diffuse(x, t, torch.randn_like(x))
        x0_real_raw = common.denoise(teacher, z_t, t, y, guidance)              # real score, CFG w
        x0_real = common.threshold(x0_real_raw, *clip_real)
        x0_fake = common.denoise(critic, z_t, t, y, 1.0, clip=clip_fake)        # fake score, no CFG
        p_real, p_fake = x - x0_real, x - x0_fake
        # DMD2's code applies nan_to_num here for mean|p_real| = 0 (x exactly denoised); a floor on the weight
        # covers that case without hiding a NaN coming from the scores themselves (the run then stops).
        weight = p_real.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        grad = (p_real - p_fake) / weight
    # Surrogate: L = ½ mean_{b,c,h,w} (x - sg(x - grad))². Its gradient is (x - sg(x - grad)) / N with
    # N = B·C·H·W, i.e. autograd returns exactly grad / N (DMD2's reduction="mean"). The per-example
    # mean over C, H, W here and the batch mean at the call site make that N.
    loss = 0.5 * (x - (x - grad).detach()).square().mean(dim=(1, 2, 3))
    return loss, dict(grad=grad, x0_real=x0_real, x0_fake=x0_fake, clip=common.out_of_range(x0_real_raw))


def straight_through(x, clip):
    """threshold(x) in the forward pass, the identity in the backward pass (--threshold-student on G's
    output): a hard clamp would give a pixel past ±1 exactly zero DM / GAN gradient, so it would never be
    pulled back into range."""
    return x + (common.threshold(x.detach(), *clip) - x.detach())


def critic_loss(critic, x, y):
    """The fake score's denoising loss on detached generator samples x [B, 3, 32, 32]: teacher.py's
    v-prediction loss at t ~ U(0, 1). Returns ‖v̂ - v‖² per example [B] and the bottleneck features."""
    x = x.detach()
    t = torch.rand(x.shape[0], device=x.device)
    z_t, v = common.forward_diffuse(x, t, torch.randn_like(x))
    v_hat, features = critic(z_t, t, y, return_features=True)
    return (v_hat.float() - v).square().mean(dim=(1, 2, 3)), features


def gan_head(channels):
    """D: DMD2's classifier branch on the critic's bottleneck [B, C, h, w] -> one realism logit [B, 1]."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(min(32, channels // 4), channels),
                         nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))


def realism_logit(critic, head, x, y):
    """D(x) on the critic's features of x noised at t ~ U(0, 1) (DMD2's diffusion GAN)."""
    t = torch.rand(x.shape[0], device=x.device)
    z_t, _ = common.forward_diffuse(x, t, torch.randn_like(x))
    _, features = critic(z_t, t, y, return_features=True)
    return head(features.float())


def gan_critic_loss(critic, head, x_real, y_real, features_fake):
    """D's non-saturating loss softplus(-D(real)) + softplus(D(fake)) = -log σ(D(real)) - log(1 - σ(D(fake))),
    batch mean; features_fake: the critic's bottleneck of the generator samples in its denoising loss."""
    return (F.softplus(-realism_logit(critic, head, x_real, y_real)) + F.softplus(head(features_fake.float()))).mean()


def gan_generator_loss(critic, head, critic_model, x, y):
    """G's non-saturating loss softplus(-D(x)) = -log σ(D(x)), batch mean. The gradient reaches x through
    the critic, whose parameters (and the head's) are frozen for it. critic_model: the critic as called
    (compiled or not); critic: the module whose parameters are frozen."""
    critic.requires_grad_(False), head.requires_grad_(False)
    loss = F.softplus(-realism_logit(critic_model, head, x, y)).mean()
    critic.requires_grad_(True), head.requires_grad_(True)
    return loss


# --- Generator inputs: the DDIL mixture on G's grid ---

def clip_specs(args):
    """Thresholding of (x̂_0,real, x̂_0,fake, G's output), each passed explicitly at its call site."""
    return tuple(cli.clip_spec(args, on) for on in (args.threshold_teacher, args.threshold_critic,
                                                       args.threshold_student))


def student_grid(steps):
    """τ_k = 1 - k/K for k = 0..K-1: the times G is trained and sampled at."""
    return [1.0 - k / steps for k in range(steps)]


def ddil_batch(sampler, n, progress, steps, student_fn, teacher_fn):
    """n generator inputs z_τ [n, 3, 32, 32] with τ [n], y [n], source [n] from the DDIL mixture, in
    random order (the sampler returns them grouped by source). Student rollouts re-noise with fresh
    noise at every step (DMD2's backward simulation); forward states sit at the τ_k."""
    taus = student_grid(steps)
    with torch.no_grad():
        b = sampler.draw(n, progress, fwd_times=torch.tensor(taus), times=taus + [0.0],
                         student_fn=student_fn, teacher_fn=teacher_fn, renoise=torch.randn_like)
    perm = torch.randperm(n, device=b["x_t"].device)
    return {k: v[perm] for k, v in b.items()}


# --- Sampling (samples.png and eval.py) ---

def make_student(ckpt, device):
    """(x0_fn, times, stochastic): x0_fn = G of nets["ema"] with the run's sampling-time clipping
    (--sample-clip), the grid τ_0..τ_{K-1}, 0, and re-noising with fresh noise between steps (stochastic)."""
    config = argparse.Namespace(**ckpt["config"])
    net = runs.build_unet(ckpt["unet"], device)
    net.load_state_dict(ckpt["nets"]["ema"])
    net.eval().requires_grad_(False)
    clip_sample = cli.clip_spec(config, config.sample_clip)
    return (lambda z, t, y: common.denoise(net, z, t, y, 1.0, clip=clip_sample)), student_grid(config.steps) + [0.0], True


def make_generator(ckpt, device):
    """generate(noise, labels, renoise) -> x̂_0 [B, 3, 32, 32]: x̂_0 = G(z_τ_k), re-noised with renoise(z)
    to τ_{k+1} (global-RNG noise when renoise is None)."""
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
    student, ema, critic = (runs.build_unet(unet_config, device) for _ in range(3))
    for net in (student, ema, critic):          # G, its EMA and μ_fake all start as the teacher
        net.load_state_dict(init_ckpt["nets"]["ema"])
    ema.requires_grad_(False)
    head = gan_head(critic.mid_channels).to(device) if args.gan_weight > 0 else None
    critic_params = list(critic.parameters()) + (list(head.parameters()) if head else [])
    opt_g = runs.optimizer(student.parameters(), args.lr, device)
    opt_c = runs.optimizer(critic_params, args.lr_critic, device)
    sampler = cli.make_sampler(args, data)
    clip_teacher, clip_critic, clip_student = clip_specs(args)
    step = 0
    if os.path.exists(ckpt_path):                               # resume
        with runs.resuming(ckpt_path):   # a checkpoint that does not fit: one line
            ckpt = runs.load_checkpoint(ckpt_path, device)
            for name, net in (("student", student), ("ema", ema), ("critic", critic), ("head", head)):
                if net is not None:
                    net.load_state_dict(ckpt["nets"][name])
            opt_g.load_state_dict(ckpt["opts"]["student"]), opt_c.load_state_dict(ckpt["opts"]["critic"])
            sampler.load_state_dict(ckpt["sampler"])
            runs.set_rng_state(ckpt["rng"])
            step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    print(f"DMD2: K = {args.steps} steps, priors (fwd, teacher, student) = {args.priors}, "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters per network")
    G, mu_fake, mu_real = (runs.maybe_compile(net, args) for net in (student, critic, teacher))

    # Student rollouts use the online G: DAgger's "current policy", and DMD2's backward simulation.
    student_fn = lambda z, t, y: common.denoise(G, z, t, y, 1.0, clip=cli.clip_spec(args, args.sample_clip))
    teacher_fn = lambda z, t, y: common.denoise(mu_real, z, t, y, args.guidance, clip=clip_teacher)

    def save():
        nets = dict(student=student.state_dict(), ema=ema.state_dict(), critic=critic.state_dict())
        if head is not None:
            nets["head"] = head.state_dict()
        runs.save_checkpoint(ckpt_path, dict(
            step=step, config=vars(args), unet=unet_config, nets=nets,
            opts=dict(student=opt_g.state_dict(), critic=opt_c.state_dict()),
            rng=runs.rng_state(), sampler=sampler.state_dict()))

    evaluate_now = lambda: evaluate(args.out, args.eval_samples, args.device)
    log = runs.RunLog(args.out, args.iters, step)
    per_source = common.SourceStats(device)
    B, n_fake = args.batch_size, args.fake_updates
    clip_norm = args.grad_clip or float("inf")

    def update_critic(x, y):
        """One step of μ_fake (and the GAN head D) on detached generator samples x: the denoising loss,
        plus --gan-critic-weight times D's real-vs-fake loss. Returns loss + gradient norm (a NaN guard)."""
        with runs.autocast(args):
            loss, features = critic_loss(mu_fake, x, y)
            loss = loss.mean()
            if head is not None:
                loss_gan = gan_critic_loss(mu_fake, head, *data.batch(B), features)
                log.add(critic_gan_loss=loss_gan)
                loss = loss + args.gan_critic_weight * loss_gan
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(critic_params, clip_norm)
        log.add(critic_grad_norm=gnorm)
        opt_c.step()
        log.add(critic_loss=loss)                       # logged: the mean over all n_fake updates
        return loss.detach() + gnorm

    def update_generator(x_t, t, y):
        """The gradient of G at inputs (z_τ, τ, y): distribution matching, plus --gan-weight times the
        generator's GAN loss through the frozen critic. Returns the loss, the per-example DM loss and the
        clipped gradient norm; the caller steps the optimiser once the NaN guard passed."""
        with runs.autocast(args):
            x_raw = common.denoise(G, x_t, t, y, 1.0)                              # G's output [B, 3, 32, 32]
            x = straight_through(x_raw, clip_student)
            loss_dm, extra = distribution_matching_loss(x, y, mu_real, mu_fake, args.guidance, args.min_t,
                                                        args.max_t, clip_teacher, clip_critic)
            loss = loss_dm.mean()
            if head is not None:
                loss_gan = gan_generator_loss(critic, head, mu_fake, x, y)
                # DMD2's authors set --gan-weight by matching the DM and GAN gradient norms at x: log both.
                log.add(gan_loss=loss_gan, gan_grad_norm=torch.autograd.grad(
                    args.gan_weight * loss_gan, x, retain_graph=True)[0].norm())
                loss = loss + args.gan_weight * loss_gan
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip_norm)
        # ∂(mean DM loss)/∂x = grad / (B C H W) (see distribution_matching_loss): its norm, no extra backward
        log.add(grad_norm=gnorm, loss=loss, clip_pct=100 * extra["clip"], dm_grad_norm=extra["grad"].norm() / x.numel(),
                clip_student_pct=100 * common.out_of_range(x_raw))
        return loss, loss_dm, gnorm

    with runs.GracefulStop() as stop:
        while step < args.iters:
            for opt, lr in ((opt_g, args.lr), (opt_c, args.lr_critic)):
                for group in opt.param_groups:
                    group["lr"] = runs.lr_at(step, lr, args.warmup)
            # One DDIL draw per iteration holds the inputs of the generator update AND of the n_fake critic
            # updates. All come from the same G (as in DMD2, where G is fixed between its updates), so this
            # equals a fresh draw per critic update, while the sampler's fixed cost (its small-batch bookkeeping
            # and, without a buffer, sequential rollout calls on sub-batches) is paid once per iteration, not
            # n_fake + 1 times.
            with runs.autocast(args):
                b = ddil_batch(sampler, (n_fake + 1) * B, step / args.iters, args.steps, student_fn, teacher_fn)
                if device.type == "cuda":
                    b["x_t"] = b["x_t"].contiguous(memory_format=torch.channels_last)
                with torch.no_grad():                   # detached generator samples for the critic
                    x_fake = common.denoise(G, b["x_t"][B:], b["t"][B:], b["y"][B:], 1.0, clip=clip_student)

            # DMD2's two time-scale rule: n_fake critic updates on fresh generator samples, then one generator
            # update, so that the fake score has caught up with the current G when G uses it.
            critic_sum = 0.0                            # NaN / inf in any critic update reaches it (no sync)
            for k in range(n_fake):
                critic_sum = critic_sum + update_critic(x_fake[k * B:(k + 1) * B], b["y"][B + k * B:B + (k + 1) * B])
            loss, loss_dm, gnorm = update_generator(b["x_t"][:B], b["t"][:B], b["y"][:B])
            runs.check_finite(step, loss=loss, grad_norm=gnorm, critic_loss_and_grad_norms=critic_sum)
            opt_g.step()
            common.ema_update(ema, student, args.ema, step)
            per_source.add(loss_dm, b["source"][:B])
            step += 1

            if step % args.log_every == 0 or step == args.iters:
                log.write(step, **per_source.summary("loss"), **sampler.log_stats(), lr=opt_g.param_groups[0]["lr"],
                          lr_critic=opt_c.param_groups[0]["lr"])
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
