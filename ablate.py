"""The two ablations the DDIL paper (arXiv 2410.11971) lacks, and its own three rows, one command each.

    python ablate.py --method dmd2 --study priors --seeds 0,1,2        # sampling priors β
    python ablate.py --method all --study threshold                     # where thresholding is applied
    python ablate.py --method all --study paper --preset smoke          # baseline / +DDIL / +Reflected+DDIL

Every run of a grid gets the same budget (the preset's --iters, or what you pass after `--`, e.g.
`-- --iters 2000`), lives in runs/ablate/<method>-<preset>-<flags>-s<seed> (identical settings in
two studies share one run), and is skipped once it has finished with metrics.json, so an
interrupted grid resumes where it stopped. Outputs, per study and method, in ablations/:

    <study>-<method>.md    table: mean ± std over seeds of every metric, wall time per run, and
                           paired deltas to the study's reference row (per seed, then averaged, with
                           a 95 % t-interval over seeds; * where it excludes zero)
    <study>-<method>.csv   the same numbers
    <study>-<method>.png   bar plots with std error bars
    shift-<method>.md/.png (study paper) the covariate-shift diagnostic of the paper's Sec. 3.2

Grids (DESIGN §1, §4):
    priors     fixed 100 % forward; 100 % student backward; 50/50 forward/student; the default DDIL
               mixture under each dynamic schedule (constant, linear, cosine, step)
    threshold  with the default DDIL mixture: none; teacher only; student only; both (DMD2: also
               critic only, and all three)
    paper      baseline; --ddil; --ddil --reflected
"""

import csv
import importlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

import common

METHODS = ("pd", "lcm", "dmd2")
BASELINE_SOURCE = {"pd": "fwd", "lcm": "fwd", "dmd2": "student"}    # DESIGN §4: each method's own baseline
# Metric prefixes in table order; eval.py names keys <prefix><samples>_<reference>, e.g. fid10k_train.
METRICS = ("fid", "class_score", "class_acc", "lpips_div", "precision", "recall", "density", "coverage",
           "teacher_mse", "teacher_lpips")
DELTA_METRICS = ("fid", "class_score", "lpips_div", "teacher_mse", "teacher_lpips")


# --- The grids ---

# Every row of the priors study shares --ddil's buffer, refresh and chunk settings, so that its rows
# differ only in the priors and their schedule; "fixed" rows use the constant schedule.
FIXED = ["--ddil", "--prior-schedule", "constant"]


def grid(study, method):
    """[(setting, flags)] of a study for a method, reference row first."""
    if study == "priors":
        rows = [("fwd100", FIXED + ["--beta-fwd", "1", "--beta-teacher", "0", "--beta-student", "0"]),
                ("student100", FIXED + ["--beta-fwd", "0", "--beta-teacher", "0", "--beta-student", "1"]),
                ("fwd50-student50", FIXED + ["--beta-fwd", "1", "--beta-teacher", "0", "--beta-student", "1"])]
        rows += [(f"ddil-{s}", ["--ddil"] + ([] if s == "linear" else ["--prior-schedule", s]))   # --ddil is linear
                 for s in ("constant", "linear", "cosine", "step")]
        return rows
    if study == "threshold":
        # Where x̂_0 is clipped: nowhere; only in the student's sampler (PD's official default); the teacher;
        # the student (training target / output, and its sampler); both. DMD2 adds the critic, the
        # consistent teacher+critic pair (clipping one score alone moves DMD's fixed point), and all three.
        off = ["--ddil", "--no-sample-clip"]
        rows = [("none", off), ("sampling", ["--ddil", "--sample-clip"]), ("teacher", off + ["--threshold-teacher"]),
                ("student", ["--ddil", "--threshold-student"]),
                ("teacher+student", ["--ddil", "--threshold-teacher", "--threshold-student"])]
        if method == "dmd2":
            rows += [("critic", off + ["--threshold-critic"]),
                     ("teacher+critic", off + ["--threshold-teacher", "--threshold-critic"]),
                     ("all", ["--ddil", "--reflected"])]
        return rows
    if study == "paper":
        return [("baseline", []), ("ddil", ["--ddil"]), ("reflected-ddil", ["--ddil", "--reflected"])]
    raise ValueError(study)


def reference(study, method):
    """The row every paired delta is taken against: the method's baseline, or no thresholding."""
    return {"priors": "fwd100" if BASELINE_SOURCE[method] == "fwd" else "student100",
            "threshold": "none", "paper": "baseline"}[study]


# Resolved settings that do not change a run's result (where it writes, how often it logs, shorthands
# already expanded into the settings they stand for).
NOT_RESULT = {"out", "dry_run", "device", "log_every", "save_every", "eval_every", "compile", "preset_reason",
              "ddil", "reflected"}


def resolved_config(method, flags, preset, seed, extra):
    """The settings a run of the grid trains with: its own script's parse_args (what --dry-run prints),
    minus NOT_RESULT."""
    module = importlib.import_module(f"ddil_{method}")
    args = module.parse_args(["--preset", preset, "--seed", str(seed), *flags, *extra])
    return {k: v for k, v in vars(args).items() if k not in NOT_RESULT}


def run_dir(method, preset, flags, seed):
    name = "-".join(f.lstrip("-") for f in flags) or "baseline"
    return os.path.join("runs", "ablate", f"{method}-{preset}-{name}-s{seed}")


# --- Running ---

def run_one(method, flags, seed, preset, extra, dry):
    """Train + evaluate one run (a subprocess, as a user would), unless it already finished."""
    out = run_dir(method, preset, flags, seed)
    done = os.path.join(out, "ablate.json")
    cmd = [sys.executable, f"ddil_{method}.py", "--preset", preset, "--seed", str(seed), "--out", out, *flags, *extra]
    if os.path.exists(done) and os.path.exists(os.path.join(out, "metrics.json")):
        return out
    print(("would run: " if dry else "running: ") + " ".join(cmd[1:]), flush=True)
    if dry:
        return None
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise common.UserError(f"run failed (exit {r.returncode}): {' '.join(cmd[1:])}; fix it and rerun ablate.py "
                               "(finished runs are kept)")
    if not os.path.exists(os.path.join(out, "metrics.json")):
        raise common.UserError(f"{out} wrote no metrics.json: ablations need --eval-samples > 0")
    with open(done + ".tmp", "w") as f:  # atomic, like every file a run leaves
        json.dump({"wall_s": time.time() - t0, "cmd": cmd[1:]}, f)
    os.replace(done + ".tmp", done)
    return out


def read_metrics(out):
    """{prefix: value} from metrics.json (largest sample count of each metric) and the run's wall time."""
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    found = {}
    for key, value in m.items():
        for p in METRICS:
            rest = key[len(p):]
            if key.startswith(p) and rest[:1].isdigit() and isinstance(value, (int, float)):
                n = _samples(rest.split("_")[0])
                if n >= found.get(p, (-1, None))[0]:
                    found[p] = (n, value)
    row = {p: v for p, (n, v) in found.items()}
    drifts = [(int(_samples(k[5:].split("_")[0])), v) for k, v in m.items()
              if k.startswith("drift") and k[5:6].isdigit() and isinstance(v, list)]
    if drifts:
        row["drift"] = max(drifts)[1]
    with open(os.path.join(out, "ablate.json")) as f:
        row["wall_min"] = json.load(f)["wall_s"] / 60
    return row


def _samples(s):
    return int(float(s[:-1]) * 1000) if s.endswith("k") else int(s)


# --- Statistics ---

def paired_delta(values, ref_values):
    """Per-seed paired difference values[s] - ref_values[s] over the seeds both have: (mean, lo, hi, n),
    with a 95 % Student-t interval over seeds (lo = hi = nan with one seed)."""
    from scipy import stats
    seeds = sorted(set(values) & set(ref_values))
    d = np.array([values[s] - ref_values[s] for s in seeds], dtype=np.float64)
    if len(d) == 0:
        return math.nan, math.nan, math.nan, 0
    if len(d) == 1:
        return float(d[0]), math.nan, math.nan, 1
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), len(d)


def summarise(results, ref):
    """results: {setting: {seed: {metric: value}}} -> rows of mean/std and paired deltas to `ref`."""
    rows = []
    for setting, by_seed in results.items():
        row = {"setting": setting, "seeds": ",".join(str(s) for s in sorted(by_seed))}
        for m in METRICS + ("wall_min",):
            vals = [r[m] for r in by_seed.values() if m in r]
            if vals:
                row[m] = float(np.mean(vals))
                row[m + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        drifts = [r["drift"] for r in by_seed.values() if "drift" in r]
        if drifts and len({len(d) for d in drifts}) == 1:
            row["drift"] = np.mean(drifts, axis=0).tolist()
        for m in DELTA_METRICS:
            if setting != ref and ref in results:
                x = {s: r[m] for s, r in by_seed.items() if m in r}
                y = {s: r[m] for s, r in results[ref].items() if m in r}
                if x and y:
                    mean, lo, hi, n = paired_delta(x, y)
                    row[f"d_{m}"], row[f"d_{m}_lo"], row[f"d_{m}_hi"] = mean, lo, hi
        rows.append(row)
    return rows


# --- Writing the table, CSV and plot ---

def write_outputs(rows, study, method, preset, ref, n_seeds, out_dir="ablations"):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{study}-{method}")
    metrics = [m for m in METRICS + ("wall_min",) if any(m in r for r in rows)]
    deltas = [m for m in DELTA_METRICS if any(f"d_{m}" in r for r in rows)]
    with open(stem + ".csv", "w", newline="") as f:
        keys = ["setting", "seeds"] + [k for m in metrics for k in (m, m + "_std")] + \
               [k for m in deltas for k in (f"d_{m}", f"d_{m}_lo", f"d_{m}_hi")]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    scale = "SMOKE-SCALE EXAMPLE (tiny UNet, synthetic data, minutes of CPU): not results." if preset == "smoke" else ""
    lines = [f"# Ablation `{study}` — {method} (preset {preset}, {n_seeds} seed(s))", "",
             scale, "",
             ("One seed: values, no spread. " if n_seeds == 1 else "Mean ± std over seeds. ")
             + f"Δ columns: paired difference to `{ref}` per seed, averaged, with a 95 % t-interval over seeds; "
             "* marks an interval that excludes zero. Metric names in metrics.json carry "
             "the sample count and reference (e.g. fid10k_train).", "",
             "| setting | " + " | ".join(metrics) + (" | " if deltas else "") + " | ".join(f"Δ{m}" for m in deltas) + " |",
             "|" + "---|" * (1 + len(metrics) + len(deltas))]
    for r in rows:
        cells = [("" if m not in r else f"{r[m]:.4g}" if n_seeds == 1 else f"{r[m]:.4g} ± {r[m + '_std']:.2g}")
                 for m in metrics]
        for m in deltas:
            if f"d_{m}" not in r:
                cells.append("(ref)" if r["setting"] == ref else "")
                continue
            d, lo, hi = r[f"d_{m}"], r[f"d_{m}_lo"], r[f"d_{m}_hi"]
            star = "*" if not math.isnan(lo) and (lo > 0 or hi < 0) else ""
            cells.append(f"{d:+.3g}{star}" + ("" if math.isnan(lo) else f" [{lo:+.3g}, {hi:+.3g}]"))
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    drift_rows = [r for r in rows if "drift" in r]
    if drift_rows:
        K = max(len(r["drift"]) for r in drift_rows)
        lines += ["", "Per-step drift (eval.py `drift`): mean squared gap between the student's x̂_0 after each of its "
                  "K steps and the teacher's many-step sample from the same noise, mean over seeds.", "",
                  "| setting | " + " | ".join(f"step {k + 1}" for k in range(K)) + " |", "|---|" + "---|" * K]
        lines += [f"| {r['setting']} | " + " | ".join(f"{v:.4g}" for v in r["drift"]) + " |" for r in drift_rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_bars(rows, [m for m in metrics if m != "wall_min"], stem + ".png", f"{study} — {method} ({preset})")
    print("\n".join(lines[6:]))
    print(f"wrote {stem}.md, .csv, .png")


def plot_bars(rows, metrics, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in metrics if any(m in r for r in rows)]
    n_cols = min(5, len(metrics))                      # rows of five panels: readable on a page
    n_rows = -(-len(metrics) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, metrics):
        names = [r["setting"] for r in rows if m in r]
        ax.bar(range(len(names)), [r[m] for r in rows if m in r], yerr=[r[m + "_std"] for r in rows if m in r],
               color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Covariate-shift diagnostic (paper Sec. 3.2, measured) ---

@torch.no_grad()
def covariate_shift(out, n=256, ref_steps=64, device="cpu", memo=None):
    """For a trained student, at each of its K sampling times t_k: the mean squared gap between the
    student's x̂_0 and the teacher's x̂_0 on (a) forward-diffused data states and (b) the student's own
    rollout states. The teacher's x̂_0 at a state is the end of its CFG DDIM trajectory from that state
    (`ref_steps` per unit time, no thresholding: one reference for every student): what a distilled
    student imitates (PD, LCM), rather than the one-shot posterior mean, which no few-step student
    predicts. memo: a dict reused across students of one teacher (the forward states and their teacher
    ends do not depend on the student). Returns (gap_fwd, gap_own), one value per step."""
    import importlib
    memo = {} if memo is None else memo
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), device)
    cfg = ckpt["config"]
    with open(os.path.join(out, "config.json")) as f:
        method = importlib.import_module(f"ddil_{json.load(f)['method']}")
    x0_fn, times, stochastic = method.make_student(ckpt, device)
    teacher, _ = common.load_teacher(cfg["teacher_path"], device)
    teacher_fn = lambda z, t, y: common.denoise(teacher, z, t, y, cfg["guidance"])
    teacher_end = lambda z, t, y: common.sample(teacher_fn, z, y, common.fine_grid(t, 0.0, ref_steps))
    key = (cfg["teacher_path"], cfg["guidance"], cfg["dataset"], cfg.get("data_dir"), n, ref_steps)
    if key not in memo:
        memo[key] = {"data": common.Dataset(*common.load_images(cfg["dataset"], cfg.get("data_dir")), device)}
    cache = memo[key]
    noise, labels, renoise = common.seeded_batch(range(n), device)
    z = noise
    gap_fwd, gap_own = [], []
    for t, s in zip(times[:-1], times[1:]):
        if t not in cache:                    # (a) forward states at t and the teacher's ends, once per t
            torch.manual_seed(int(1e6 * t))
            x0, y = cache["data"].batch(n)
            alpha_t, sigma_t = common.alpha_sigma(t)
            z_fwd = alpha_t * x0 + sigma_t * torch.randn_like(x0)
            cache[t] = (z_fwd, y, teacher_end(z_fwd, t, y))
        z_fwd, y, end = cache[t]
        gap_fwd.append(float((x0_fn(z_fwd, t, y) - end).square().mean()))
        gap_own.append(float((x0_fn(z, t, labels) - teacher_end(z, t, labels)).square().mean()))
        z = common.sampler_step(x0_fn, z, t, s, labels, renoise if stochastic else None)
    return gap_fwd, gap_own


def write_shift(method, preset, seeds, n, device, out_dir="ablations"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves, memo = {}, {}
    for setting, flags in grid("paper", method)[:2]:      # baseline and +DDIL students
        per_seed = [covariate_shift(run_dir(method, preset, flags, s), n, device=device, memo=memo) for s in seeds]
        curves[setting] = np.array(per_seed).mean(0)       # [2, K]
    K = next(iter(curves.values())).shape[1]
    lines = [f"# Covariate-shift diagnostic — {method} (preset {preset}, seeds {','.join(map(str, seeds))}, {n} samples)",
             "", "SMOKE-SCALE EXAMPLE: not results." if preset == "smoke" else "", "",
             "Mean squared gap between the student's x̂_0 and the end of the teacher's trajectory from the same state, "
             "at each of the student's K sampling steps, on (a) forward-diffused data states and (b) the student's "
             "own rollout states. Covariate shift shows as (b) growing above (a) along the trajectory.", "",
             "| student | states | " + " | ".join(f"step {k + 1}" for k in range(K)) + " |", "|---|---|" + "---|" * K]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for setting, c in curves.items():
        for i, states in enumerate(("(a) forward", "(b) own rollout")):
            lines.append(f"| {setting} | {states} | " + " | ".join(f"{v:.4g}" for v in c[i]) + " |")
            ax.plot(range(1, K + 1), c[i], marker="o", ls="-" if i else "--", label=f"{setting} {states}")
    ax.set_xlabel("student sampling step k"), ax.set_ylabel("MSE to teacher x̂_0"), ax.legend(fontsize=7)
    ax.set_title(f"covariate shift — {method}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"shift-{method}.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(out_dir, f"shift-{method}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))


# --- main ---

def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0],
                      epilog="Arguments after `--` go to every run, e.g. `-- --iters 2000 --eval-samples 10000`.")
    p.add_argument("--method", choices=METHODS + ("all",), required=True, help="which distiller(s)")
    p.add_argument("--study", choices=["priors", "threshold", "paper"], required=True, help="which grid")
    p.add_argument("--preset", choices=["auto", "smoke", "cifar10"], default="auto",
                   help="preset of every run (auto: cifar10 with CUDA, else smoke)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    p.add_argument("--shift-samples", type=common._count, default=None,
                   help="samples for the covariate-shift diagnostic (study paper; 0 = skip) (smoke 32, cifar10 1000)")
    p.add_argument("--device", default="auto", help="device for the diagnostic (runs pick their own)")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and which are done) and exit")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"argument --seeds: {args.seeds!r} is not a comma-separated list of integers")
    if args.preset == "auto":
        args.preset = "cifar10" if torch.cuda.is_available() else "smoke"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shift_samples is None:
        args.shift_samples = 32 if args.preset == "smoke" else 1000
    if any(a in ("--out", "--seed", "--preset") for a in extra):
        p.error("arguments after `--` may not set --out, --seed or --preset (ablate.py sets them)")
    return args, extra


def main(argv=None):
    args, extra = parse_args(argv)
    for method in METHODS if args.method == "all" else (args.method,):
        results = {}
        for setting, flags in grid(args.study, method):
            results[setting] = {}
            for seed in args.seeds:
                out = run_one(method, flags, seed, args.preset, extra, args.dry_run)
                if out is not None:
                    results[setting][seed] = read_metrics(out)
        if args.dry_run:
            continue
        rows = summarise(results, reference(args.study, method))
        write_outputs(rows, args.study, method, args.preset, reference(args.study, method), len(args.seeds))
        if args.study == "paper" and args.shift_samples:
            write_shift(method, args.preset, args.seeds, args.shift_samples, args.device)


if __name__ == "__main__":
    common.run_main(main)
