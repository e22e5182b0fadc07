"""The tables of an ablation grid, from its per-run records alone: paired statistics (Holm-adjusted),
the table, CSV and bar plot of each study, the covariate-shift diagnostic and the learning curves.
ablate.py runs the grids and calls these; nothing here trains or reads a checkpoint. The record of a
run is <results>/records/<run>/: config.json, metrics.json, log.jsonl, ablate.json (identity, command,
wall time, CPU time) and, for the paper studies, shift<n>.json."""

import csv
import json
import math
import os

import numpy as np

import common
import runs

# Metric prefixes in table order; eval.py names keys <prefix><samples>_<reference>[_k<k>], e.g. fid10k_train.
METRICS = ("fid", "class_score", "class_acc", "lpips_div", "precision", "recall", "density", "coverage",
           "nll", "class_post", "mode_tv", "fd_px", "fd_px_mean", "fd_px_struct", "fd_px_iso", "teacher_mse",
           "unpaired_mse", "teacher_lpips")
DELTA_METRICS = ("fid", "class_score", "lpips_div", "nll", "class_post", "mode_tv", "fd_px", "fd_px_struct",
                 "teacher_mse", "teacher_lpips")
# Settings a table's header names as held fixed (when equal across its rows), in this order.
HEADLINE = ("dataset", "data_dir", "iters", "batch_size", "lr", "guidance", "steps", "eval_samples", "buffer_size",
            "buffer_refresh", "rollout_chunk", "max_age", "prior_warmup", "expert_prob", "teacher_rollout_steps",
            "sample_clip", "threshold_mode")


# --- Reading a record ---

def read_record(run, results):
    """{full metric key: value} of the evaluation with the run's own --eval-samples, its drift list
    (key 'drift'), the share of its sampler's x̂_0 pixels outside [-1, 1] per step (key 'x0_oor', where
    evaluated), the training log's mean out-of-range shares of the teacher's and the student's x̂_0 (key
    'train_oor': [teacher %, student %], where logged), its wall time in minutes and, where recorded, its
    CPU time in minutes (key 'cpu_min')."""
    rec = run.record(results)
    m = runs.read_json(os.path.join(rec, "metrics.json"))
    n = run.config["eval_samples"]
    keys = m.get("evals", {}).get(str(n), {}).get("metrics", [])
    row = {k: m[k] for k in keys if isinstance(m.get(k), (int, float))}
    drift = [k for k in keys if k.startswith("drift") and isinstance(m.get(k), list)]
    if drift:
        row["drift"] = m[drift[0]]
    oor = [k for k in keys if k.startswith("x0_oor") and isinstance(m.get(k), list)]
    if oor:
        row["x0_oor"] = m[oor[0]]
    logged = [r for r in runs.read_log(os.path.join(rec, "log.jsonl")) if "clip_pct" in r and "clip_student_pct" in r]
    if logged:
        row["train_oor"] = [float(np.mean([r[k] for r in logged])) for k in ("clip_pct", "clip_student_pct")]
    timing = runs.read_json(os.path.join(rec, "ablate.json"), "wall_s")
    row["wall_min"] = timing["wall_s"] / 60
    if timing.get("cpu_s") is not None:                 # records made before CPU time was counted have none
        row["cpu_min"] = timing["cpu_s"] / 60
    return row


def read_init_sha(run, results):
    """The hash of the UNet the run started from (runs.weights_sha), None in records made before it was kept."""
    return runs.read_json(os.path.join(run.record(results), "ablate.json"), "wall_s").get("init_sha")


def init_line(inits):
    """The table header's sentence on the UNet every run started from. inits: {setting: {seed: sha or None}}."""
    shas = {sha for by_seed in inits.values() for sha in by_seed.values()}
    if shas == {None}:
        return ("The UNet the runs start from (--init, or the UNet teacher) is named by its path and training "
                "settings only: these records predate its weights' hash, so whether every run started from the "
                "same weights cannot be checked from them.")
    if len(shas) == 1:
        return f"Every run started from the same UNet (--init, or the UNet teacher): EMA weights sha256 {shas.pop()}."
    per_row = "; ".join(f"{setting}: " + ", ".join(
        f"{sha or 'not recorded'} (seeds {','.join(str(s) for s in sorted(by_seed) if by_seed[s] == sha)})"
        for sha in dict.fromkeys(by_seed.values())) for setting, by_seed in inits.items())
    return ("**Not every run started from the same UNet** (--init, or the UNet teacher; EMA weights sha256 per "
            f"row: {per_row}): rows may differ in more than the settings named here.")


# --- Statistics ---

def paired_p(values, ref_values):
    """Two-sided p-value of the paired t-test of values[s] - ref_values[s] over the seeds both have (nan
    with fewer than two seeds; 0 or 1 when every difference is the same)."""
    from scipy import stats
    seeds = sorted(set(values) & set(ref_values))
    d = np.array([values[s] - ref_values[s] for s in seeds], dtype=np.float64)
    if len(d) < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    return float(2 * stats.t.sf(abs(d.mean()) / (sd / math.sqrt(len(d))), len(d) - 1))


def holm(p):
    """Holm's step-down adjustment of the p-values p (a list; nan left out of the family and kept nan):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). Controls the family-wise
    error rate over every comparison of a table, with no assumption on their dependence."""
    idx = sorted((i for i, v in enumerate(p) if not math.isnan(v)), key=lambda i: p[i])
    out, running = list(p), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * p[i]))
        out[i] = running
    return out


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


# A run's times (read_record): table columns beside the metrics, never compared or plotted as results.
TIMES = ("wall_min", "cpu_min")


def split_key(key):
    """'fid10k_train' -> ('fid', '10k', '_train'); None for a key that is no table metric (METRICS order)."""
    for p in METRICS:
        rest = key[len(p):]
        if key.startswith(p) and rest[:1].isdigit():
            count = rest.split("_")[0]
            return p, count, rest[len(count):]
    return None


def columns(results):
    """{column: full metric key} over every run of a table, a column being a metric and its reference
    without the sample count ('teacher_mse_exact256'), in METRICS order. The same column under two counts
    (rows evaluated with different sample counts) is an error, never a mixed column."""
    found = {}
    for by_seed in results.values():
        for row in by_seed.values():
            for key in row:
                parts = split_key(key)
                if parts:
                    found.setdefault(parts[0] + parts[2], set()).add(key)
    mixed = [sorted(k) for k in found.values() if len(k) > 1]
    if mixed:
        raise common.UserError("rows of one table were evaluated differently: " + "; ".join(" vs ".join(k) for k in mixed)
                               + " (FID and friends are never compared across sample counts)")
    order = {p: i for i, p in enumerate(METRICS)}
    return {c: found[c].pop() for c in sorted(found, key=lambda c: (order[split_key(next(iter(found[c])))[0]], c))}


def summarise(results, ref):
    """results: {setting: {seed: {key: value}}} -> (rows of mean/std and paired deltas to `ref`, the
    {column: key} columns)."""
    cols = columns(results)
    rows = []
    for setting, by_seed in results.items():
        row = {"setting": setting, "seeds": ",".join(str(s) for s in sorted(by_seed))}
        for c in list(cols) + list(TIMES):
            key = cols.get(c, c)
            vals = [r[key] for r in by_seed.values() if key in r]
            if vals and (c != "cpu_min" or len(vals) == len(by_seed)):    # a CPU time of some seeds only: none
                row[c] = float(np.mean(vals))
                row[c + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        drifts = [r["drift"] for r in by_seed.values() if "drift" in r]
        if drifts and len({len(d) for d in drifts}) == 1:
            row["drift"] = np.mean(drifts, axis=0).tolist()
        for k in ("x0_oor", "train_oor"):                  # shown only where every seed has them (else named)
            lists = [r[k] for r in by_seed.values() if k in r]
            if lists and len(lists) == len(by_seed) and len({len(v) for v in lists}) == 1:
                row[k] = np.mean(lists, axis=0).tolist()
        for c, key in cols.items():
            if setting != ref and ref in results and split_key(key)[0] in DELTA_METRICS:
                x = {s: r[key] for s, r in by_seed.items() if key in r}
                y = {s: r[key] for s, r in results[ref].items() if key in r}
                if x and y:
                    mean, lo, hi, n = paired_delta(x, y)
                    row[f"d_{c}"], row[f"d_{c}_lo"], row[f"d_{c}_hi"] = mean, lo, hi
                    row[f"d_{c}_p"] = paired_p(x, y)
        rows.append(row)
    cells = [(r, k) for r in rows for k in list(r) if k.endswith("_p") and k.startswith("d_")]
    for (r, k), adjusted in zip(cells, holm([r[k] for r, k in cells])):   # the family: every Δ of the table
        r[k + "_holm"] = adjusted
    return rows, cols


def check_complete(results, rows, study, method, records):
    """Every run of a table has every metric the table shows: a record that lacks one (an evaluation
    cut short, an edited file) is an error, never a silently smaller sample of seeds."""
    cols = columns(results)
    for setting, by_seed in rows:
        for seed, run in by_seed.items():
            lacking = [k for k in cols.values() if k not in results[setting][seed]]
            if lacking:
                raise common.UserError(
                    f"{os.path.join(run.record(records), 'metrics.json')} lacks {', '.join(lacking[:3])}"
                    f"{' ...' if len(lacking) > 3 else ''}, which other runs of the {study}-{method} table have; "
                    "delete that record and rerun the grid to redo the run")


def held_fixed(configs):
    """(settings equal across every row's resolved config, as 'k=v' for HEADLINE keys, and the keys that
    vary) of a table's runs."""
    keys = set().union(*(c.keys() for c in configs))
    varied = sorted(k for k in keys if k != "seed" and len({json.dumps(c.get(k), default=str) for c in configs}) > 1)
    fixed = [f"{k}={runs.compact(configs[0][k])}" for k in HEADLINE
             if k in keys and k not in varied and configs[0].get(k) is not None]
    return fixed, varied


# --- Writing the table, CSV and plot ---

def write_outputs(rows, cols, *, study, method, preset, ref, seeds, configs, out_dir, adjusted=True, note=None,
                  inits=None):
    """<study>-<method>.md/.csv/.png from summarise's (rows, cols): `ref` the reference row, `seeds` and
    `configs` (every run's resolved config) for the header, `inits` (read_init_sha per setting and seed) for
    its sentence on the UNet the runs started from. adjusted: Holm-adjusted p-values and the
    out-of-range section (False: the form the first benchmark's tables were published in). note: a last
    paragraph (which rows a table in progress lacks)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{study}-{method}")
    metrics = [c for c in list(cols) + list(TIMES) if any(c in r for r in rows)]
    deltas = [c for c in cols if any(f"d_{c}" in r for r in rows)]
    with open(stem + ".csv", "w", newline="") as f:
        keys = ["setting", "seeds"] + [k for m in metrics for k in (m, m + "_std")] + \
               [k for m in deltas for k in (f"d_{m}", f"d_{m}_lo", f"d_{m}_hi")
                + ((f"d_{m}_p", f"d_{m}_p_holm") if adjusted else ())]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writerow({k: cols.get(k, k) for k in keys})          # header: the full metric keys
        w.writerows(rows)
    fixed, varied = held_fixed(configs)
    scale = {"smoke": "SMOKE-SCALE EXAMPLE (tiny UNet, synthetic data, minutes of CPU): not results.",
             "gmm": "The exact benchmark (gmm.py): a Gaussian-mixture data set with closed-form metrics; "
                    "`_exact` metrics are exact for the samples scored (see gmm.py for how to read each).",
             "gmm2": "The second exact benchmark (gmm.py, mixture gmm2: saturated pixels, per-component subspaces); "
                     "`_exact` metrics are exact for the samples scored (see gmm.py for how to read each)."
             }.get(preset, "")
    n_seeds = len(seeds)
    lines = [f"# Ablation `{study}` — {method} (preset {preset}, seeds {','.join(map(str, seeds))})", "",
             scale, "",
             f"Held fixed across rows: {', '.join(fixed)}. Varied: {', '.join(varied) or 'nothing'} "
             "(from the runs' resolved configs)." + (" " + init_line(inits) if adjusted and inits else ""), "",
             ("One seed: values, no spread. " if n_seeds == 1 else "Mean ± std over seeds. ")
             + f"Δ columns: paired difference to `{ref}` per seed, averaged, with a 95 % t-interval over seeds; "
             + ("then the paired t-test's p-value, raw / Holm-adjusted over every Δ of this table; * marks a "
                "Holm-adjusted p < 0.05 (read the adjusted one: a table makes dozens of comparisons). "
                if adjusted else "* marks an interval that excludes zero. ")
             + "Columns are full metric keys (sample count and reference)."
             + (" wall_min: the run's wall-clock minutes, which other work on the machine inflates (not a speed "
                "measurement); cpu_min, where every seed recorded it: the CPU minutes of the run's process."
                if adjusted or "cpu_min" in metrics else ""), "",
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
            if adjusted:
                p, p_holm = r[f"d_{m}_p"], r[f"d_{m}_p_holm"]
                star = "*" if p_holm < 0.05 else ""
                cells.append(f"{d:+.3g}{star}" + ("" if math.isnan(lo) else f" [{lo:+.3g}, {hi:+.3g}] "
                                                                          f"p {p:.2g} / {p_holm:.2g}"))
                continue
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
    oor_rows = [r for r in rows if "x0_oor" in r and "train_oor" in r]
    if adjusted and oor_rows:               # where thresholding has something to act on
        K = max(len(r["x0_oor"]) for r in oor_rows)
        blank = lambda r: " |" * (K - len(r["x0_oor"]))             # a row with fewer steps: empty cells
        lines += ["", "Out-of-range x̂_0, % of pixels outside [-1, 1], mean over seeds: in training (the log's mean "
                  "over logged steps, before any clipping: `clip_pct` for the teacher's x̂_0, `clip_student_pct` for "
                  "the student's, DMD2's generator output), and at sampling, per step of the student's sampler "
                  "(metrics.json `x0_oor`, after its own sampling clip, if any).", "",
                  "| setting | training: teacher | training: student | " + " | ".join(f"sampling step {k + 1}" for k in range(K))
                  + " |", "|---|---|---|" + "---|" * K]
        lines += [f"| {r['setting']} | {r['train_oor'][0]:.3g} | {r['train_oor'][1]:.3g} | "
                  + " | ".join(f"{100 * v:.3g}" for v in r["x0_oor"]) + blank(r) + " |" for r in oor_rows]
        lacking = [r["setting"] for r in rows if r not in oor_rows]
        if lacking:
            lines += ["", f"Not shown: {', '.join(lacking)} (a seed's record lacks x0_oor or a training log with "
                          "clip rates)."]
    if note:
        lines += ["", note]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_bars(rows, [m for m in metrics if m not in TIMES], cols, stem + ".png", f"{study} — {method} ({preset})")
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

def read_shift(run, results, n):
    """A run's covariate-shift curves from its record (shift<n>.json), None where it has none."""
    path = os.path.join(run.record(results), f"shift{n}.json")
    return runs.read_json(path) if os.path.isfile(path) else None


def write_shift(method, preset, rows, results, n, name=None, shift=None):
    """The covariate-shift table and plot of a paper study (<name>.md/.png, default shift-<method>) from
    its baseline and ddil rows' curves: shift(run) gives a run's (None where it has none; default: its
    record's shift<n>.json)."""
    name = name or f"shift-{method}"
    shift = shift or (lambda run: read_shift(run, results, n))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves, seeds = {}, set()
    for setting, by_seed in [(s, b) for s, b in rows if s in ("baseline", "ddil")]:   # baseline and +DDIL students
        per_seed = {s: shift(run) for s, run in by_seed.items()}
        missing = [s for s, v in per_seed.items() if v is None]
        if missing:
            print(f"{name}: {setting} seeds {missing} have neither a shift record nor a checkpoint; skipped")
            return
        seeds |= set(per_seed)
        curves[setting] = np.array([[v["forward"], v["own"]] for v in per_seed.values()]).mean(0)   # [2, K]
    if not curves:                                      # --only without baseline and ddil: nothing to compare
        return
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
    fig.savefig(os.path.join(results, f"{name}.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))


# --- Learning curves: the budgets ---

CURVE_METRICS = ("fd_px", "fd_px_struct", "teacher_mse", "unpaired_mse", "nll", "mode_tv", "class_post")


def curve_budget(steps, fd, gain=0.05):
    """(budget, reason): the first evaluated iteration count s whose doubling 2 s improves fd_px by less than
    `gain` (relative), else the largest evaluated count."""
    for s in steps:
        if 2 * s in fd and (fd[s] - fd[2 * s]) < gain * fd[s]:
            change = 100 * (fd[s] - fd[2 * s]) / fd[s]
            return s, (f"fd_px improves by {change:.1f} %" if change >= 0 else f"fd_px gets worse by {-change:.1f} %") \
                + f" from {s} to {2 * s} iterations"
    return max(steps), f"fd_px still improved by {gain:.0%} or more at every doubling: the largest evaluated count"


def write_curves(method, preset, rows, out_dir, final_only=False):
    """curves-<method>.md/.png: each setting's metrics at every evaluation of its runs (mean over seeds), the
    rows of one setting joined into one curve. final_only (ablate.py --budgets: a run per count): only each
    run's evaluation at its last iteration, never a mid-run one (the learning rate had not annealed yet)."""
    lines = [f"# Learning curves — {method} (preset {preset})", "",
             "Metrics at every evaluation of each row's runs (metrics.json history), mean over seeds. The budget: "
             "the first iteration count where one more doubling improves fd_px by less than 5 %, else the largest "
             "evaluated. (Mid-run points of one run stand for shorter runs only where the learning rate is constant "
             "after its warm-up, as in LCM and DMD2; PD anneals within each round, so its curve needs a run per "
             "budget: ablate.py --budgets.)", ""]
    per_steps, seeds = {}, {}                       # rows of one setting (one per --budgets count) share a curve
    for setting, by_seed in rows:
        per_step = per_steps.setdefault(setting, {})
        seeds.setdefault(setting, set()).update(by_seed)
        for seed, run in by_seed.items():
            for entry in runs.read_json(os.path.join(run.record(out_dir), "metrics.json")).get("history", []):
                if final_only and entry.get("step") != run.config["iters"]:
                    continue
                for key, value in entry.items():
                    parts = split_key(key)
                    if parts and parts[0] in CURVE_METRICS and isinstance(value, (int, float)) and entry.get("step"):
                        per_step.setdefault(entry["step"], {}).setdefault(parts[0], []).append(value)
    curves = {}
    for setting, per_step in per_steps.items():
        curve = {s: {m: float(np.mean(v)) for m, v in per_step[s].items()} for s in sorted(per_step)}
        curves[setting] = curve
        present = [m for m in CURVE_METRICS if any(m in c for c in curve.values())]
        lines += [f"## {setting} (seeds {','.join(str(s) for s in sorted(seeds[setting]))})", "",
                  "| iterations | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
        lines += [f"| {s} | " + " | ".join(f"{c[m]:.4g}" if m in c else "" for m in present) + " |"
                  for s, c in curve.items()]
        fd = {s: c["fd_px"] for s, c in curve.items() if "fd_px" in c}
        if fd:
            budget, why = curve_budget(sorted(fd), fd)
            lines += ["", f"Budget: **{budget} iterations** ({why}).", ""]
    stem = os.path.join(out_dir, f"curves-{method}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric in zip(axes, ("fd_px", "teacher_mse")):
        for setting, curve in curves.items():
            pts = [(s, c[metric]) for s, c in curve.items() if metric in c]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=setting)
        ax.set_xscale("log", base=2), ax.set_xlabel("iterations"), ax.set_title(metric, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"learning curves — {method} ({preset})", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)
    print("\n".join(lines[6:]))
    print(f"wrote {stem}.md, .png")
