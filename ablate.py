"""The two ablations the DDIL paper (arXiv 2410.11971) lacks, and its own three rows, one command each.

    python ablate.py --method dmd2 --study priors --seeds 0,1,2        # sampling priors β
    python ablate.py --method all --study threshold                     # where thresholding is applied
    python ablate.py --method all --study paper --preset smoke          # baseline / +DDIL / +Reflected+DDIL
    python ablate.py --method pd --study priors,threshold -- --iters 2000   # both grids, shorter runs

A run's identity is its resolved configuration (what its script's --dry-run prints, minus where it
writes and how often it logs) plus the teacher's own recorded configuration: two rows, or two
studies, whose runs resolve to the same settings share one run, and a run with other settings (a
different `-- --iters`, `--eval-samples`, teacher, data ...) is a different run, never a silent
reuse. Runs train in <runs>/<method>-<preset>-<hash>-s<seed>/ (checkpoints, not committed); when one
finishes, its small record (config.json, metrics.json, log.jsonl, ablate.json with the identity,
command and wall time) is copied to <results>/records/<same name>/, and a grid counts a run as done
from its record alone, so a grid resumes on a fresh clone from committed records. Outputs, per
study and method, in <results>/:

    <study>-<method>.md    table: mean ± std over seeds of every metric (one full metric key per column,
                           e.g. fid10k_train: rows evaluated at different sample counts are an error),
                           wall time per run, paired deltas to the study's reference row (per seed, then
                           averaged, 95 % t-interval over seeds; * where it excludes zero), and the
                           settings held fixed and varied across its rows (from the resolved configs)
    <study>-<method>.csv   the same numbers
    <study>-<method>.png   bar plots with std error bars
    shift-<method>.md/.png (study paper) the covariate-shift diagnostic of the paper's Sec. 3.2

Grids (DESIGN §1, §4):
    priors     fixed 100 % forward; 100 % student backward; 50/50 forward/student; the default DDIL
               mixture under each dynamic schedule (constant, linear, cosine, step); every row with
               --ddil's replay buffer, refresh and chunk
    threshold  with the default DDIL mixture: none; sampling only; teacher only; student only (its
               target / output and its sampler); teacher+student (DMD2: also critic only, the
               consistent teacher+critic pair, and all three)
    paper      baseline; --ddil; --ddil --reflected
"""

import argparse
import csv
import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

import common

METHODS = ("pd", "lcm", "dmd2")
STUDIES = ("priors", "threshold", "paper")
PRESETS = ("smoke", "cifar10")
BASELINE_SOURCE = {"pd": "fwd", "lcm": "fwd", "dmd2": "student"}    # DESIGN §4: each method's own baseline
# Metric prefixes in table order; eval.py names keys <prefix><samples>_<reference>[_k<k>], e.g. fid10k_train.
METRICS = ("fid", "class_score", "class_acc", "lpips_div", "precision", "recall", "density", "coverage",
           "teacher_mse", "teacher_lpips")
DELTA_METRICS = ("fid", "class_score", "lpips_div", "teacher_mse", "teacher_lpips")
RECORD_FILES = ("config.json", "metrics.json", "log.jsonl")          # + ablate.json, shift*.json
REPO = os.path.dirname(os.path.abspath(__file__))


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


# --- Run identity ---

# Resolved settings that do not change a run's result (where it writes, how often it logs, shorthands
# already expanded into the settings they stand for).
NOT_RESULT = {"out", "dry_run", "device", "log_every", "save_every", "eval_every", "compile", "preset_reason",
              "ddil", "reflected"}
# Settings a table's header names as held fixed (when equal across its rows), in this order.
HEADLINE = ("dataset", "data_dir", "iters", "batch_size", "lr", "guidance", "steps", "eval_samples", "buffer_size",
            "buffer_refresh", "rollout_chunk", "max_age", "prior_warmup", "expert_prob", "teacher_rollout_steps",
            "sample_clip", "threshold_mode")


def script_args(method, flags, preset, seed, extra):
    return [f"ddil_{method}.py", "--preset", preset, "--seed", str(seed), *flags, *extra]


def resolved_config(method, flags, preset, seed, extra):
    """The settings a run of the grid trains with: its own script's parse_args (what --dry-run prints),
    minus NOT_RESULT."""
    module = importlib.import_module(f"ddil_{method}")
    args = module.parse_args(script_args(method, flags, preset, seed, extra)[1:])
    return {k: v for k, v in vars(args).items() if k not in NOT_RESULT}


def teacher_identity(config):
    """What the teacher of a resolved config is: its checkpoint path and the settings it recorded (its
    resolved config and step), stable across machines, unlike the bytes of the file. None while the
    --teacher auto checkpoint does not exist or has not finished."""
    path, finished = common.teacher_checkpoint(argparse.Namespace(**config))
    if not finished:
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    cfg = {k: v for k, v in ckpt["config"].items() if k not in NOT_RESULT | {"versions"}}
    return {"path": path, "step": ckpt["step"], "config": cfg}


class Run:
    """One training run of a grid: the settings (study, row name) it stands for, its script arguments,
    its identity and the directory name derived from it."""

    def __init__(self, method, flags, preset, seed, extra):
        self.method, self.seed, self.preset = method, seed, preset
        self.argv = script_args(method, flags, preset, seed, extra)
        self.config = resolved_config(method, flags, preset, seed, extra)
        self.teacher = teacher_identity(self.config)
        self.identity = json.loads(json.dumps({**self.config, "teacher": self.teacher or self.config["teacher"]},
                                              sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:10]
        self.name = f"{method}-{preset}-{digest}-s{seed}"
        self.settings = []

    def record(self, results):
        return os.path.join(results, "records", self.name)


def plan(methods, studies, preset, seeds, extra):
    """The grid as runs, deduplicated by identity (rows shared between studies are one run), and
    {(study, method): [(setting, {seed: Run})]} for the tables."""
    runs, tables = {}, {}
    for method in methods:
        for study in studies:
            rows = []
            for setting, flags in grid(study, method):
                by_seed = {}
                for seed in seeds:
                    run = Run(method, flags, preset, seed, extra)
                    run = runs.setdefault(run.name, run)
                    run.settings.append(f"{study}:{setting}")
                    by_seed[seed] = run
                rows.append((setting, by_seed))
            tables[(study, method)] = rows
    return list(runs.values()), tables


# --- Running ---

def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    with open(path + ".tmp", "w") as f:          # atomic, like every file a run leaves
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def is_done(run, results):
    """A run is done when its record holds metrics and an ablate.json with this identity; a record
    with another identity under the same name (a hash collision) is an error, never a reuse."""
    rec = run.record(results)
    if not (os.path.isfile(os.path.join(rec, "ablate.json")) and os.path.isfile(os.path.join(rec, "metrics.json"))):
        return False
    if read_json(os.path.join(rec, "ablate.json"))["identity"] != run.identity:
        raise common.UserError(f"{rec}: recorded with other settings than this grid asks for; move it away")
    return True


def train_teacher(run):
    """--teacher auto: train the grid's shared teacher once, before any run (a subprocess, as a user)."""
    import teacher
    args = argparse.Namespace(**run.config, device="auto", compile=False)
    path, _ = common.teacher_checkpoint(args)
    argv = [sys.executable, os.path.join(REPO, "teacher.py"), *teacher.auto_argv(args, os.path.dirname(path))]
    print("teacher first (shared by every run): " + " ".join(argv[1:]), flush=True)
    if subprocess.run(argv).returncode != 0:
        raise common.UserError(f"teacher training failed: {' '.join(argv[1:])}")


def execute(run, runs_dir, results):
    """Train + evaluate one run (a subprocess, as a user would), then copy its small record."""
    out = os.path.join(runs_dir, run.name)
    cmd = [sys.executable, os.path.join(REPO, run.argv[0]), *run.argv[1:], "--out", out]
    print("running: " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise common.UserError(f"run failed (exit {r.returncode}): {' '.join(cmd[1:])}; fix it and rerun ablate.py "
                               "(finished runs are kept)")
    if not os.path.isfile(os.path.join(out, "metrics.json")):
        raise common.UserError(f"{out} wrote no metrics.json: ablations need --eval-samples > 0")
    save_record(run, out, results, dict(wall_s=time.time() - t0))


def save_record(run, out, results, timing):
    rec = run.record(results)
    os.makedirs(rec, exist_ok=True)
    for f in RECORD_FILES:
        if os.path.isfile(os.path.join(out, f)):
            shutil.copyfile(os.path.join(out, f), os.path.join(rec, f + ".tmp"))
            os.replace(os.path.join(rec, f + ".tmp"), os.path.join(rec, f))
    write_json(os.path.join(rec, "ablate.json"),                    # last: it marks the record complete
               dict(identity=run.identity, cmd=run.argv, settings=run.settings, **timing))


def read_record(run, results):
    """{full metric key: value} of the evaluation with the run's own --eval-samples, its drift list
    (key 'drift'), its eval sample count and its wall time in minutes."""
    rec = run.record(results)
    m = read_json(os.path.join(rec, "metrics.json"))
    n = run.config["eval_samples"]
    keys = m.get("evals", {}).get(str(n), {}).get("metrics", [])
    row = {k: m[k] for k in keys if isinstance(m.get(k), (int, float))}
    drift = [k for k in keys if k.startswith("drift") and isinstance(m.get(k), list)]
    if drift:
        row["drift"] = m[drift[0]]
    row["wall_min"] = read_json(os.path.join(rec, "ablate.json"))["wall_s"] / 60
    return row


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


def columns(results):
    """{prefix: full metric key} over every run of a table: one key per column; a prefix found under two
    keys (rows evaluated at different sample counts or references) is an error, never a mixed column."""
    found = {}
    for by_seed in results.values():
        for row in by_seed.values():
            for key in row:
                for p in METRICS:
                    if key.startswith(p) and key[len(p):len(p) + 1].isdigit():
                        found.setdefault(p, set()).add(key)
    mixed = {p: sorted(k) for p, k in found.items() if len(k) > 1}
    if mixed:
        raise common.UserError("rows of one table were evaluated differently: "
                               + "; ".join(" vs ".join(k) for k in mixed.values())
                               + " (FID and friends are never compared across sample counts)")
    return {p: found[p].pop() for p in METRICS if p in found}


def summarise(results, ref):
    """results: {setting: {seed: {key: value}}} -> (rows of mean/std and paired deltas to `ref`, the
    {prefix: key} columns)."""
    cols = columns(results)
    rows = []
    for setting, by_seed in results.items():
        row = {"setting": setting, "seeds": ",".join(str(s) for s in sorted(by_seed))}
        for p in list(cols) + ["wall_min"]:
            key = cols.get(p, p)
            vals = [r[key] for r in by_seed.values() if key in r]
            if vals:
                row[p] = float(np.mean(vals))
                row[p + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        drifts = [r["drift"] for r in by_seed.values() if "drift" in r]
        if drifts and len({len(d) for d in drifts}) == 1:
            row["drift"] = np.mean(drifts, axis=0).tolist()
        for p in DELTA_METRICS:
            if setting != ref and ref in results and p in cols:
                x = {s: r[cols[p]] for s, r in by_seed.items() if cols[p] in r}
                y = {s: r[cols[p]] for s, r in results[ref].items() if cols[p] in r}
                if x and y:
                    mean, lo, hi, n = paired_delta(x, y)
                    row[f"d_{p}"], row[f"d_{p}_lo"], row[f"d_{p}_hi"] = mean, lo, hi
        rows.append(row)
    return rows, cols


def held_fixed(configs):
    """(settings equal across every row's resolved config, as 'k=v' for HEADLINE keys, and the keys that
    vary) of a table's runs."""
    keys = set().union(*(c.keys() for c in configs))
    varied = sorted(k for k in keys if k != "seed" and len({json.dumps(c.get(k), default=str) for c in configs}) > 1)
    fixed = [f"{k}={_short(configs[0][k])}" for k in HEADLINE
             if k in keys and k not in varied and configs[0].get(k) is not None]
    return fixed, varied


def _short(v):
    return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else (f"{v:g}" if isinstance(v, float) else str(v))


# --- Writing the table, CSV and plot ---

def write_outputs(rows, cols, study, method, preset, ref, seeds, configs, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{study}-{method}")
    metrics = [p for p in list(cols) + ["wall_min"] if any(p in r for r in rows)]
    deltas = [p for p in DELTA_METRICS if any(f"d_{p}" in r for r in rows)]
    with open(stem + ".csv", "w", newline="") as f:
        keys = ["setting", "seeds"] + [k for m in metrics for k in (m, m + "_std")] + \
               [k for m in deltas for k in (f"d_{m}", f"d_{m}_lo", f"d_{m}_hi")]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writerow({k: cols.get(k, k) for k in keys})          # header: the full metric keys
        w.writerows(rows)
    fixed, varied = held_fixed(configs)
    scale = "SMOKE-SCALE EXAMPLE (tiny UNet, synthetic data, minutes of CPU): not results." if preset == "smoke" else ""
    n_seeds = len(seeds)
    lines = [f"# Ablation `{study}` — {method} (preset {preset}, seeds {','.join(map(str, seeds))})", "",
             scale, "",
             f"Held fixed across rows: {', '.join(fixed)}. Varied: {', '.join(varied) or 'nothing'} "
             "(from the runs' resolved configs).", "",
             ("One seed: values, no spread. " if n_seeds == 1 else "Mean ± std over seeds. ")
             + f"Δ columns: paired difference to `{ref}` per seed, averaged, with a 95 % t-interval over seeds; "
             "* marks an interval that excludes zero. Columns are full metric keys (sample count and reference).", "",
             "| setting | " + " | ".join(cols.get(m, m) for m in metrics) + (" | " if deltas else "")
             + " | ".join(f"Δ{m}" for m in deltas) + " |",
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
        lines += ["", "Per-step drift (eval.py `drift`): after each of the student's K steps, the mean squared gap "
                  "between where the teacher's flow lands from the student's state and where it lands from the "
                  "shared initial noise (0 for the teacher's own sampler; the last step is teacher_mse), mean over "
                  "seeds.", "",
                  "| setting | " + " | ".join(f"step {k + 1}" for k in range(K)) + " |", "|---|" + "---|" * K]
        lines += [f"| {r['setting']} | " + " | ".join(f"{v:.4g}" for v in r["drift"]) + " |" for r in drift_rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_bars(rows, [m for m in metrics if m != "wall_min"], cols, stem + ".png", f"{study} — {method} ({preset})")
    print("\n".join(lines[8:]))
    print(f"wrote {stem}.md, .csv, .png")


def plot_bars(rows, metrics, cols, path, title):
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
        ax.set_title(cols.get(m, m), fontsize=8)
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
    memo = {} if memo is None else memo
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), device)
    cfg = ckpt["config"]
    method = importlib.import_module(f"ddil_{read_json(os.path.join(out, 'config.json'))['method']}")
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
    with torch.random.fork_rng():
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


def shift_record(run, runs_dir, results, n, device, memo):
    """The run's covariate-shift curves, computed from its checkpoint once and kept in its record
    (shift<n>.json), so the diagnostic too regenerates from committed records."""
    path = os.path.join(run.record(results), f"shift{n}.json")
    if not os.path.isfile(path):
        out = os.path.join(runs_dir, run.name)
        if not os.path.isfile(os.path.join(out, "ckpt.pt")):
            return None
        gap_fwd, gap_own = covariate_shift(out, n, device=device, memo=memo)
        write_json(path, dict(forward=gap_fwd, own=gap_own, samples=n))
    return read_json(path)


def write_shift(method, preset, rows, runs_dir, results, n, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves, memo, seeds = {}, {}, set()
    for setting, by_seed in rows[:2]:                       # baseline and +DDIL students
        per_seed = {s: shift_record(run, runs_dir, results, n, device, memo) for s, run in by_seed.items()}
        missing = [s for s, v in per_seed.items() if v is None]
        if missing:
            print(f"shift-{method}: {setting} seeds {missing} have neither a shift record nor a checkpoint; skipped")
            return
        seeds |= set(per_seed)
        curves[setting] = np.array([[v["forward"], v["own"]] for v in per_seed.values()]).mean(0)   # [2, K]
    K = next(iter(curves.values())).shape[1]
    lines = [f"# Covariate-shift diagnostic — {method} (preset {preset}, seeds {','.join(map(str, sorted(seeds)))}, "
             f"{n} samples)", "", "SMOKE-SCALE EXAMPLE: not results." if preset == "smoke" else "", "",
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
    fig.savefig(os.path.join(results, f"shift-{method}.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(results, f"shift-{method}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))


# --- main ---

def _list(choices, what):
    def parse(s):
        items = list(choices) if s == "all" else s.split(",")
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{s!r}: give 'all' or a comma-separated list of {', '.join(choices)}")
        return items
    parse.__name__ = what
    return parse


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0],
                      epilog="Arguments after `--` go to every run, e.g. `-- --iters 2000 --eval-samples 10000`.")
    p.add_argument("--method", type=_list(METHODS, "method"), required=True,
                   help="distiller(s): pd, lcm, dmd2, a comma-separated list, or all")
    p.add_argument("--study", type=_list(STUDIES, "study"), required=True,
                   help="grid(s): priors, threshold, paper, a comma-separated list, or all")
    p.add_argument("--preset", choices=("auto",) + PRESETS, default="auto",
                   help="preset of every run (auto: cifar10 with CUDA, else smoke)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    p.add_argument("--runs", default=os.path.join("runs", "ablate"),
                   help="where runs train (checkpoints; not committed)")
    p.add_argument("--results", default="ablations",
                   help="where tables, plots and the per-run records (records/<run>/) go")
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
    if any(a.split("=")[0] in ("--out", "--seed", "--preset") for a in extra):
        p.error("arguments after `--` may not set --out, --seed or --preset (ablate.py sets them)")
    return args, extra


def main(argv=None):
    args, extra = parse_args(argv)
    runs, tables = plan(args.method, args.study, args.preset, args.seeds, extra)
    if any(run.teacher is None for run in runs):
        if args.dry_run:
            print("the grid's teacher (--teacher auto) is not trained yet: it is trained first; run names below "
                  "will change once it exists")
        else:
            train_teacher(next(run for run in runs if run.teacher is None))
            runs, tables = plan(args.method, args.study, args.preset, args.seeds, extra)
    todo = [run for run in runs if not is_done(run, args.results)]
    print(f"grid: {len(runs)} runs ({len(runs) - len(todo)} done, {len(todo)} to run)", flush=True)
    for run in runs:
        if args.dry_run:
            print(f"{'done' if run not in todo else 'todo'}  {run.name}  {' '.join(run.settings)}  "
                  f"{' '.join(run.argv)}")
    if args.dry_run:
        return None
    for run in todo:
        execute(run, args.runs, args.results)
    for (study, method), rows in tables.items():
        results = {setting: {s: read_record(run, args.results) for s, run in by_seed.items()} for setting, by_seed in rows}
        ref = reference(study, method)
        summary, cols = summarise(results, ref)
        configs = [run.config for _, by_seed in rows for run in by_seed.values()]
        write_outputs(summary, cols, study, method, args.preset, ref, args.seeds, configs, args.results)
        if study == "paper" and args.shift_samples:
            write_shift(method, args.preset, rows, args.runs, args.results, args.shift_samples, args.device)
    return runs


if __name__ == "__main__":
    common.run_main(main)
