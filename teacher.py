"""Train the class-conditional diffusion teacher that every DDIL student distils.

v-prediction on the variance-preserving cosine schedule (Salimans & Ho 2022, arXiv 2202.00512):

    t ~ U(0, 1),  z_t = alpha_t x_0 + sigma_t ε,  v = alpha_t ε - sigma_t x_0,   L = E ‖v̂_θ(z_t, t, y) - v‖²

(the v-MSE is the x_0-MSE weighted by SNR + 1). Labels are dropped to the null class with
probability --p-uncond so that one network gives both scores of classifier-free guidance (Ho &
Salimans 2022, arXiv 2207.12598). Sampling is DDIM with CFG (common.sample). The EMA weights are
what the students load.

    python teacher.py --preset smoke                      # ~1 minute on a 2-core CPU, synthetic data
    python teacher.py --preset cifar10                    # one GPU: see --preset cifar10 below
    python teacher.py --preset cifar10 --data-dir ../shared/data/cifar10-jpeg-train.zip

The method scripts call this file themselves when --teacher auto finds no finished teacher under
runs/teacher-<preset>. Rerunning the same command resumes from ckpt.pt.
"""

import argparse
import os

import torch

import cli
import common
import gmm
import runs
import scoring
from common import NULL_CLASS

# Preset values of every flag whose default is None. cifar10 is sized for about an hour on one H100
# in bf16: a 38 M-parameter UNet (DDPM's CIFAR-10 layout), 12.4 GFLOP per image forward (torch's
# flop counter), 80k iterations of 128 = 380 PFLOP, i.e. ~1 h at 100 TFLOP/s (10 % of the bf16
# peak). An estimate, not a measurement: `bash bench_gpu.sh` measures the rate (BENCHMARKS.md).
PRESETS = {
    "smoke": dict(dataset="synthetic", ch=32, ch_mult="1,2,2", num_blocks=1, dropout=0.0, iters=160,
                  batch_size=32, lr=2e-3, ema=0.99, warmup=20, guidance=1.5, log_every=20, save_every=50,
                  eval_every=0, eval_samples=0, sample_steps=16),
    # gmm: the exact benchmark (gmm.py) on 2 CPU cores: a 0.3 M-parameter UNet, no guidance (the exact metrics
    # measure the distance to p(x | y) itself): about 6 minutes alone on 2 CPU cores (~185 ms/it).
    "gmm": dict(dataset="gmm", ch=16, ch_mult="1,2,2", num_blocks=1, dropout=0.0, iters=2000, batch_size=64,
                lr=1e-3, ema=0.998, warmup=100, guidance=1.0, log_every=100, save_every=400, eval_every=0,
                eval_samples=0, sample_steps=64),
    "cifar10": dict(dataset="cifar10", ch=128, ch_mult="1,2,2,2", num_blocks=2, dropout=0.1, iters=80_000,
                    batch_size=128, lr=2e-4, ema=0.9999, warmup=1000, guidance=1.5, log_every=200,
                    save_every=5000, eval_every=0, eval_samples=10_000, sample_steps=32),
}
# gmm2: the second exact benchmark (gmm.py MIXTURES) with the first one's sizes. With --teacher exact (the default
# there) this UNet only gives the students their initial weights; its own DDIM rows are in results/gmm2/teacher/.
PRESETS["gmm2"] = dict(PRESETS["gmm"], dataset="gmm2")
# quick: the first run on a CPU (--preset auto without CUDA): the gmm2 UNet trained briefly, as the students' start
# (their teacher is the exact one), so that the whole first run takes minutes.
PRESETS["quick"] = dict(PRESETS["gmm2"], iters=300, batch_size=32, lr=2e-3, ema=0.99, warmup=20, log_every=50,
                        save_every=200, sample_steps=16)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(p, student=False)
    g = p.add_argument_group("teacher network and loss")
    g.add_argument("--ch", type=cli.positive_int, default=None,
                   help="UNet base channels (preset; cifar10: 128, 38 M parameters, ~1 h on one H100, estimated)")
    g.add_argument("--ch-mult", default=None, help="channel multiplier per resolution, e.g. 1,2,2,2 (preset)")
    g.add_argument("--num-blocks", type=cli.positive_int, default=None, help="ResBlocks per resolution (preset)")
    g.add_argument("--attn-res", default="16", help="resolutions with self-attention, comma-separated")
    g.add_argument("--dropout", type=cli.fraction, default=None, help="dropout in ResBlocks (preset)")
    g.add_argument("--p-uncond", type=cli.fraction, default=0.1, help="label dropout for CFG (null class)")
    g.add_argument("--warmup", type=cli.count, default=None, help="learning-rate warm-up iterations (preset)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of the data (default: on, except on the mixture data sets, which "
                        "are not mirror-symmetric: flipping them would teach the flip-symmetrised mixture)")
    g.add_argument("--sample-steps", type=cli.positive_int, default=None, help="DDIM steps for samples.png (preset)")
    cli.preset_help(p, PRESETS)
    args = p.parse_args(argv)
    cli.resolve(p, args, "teacher", PRESETS)
    if args.hflip is None:
        args.hflip = args.dataset not in gmm.MIXTURES
    try:
        args.ch_mult = [int(c) for c in str(args.ch_mult).split(",")]
        args.attn_res = [int(r) for r in str(args.attn_res).split(",") if r]
    except ValueError:
        raise common.UserError("--ch-mult / --attn-res: give comma-separated integers, e.g. 1,2,2,2") from None
    if not args.ch_mult or min(args.ch_mult) <= 0:
        raise common.UserError(f"--ch-mult {','.join(map(str, args.ch_mult))}: every multiplier must be a positive "
                               "integer, e.g. 1,2,2,2")
    resolutions = [32 >> level for level in range(len(args.ch_mult))]       # 32x32 images, halved per level
    if set(args.attn_res) - set(resolutions):
        raise common.UserError(f"--attn-res {','.join(map(str, args.attn_res))}: this UNet's resolutions are "
                               f"{','.join(map(str, resolutions))} (attention at any other would never be used)")
    return args


def auto_argv(args, out):
    """teacher.py arguments for --teacher auto, from a method script's resolved args."""
    argv = ["--preset", args.preset, "--device", args.device, "--out", out, "--amp", args.amp]
    argv += ["--data-dir", args.data_dir] if args.data_dir else ["--dataset", args.dataset]
    return argv + (["--compile"] if args.compile else [])


def ensure_teacher(args):
    """The teacher of a method script's resolved args: --teacher PATH, "exact" (the mixture's closed form),
    or for --teacher auto the default teacher run of this preset and dataset. The UNet the student starts
    from (the teacher itself; with --teacher exact, --init's, by default that same default teacher run) is
    trained (or resumed) here when it is missing or unfinished. Sets args.teacher_path and args.init_path
    (recorded in the run's config; eval and ablate read them) and returns args.teacher_path."""
    path, finished = runs.teacher_checkpoint(args)
    if not finished:
        what = "UNet for the student to start from" if args.teacher == "exact" else "teacher"
        print(f"--teacher {args.teacher}: no finished {what} at {path}; training it with teacher.py", flush=True)
        main(auto_argv(args, os.path.dirname(path)))        # a stop here stops the method script too
    args.init_path = path
    args.teacher_path = "exact" if args.teacher == "exact" else path
    return args.teacher_path


# --- Loss: v-prediction with label dropout ---

def teacher_loss(net, x0, y, p_uncond):
    """Per-example ‖v̂ - v‖² (mean over pixels) at t ~ U(0, 1). x0: [B, 3, 32, 32] in [-1, 1]."""
    t = torch.rand(x0.shape[0], device=x0.device)
    z_t, v = common.forward_diffuse(x0, t, torch.randn_like(x0))           # v: the regression target
    y = torch.where(torch.rand_like(t) < p_uncond, torch.full_like(y, NULL_CLASS), y)
    return (net(z_t, t, y).float() - v).square().mean(dim=(1, 2, 3))


# --- Sampling (used by samples.png and eval.py) ---

def make_generator(ckpt, device, steps=32, guidance=None):
    """generate(noise, labels, renoise) -> x̂_0 with the EMA teacher: DDIM, `steps` uniform steps, CFG."""
    net = runs.build_unet(ckpt["unet"], device)
    net.load_state_dict(ckpt["nets"]["ema"])
    net.eval().requires_grad_(False)
    w = ckpt["config"]["guidance"] if guidance is None else guidance
    times = torch.linspace(1, 0, steps + 1).tolist()
    return lambda noise, labels, renoise=None: common.sample(
        lambda z, t, y: common.denoise(net, z, t, y, w), noise, labels, times)


def evaluate(run_dir, n_samples=None, device=None, **options):
    """A teacher run's metrics.json: samples of its DDIM sampler with its --sample-steps (as samples.png)."""
    steps = runs.read_json(os.path.join(run_dir, "config.json")).get("sample_steps") or 32
    return scoring.evaluate_checkpoint(run_dir, lambda ckpt, device: make_generator(ckpt, device, steps),
                                       None, n_samples, device, sampler=f"ddim{steps}", **options)


# --- Training loop ---

def train(args):
    runs.announce(args, "teacher")
    device = torch.device(args.device)
    runs.seed_everything(args.seed)
    data = runs.Dataset(*runs.load_images(args.dataset, args.data_dir), device)
    ckpt_path = runs.prepare_run(args, "teacher")
    unet_config = dict(ch=args.ch, ch_mult=args.ch_mult, num_blocks=args.num_blocks, attn_res=args.attn_res,
                       dropout=args.dropout)
    net = runs.build_unet(unet_config, device)
    ema = runs.build_unet(unet_config, device).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = runs.optimizer(net.parameters(), args.lr, device)
    step = 0
    if os.path.exists(ckpt_path):                               # resume
        with runs.resuming(ckpt_path):   # a checkpoint that does not fit: one line
            ckpt = runs.load_checkpoint(ckpt_path, device)
            net.load_state_dict(ckpt["nets"]["model"]), ema.load_state_dict(ckpt["nets"]["ema"])
            opt.load_state_dict(ckpt["opts"]["model"])
            runs.set_rng_state(ckpt["rng"])
            step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in net.parameters())
    print(f"teacher UNet: {n_params / 1e6:.2f} M parameters, {len(data)} training images ({args.dataset})")
    model = runs.maybe_compile(net, args)

    def save():
        runs.save_checkpoint(ckpt_path, dict(
            step=step, config=vars(args), unet=unet_config, nets=dict(model=net.state_dict(), ema=ema.state_dict()),
            opts=dict(model=opt.state_dict()), rng=runs.rng_state()))

    evaluate_now = lambda: evaluate(args.out, args.eval_samples, args.device)
    log = runs.RunLog(args.out, args.iters, step)
    with runs.GracefulStop() as stop:
        while step < args.iters:
            for group in opt.param_groups:
                group["lr"] = runs.lr_at(step, args.lr, args.warmup)
            x0, y = data.batch(args.batch_size, hflip=args.hflip)
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            with runs.autocast(args):
                loss = teacher_loss(model, x0, y, args.p_uncond).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            runs.check_finite(step, loss=loss)
            opt.step()
            common.ema_update(ema, net, args.ema, step)
            log.add(loss=loss)
            step += 1
            if step % args.log_every == 0 or step == args.iters:
                log.write(step, lr=opt.param_groups[0]["lr"])
            log.tick(step)
            runs.end_of_step(args, step, save, stop, evaluate_now)
    return runs.finish(args, ckpt_path, lambda ckpt, device: make_generator(ckpt, device, args.sample_steps),
                         evaluate_now)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return cli.dry_run(args)
    return train(args)


if __name__ == "__main__":
    cli.run_main(main)
