"""Evaluating a generator (DESIGN §6): draw its samples (seed i, label i mod 10), score them with
metrics.py, pair them with the teacher (agreement, per-step drift), measure the covariate shift of a
student, and merge the results into metrics.json. A generator is what every model hands in, teacher
or student: `generate(noise, labels, renoise) -> x̂_0`, and for students `make_student(ckpt, device)
-> (x0_fn, times, stochastic)`; nothing here imports a method file.

metrics.json keeps the latest value of every metric key at the top level (another sample count adds
keys), `evals[N]` (step, seeds, sampler, reference, classifier, timing of the latest evaluation with
N samples) and `history` (one entry per evaluation, for --eval-every curves).
"""

import math
import os
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

import common
import gmm
import runs
from metrics import (cache_dir, check_finite, class_metrics, default_device, distribution_metrics, even_spread,
                     file_sha, inception_features, load_classifier, load_lpips, lpips_diversity, LPIPS_SIZE,
                     MEMO, metric_name, reference, to_uint8)

DRIFT_SAMPLES = 1000                             # samples of the drift metric (a teacher solve per step)


# Sample count of a run whose config asks for none (a teacher trains without evaluating itself): eval.py
# then scores it at the count its students evaluate at (their presets' --eval-samples; a test keeps them equal).
DEFAULT_SAMPLES = {"smoke": 100, "cifar10": 10_000, "gmm": 1000, "gmm2": 1000, "quick": 200}
REF_LIMIT = {"smoke": 200}                       # FID reference subset per preset (absent: the whole set)


REF_STEPS = 64                                   # teacher DDIM steps of the agreement reference
PRESET_REF_STEPS = {"smoke": 16}                 # smoke: a pipeline check, a quarter of the cost


# --- Evaluating a generator, a run, a folder of images ---

@torch.no_grad()
def generate_samples(generate, n, device, batch_size=None, amp=nullcontext, progress=True, label="samples"):
    """Sample i from seed i with label i mod 10, whatever the batch size. generate(noise, labels,
    renoise) -> x̂_0 [B, 3, 32, 32] in about [-1, 1]. Returns uint8 [n, 3, 32, 32] and labels [n] (CPU).
    A non-finite sample is a one-line error naming `label` (to_uint8 would map NaN to a finite 0)."""
    batch_size = batch_size or (500 if torch.device(device).type == "cuda" else 50)
    images, labels = [], []
    for i in runs.progress(range(0, n, batch_size), f"generate {n} samples (batches)", progress):
        noise, y, renoise = common.seeded_batch(range(i, min(n, i + batch_size)), device)
        with amp():
            x = generate(noise, y, renoise)
        images.append(to_uint8(check_finite(x, label).float().cpu()))
        labels.append(y.cpu())
    return torch.cat(images), torch.cat(labels)


def training_set(dataset, data_dir):
    """The run's training images uint8 [N, 3, 32, 32] and labels, loaded once per process."""
    key = ("data", dataset, data_dir)
    if key not in MEMO:
        MEMO[key] = runs.load_images(dataset, data_dir)
    return MEMO[key]


def score_samples(images, labels, train, ref_limit, classifier_arch, device, lpips_backbone=None, progress=True):
    """Every metric of uint8 samples [N, 3, 32, 32] conditioned on labels [N], against the training set
    train = (images, labels). Returns (metrics, info)."""
    n, times = len(images), {}
    t = time.time()
    idx = even_spread(len(train[0]), ref_limit or len(train[0]))
    ref = reference(train[0][idx], "train", full=len(idx) == len(train[0]), device=device, progress=progress)
    times["reference_s"], t = time.time() - t, time.time()
    feats = inception_features(images, device, progress=progress)
    times["inception_s"], t = time.time() - t, time.time()
    metrics = distribution_metrics(feats, ref, device)
    times["fid_prdc_s"], t = time.time() - t, time.time()
    classifier = load_classifier(*train, classifier_arch, device, progress)
    score, acc = class_metrics(classifier, images, labels, device)
    metrics[metric_name("class_score", n, "train")], metrics[metric_name("class_acc", n, "train")] = score, acc
    times["classifier_s"], t = time.time() - t, time.time()
    lpips_fn, why = optional_lpips(lpips_backbone, device)
    skipped = {metric_name("lpips_div", n): why} if why else {}
    if lpips_fn is not None:
        metrics[metric_name("lpips_div", n)] = lpips_diversity(lpips_fn, images, labels)
    times["lpips_s"] = time.time() - t
    info = dict(reference=dict(name=ref["name"], n=ref["n"], cache=ref["key"]), classifier=classifier[1],
                lpips=dict(net="alex", size=LPIPS_SIZE), time_s=times, skipped=skipped)
    return metrics, info


def score_exact(images, labels, device, lpips_backbone=None, mixture="gmm"):
    """The exact benchmark's metrics (gmm.py: nll, class_post, mode_tv, fd_px, named {N}_exact) of uint8
    samples against the mixture itself, and LPIPS diversity. Returns (metrics, info)."""
    n, t = len(images), time.time()
    exact = gmm.mixture(mixture).metrics(to_uint8(images).double() / 127.5 - 1, labels)
    metrics = {metric_name(k, n, "exact"): v for k, v in exact.items()}
    times = dict(exact_s=time.time() - t)
    t = time.time()
    lpips_fn, why = optional_lpips(lpips_backbone, device)
    if lpips_fn is not None:
        metrics[metric_name("lpips_div", n)] = lpips_diversity(lpips_fn, images, labels)
    times["lpips_s"] = time.time() - t
    info = dict(reference=dict(name="exact", mixture="gmm.py seed 0" if mixture == "gmm" else f"gmm.py {mixture}"), time_s=times,
                skipped={metric_name("lpips_div", n): why} if why else {})
    return metrics, info


def exact_ddim(dataset, steps, guidance=1.0, device="cpu"):
    """The exact teacher's DDIM sampler on a mixture data set, `steps` uniform steps, on `device`: (x0_fn, times)
    for common.sample. eval.py's reference rows and `exact_context` use it."""
    exact = gmm.ExactTeacher(dataset, gmm.mixture(dataset, device))
    return (lambda z, t, y: common.denoise(exact, z, t, y, guidance)), torch.linspace(1, 0, steps + 1).tolist()


CONTEXT_METRICS = ("nll", "class_post", "mode_tv", "fd_px", "fd_px_struct")


def exact_context(dataset, steps, n, guidance=1.0):
    """The two rows a student on a mixture data set is read against, scored like it (n samples, label i mod
    10): exact samples (`python gmm.py --mixture D --samples n`: each metric's floor) and the exact teacher's
    own DDIM with the student's step count (`python eval.py --teacher exact --dataset D --steps K`, seeds
    0..n-1). {row: exact metrics}, computed once on the CPU (seconds: the closed form) and cached."""
    device = "cpu"
    path = os.path.join(cache_dir(), f"exact-context-{dataset}-ddim{steps}-w{guidance:g}-n{n}-"
                                     f"{runs.code_sha(gmm, common)}.json")      # the mixture, its metrics, DDIM
    if os.path.isfile(path):
        return runs.read_json(path)
    mix, labels = gmm.mixture(dataset), torch.arange(n) % gmm.NUM_CLASSES
    floor = gmm.levels(mix.sample(labels, torch.Generator().manual_seed(0))).to(torch.uint8)   # as `gmm.py` scores it
    x0_fn, times = exact_ddim(dataset, steps, guidance)
    ddim, ddim_labels = generate_samples(lambda noise, y, renoise=None: common.sample(x0_fn, noise, y, times), n,
                                         device, progress=False)
    rows = {"exact samples (the floor)": score_exact(floor, labels, device, mixture=dataset)[0],
            f"exact teacher, DDIM {steps}" + (f", w {guidance:g}" if guidance != 1 else ""):
                score_exact(ddim, ddim_labels, device, mixture=dataset)[0]}
    rows = {row: {k: v for k, v in m.items() if not k.startswith("lpips")} for row, m in rows.items()}
    runs.write_json(path, rows, indent=2, default=None)     # two runs of a grid may fill it at once: each writes whole
    return rows


def print_exact_context(cfg, metrics, n):
    """After a student's evaluation on a mixture data set: its exact metrics beside the floor and the exact
    teacher's DDIM at the same step count, the two rows that say what its numbers mean."""
    rows = exact_context(cfg["dataset"], cfg["steps"], n, cfg.get("guidance", 1.0))
    rows[f"this run ({cfg['steps']} steps)"] = metrics
    names = [metric_name(k, n, "exact") for k in CONTEXT_METRICS]
    width = max(map(len, rows)) + 2
    print(f"the run beside the exact benchmark's references ({cfg['dataset']}, N = {n}, labels i mod 10; "
          f"class_post: higher is better, nll: nearest the floor, the others: lower):")
    print(" " * width + "".join(f"{k:>14}" for k in CONTEXT_METRICS))
    for row, m in rows.items():
        print(f"{row:<{width}}" + "".join(f"{m[k]:>14.4g}" if k in m else f"{'-':>14}" for k in names))


# --- Teacher agreement and per-step drift: paired against the teacher on the same noise ---

def reference_grid(ref_steps):
    """The teacher's reference DDIM grid [1, 1 - 1/R, ..., 0] (R = ref_steps)."""
    return common.fine_grid(1.0, 0.0, ref_steps)


def grid_tail(grid, t):
    """The reference grid continued from time t: [t] + its points below t (exactly its own tail when t is
    one of its points, so the teacher's own sampler lands where the reference does)."""
    return [t] + [g for g in grid if g < t - 1e-9]


def tally_out_of_range(x0_fn, times):
    """(x0_fn wrapped, counts [K]): every call of the wrapped x0_fn at grid time times[k] adds to counts[k] the
    number of examples' worth of x̂_0 pixels outside [-1, 1] (its share times the batch size); divide by the
    sample count for the per-step share (x0_oor)."""
    counts = [0.0] * (len(times) - 1)

    def tallied(z, t, y):
        x0 = x0_fn(z, t, y)
        counts[times.index(t)] += float(common.out_of_range(x0)) * len(z)
        return x0
    return tallied, counts


@torch.no_grad()
def paired_trajectories(student, teacher_fn, n, n_drift, device, grid, batch_size=None, amp=nullcontext):
    """For seeds 0..n-1 (labels i mod 10): the student's samples [n, 3, 32, 32], and, for the first n_drift
    seeds, where the teacher's flow on `grid` lands from the student's state after each of its first K - 1
    steps [K - 1, n_drift, 3, 32, 32] (float, CPU), and the share of the sampler's x̂_0 pixels outside
    [-1, 1] at each of its K steps (after its own sampling-time clipping, if any). Same noise and loop as
    generate_samples."""
    x0_fn, times, stochastic = student
    batch_size = batch_size or 500           # long solves: large batches, CPU too
    samples, lands = [], []
    x0_fn, outside = tally_out_of_range(x0_fn, times)
    for i in runs.progress(range(0, n, batch_size), "paired student / teacher trajectories (batches)"):
        noise, y, renoise = common.seeded_batch(range(i, min(n, i + batch_size)), device)
        states = []

        def recording(z, t, y):                  # z_k: the state entering step k + 1 (k = 0: the noise)
            states.append(z)
            return x0_fn(z, t, y)
        with amp():
            samples.append(check_finite(common.sample(recording, noise, y, times, renoise if stochastic else None),
                                        "student").float().cpu())
            m = max(0, min(n_drift, i + batch_size) - i)
            if m:
                lands.append(torch.stack([common.sample(teacher_fn, z[:m], y[:m], grid_tail(grid, float(t))).float().cpu()
                                          for z, t in zip(states[1:], times[1:-1])]))
    K = len(times) - 1
    return torch.cat(samples), (torch.cat(lands, dim=1) if lands else torch.zeros(K - 1, 0, 3, 32, 32)), \
        [v / n for v in outside]


@torch.no_grad()
def teacher_samples(teacher_fn, n, device, ref_steps=REF_STEPS, cache_key=None, batch_size=None, amp=nullcontext,
                    grid=None, ref_name=None):
    """The teacher's ref_steps-step DDIM samples (or on `grid`, named ref_name) of seeds 0..n-1 (labels i mod
    10), float [n, 3, 32, 32]: computed once per (teacher, guidance, grid, n) and cached when cache_key is
    given (every run of a grid shares them)."""
    ref_name = ref_name or f"ddim{ref_steps}"
    path = cache_key and os.path.join(cache_dir(), f"teacher-samples-{cache_key}-{ref_name}-n{n}.pt")
    if path and os.path.isfile(path):
        return torch.load(path, weights_only=True).float()
    times = grid or reference_grid(ref_steps)
    batch_size = batch_size or 500           # long solves: large batches, CPU too
    out = []
    for i in runs.progress(range(0, n, batch_size), f"teacher {ref_name} reference samples (batches)"):
        noise, y, _ = common.seeded_batch(range(i, min(n, i + batch_size)), device)
        with amp():
            out.append(common.sample(teacher_fn, noise, y, times).float().cpu())
    x = check_finite(torch.cat(out), f"teacher {ref_name}")
    if path:  # full precision: the run that fills the cache and the runs that read it see the same values
        torch.save(x, f"{path}.{os.getpid()}.tmp")
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return x


def teacher_agreement(student, teacher_fn, n, device, lpips_fn, ref_steps=REF_STEPS, cache_key=None,
                      batch_size=None, amp=nullcontext, *, grid=None, ref_name=None, drift=True, samples=None):
    """Paired agreement of a student (x0_fn, times, stochastic) with the teacher on the same noise.
    Returns (metrics, per-sample arrays): teacher_mse / teacher_lpips{N}_{ref} (on the uint8-quantised
    samples, like every other metric), their standard errors, and drift{N'}_{ref} (a list over the K
    steps, N' = min(N, DRIFT_SAMPLES); module docstring). The reference is the teacher's DDIM on
    ref_steps uniform steps (ref ddim{R}) or on `grid` (named ref_name). lpips_fn None: no teacher_lpips.
    samples: the student's samples of seeds 0..n-1 when already drawn (reused unless drift needs its states)."""
    grid, ref_name = grid or reference_grid(ref_steps), ref_name or f"ddim{ref_steps}"
    n_drift = min(n, DRIFT_SAMPLES) if drift else 0
    if samples is None or drift:
        samples, lands, oor = paired_trajectories(student, teacher_fn, n, n_drift, device, grid, batch_size, amp)
    ref = teacher_samples(teacher_fn, n, device, ref_steps, cache_key, batch_size, amp, grid, ref_name)
    q = lambda x: to_uint8(x).float() / 127.5 - 1
    s, t = q(samples), q(ref)
    mse = (s - t).square().mean(dim=(1, 2, 3)).double().numpy()
    se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    # Its ceiling: the same MSE with the pairing broken, sample i against the teacher's sample i + 10 (the same
    # class, other noise; the last 10 have no partner): what a student whose samples carry no information
    # about their noise scores.
    metrics = {metric_name("teacher_mse", n, ref_name): float(mse.mean()),
               metric_name("teacher_mse_se", n, ref_name): se(mse)}
    if n > common.NUM_CLASSES:
        unpaired = (s[:-common.NUM_CLASSES] - t[common.NUM_CLASSES:]).square().mean(dim=(1, 2, 3))
        metrics[metric_name("unpaired_mse", n, ref_name)] = float(unpaired.double().mean())
    arrays = dict(mse=mse)
    if lpips_fn is not None:
        lp = torch.cat([lpips_fn(s[i:i + 50], t[i:i + 50]).cpu() for i in range(0, n, 50)]).double().numpy()
        metrics[metric_name("teacher_lpips", n, ref_name)] = float(lp.mean())
        metrics[metric_name("teacher_lpips_se", n, ref_name)] = se(lp)
        arrays["lpips"] = lp
    if drift:
        gaps = [(q(land) - t[:n_drift]).square().mean() for land in lands] + [(s - t)[:n_drift].square().mean()]
        metrics[metric_name("drift", n_drift, ref_name)] = [float(g) for g in gaps]
        metrics[metric_name("x0_oor", n)] = oor           # the student's own: the same under every reference
    return metrics, arrays


def optional_lpips(backbone, device):
    """(LPIPS callable, None), or (None, why) where its weights cannot be had (offline with no backbone file):
    LPIPS is an optional metric and never fails a finished run."""
    try:
        return load_lpips(backbone, device), None
    except common.UserError as e:
        return None, f"{e}"


def sample_count(cfg, n_samples=None):
    """The evaluation's sample count: as asked, else the run's --eval-samples, else its preset's default."""
    return n_samples or cfg.get("eval_samples") or DEFAULT_SAMPLES.get(cfg.get("preset"), 10_000)


def evaluate_generator(generate, ckpt, out_path, sampler, n_samples=None, device=None, ref_limit=None,
                       classifier=None, lpips_backbone=None, batch_size=None, progress=True, label=None,
                       agreement=None, ref_steps=None, extra=None):
    """Draw n samples (seed i, label i mod 10), score them against the training set of the checkpoint's
    config, merge the metrics into out_path and print one line. ref_limit None: the preset's; 0: all.
    agreement: dict(student=(x0_fn, times, stochastic), refs=[dict(teacher_fn=, cache_key=, and optionally
    grid=, ref_name=, drift=, lpips=)]) adds paired agreement with each reference teacher. extra(n) -> dict:
    metrics the caller gathered while `generate` ran, merged with the rest."""
    cfg = ckpt["config"]
    device = device or default_device()
    preset = cfg.get("preset")
    n = sample_count(cfg, n_samples)
    ref_steps = ref_steps or PRESET_REF_STEPS.get(preset, REF_STEPS)
    ref_limit = REF_LIMIT.get(preset) if ref_limit is None else ref_limit
    classifier = classifier or ("tiny" if preset == "smoke" else "airbench")
    amp = lambda: runs.autocast(SimpleNamespace(amp=cfg.get("amp", "none"), device=str(device)))
    t0 = time.time()
    with torch.random.fork_rng():      # evaluation must not move the caller's RNG streams (training resumes)
        images, labels = generate_samples(generate, n, device, batch_size, amp, progress, label or out_path)
        t_gen = time.time() - t0
        if cfg["dataset"] in gmm.MIXTURES:   # an exact benchmark: closed-form metrics, no Inception, no classifier
            metrics, info = score_exact(images, labels, device, lpips_backbone, cfg["dataset"])
        else:
            train = training_set(cfg["dataset"], cfg.get("data_dir"))
            metrics, info = score_samples(images, labels, train, ref_limit, classifier, device, lpips_backbone,
                                          progress)
        if agreement:
            t1 = time.time()
            for ref in agreement["refs"]:
                lpips_fn, why = optional_lpips(lpips_backbone, device) if ref.get("lpips", True) else (None, None)
                ref_name = ref.get("ref_name") or f"ddim{ref_steps}"
                paired, _ = teacher_agreement(agreement["student"], ref["teacher_fn"], n, device, lpips_fn, ref_steps,
                                              ref.get("cache_key"), batch_size, amp, grid=ref.get("grid"),
                                              ref_name=ref_name, drift=ref.get("drift", True),
                                              samples=images.float() / 127.5 - 1)
                metrics.update(paired)
                if why:
                    info["skipped"][metric_name("teacher_lpips", n, ref_name)] = why
            info["time_s"]["agreement_s"] = time.time() - t1
    if extra:
        metrics.update(extra(n))
    info["time_s"] = dict(generate_s=t_gen, **info["time_s"], total_s=time.time() - t0)
    record = dict(step=ckpt.get("step"), n=n, seeds=[0, n - 1], labels="seed mod 10", sampler=sampler,
                  device=str(device), **info, time=time.time())
    merge_metrics(out_path, metrics, record)
    print(summary_line(label or out_path, record, metrics))
    for name, why in info["skipped"].items():
        print(f"{name} skipped ({why})")
    return metrics


def teacher_refs(cfg, device):
    """The references a distilled run's samples are paired with: its own teacher's plain CFG DDIM sampler
    (guidance as in training, no thresholding: one reference for every run of a grid), and on the exact
    benchmark the exact teacher's ODE too (alone when the run's teacher is the exact one). [] when the run's
    teacher is not there."""
    path, w = cfg.get("teacher_path"), cfg["guidance"]

    def exact_ref():                     # the exact teacher's ODE (drift included: the closed form is cheap)
        exact = gmm.ExactTeacher(cfg["dataset"])
        return dict(teacher_fn=lambda z, t, y: common.denoise(exact, z, t, y, w), cache_key=f"{cfg['dataset']}-w{w:g}",
                    grid=gmm.ode_grid(), ref_name=f"exact{gmm.ODE_STEPS}", lpips=False)
    if path == "exact":                  # the run distilled the closed form itself: its ODE is the one reference
        return [exact_ref()]
    if not path or not os.path.isfile(path):
        print(f"teacher agreement skipped: the run's teacher {path!r} is not there")
        return []
    teacher, _ = runs.load_teacher(path, device)
    run_teacher = dict(teacher_fn=lambda z, t, y: common.denoise(teacher, z, t, y, w), cache_key=f"{file_sha(path)}-w{w:g}")
    if cfg["dataset"] not in gmm.MIXTURES:
        return [run_teacher]
    # A UNet teacher on the exact benchmark: agreement with it (no drift: a UNet solve per step is minutes on a
    # CPU), and with the exact teacher's ODE, no LPIPS.
    return [dict(run_teacher, drift=False, lpips=False), exact_ref()]


def run_agreement(make_student, ckpt, device):
    """Teacher agreement of a distilled run: its student (`make_student(ckpt, device)` of its method file)
    and its `teacher_refs`."""
    refs = teacher_refs(ckpt["config"], device)
    return dict(student=make_student(ckpt, device), refs=refs) if refs else None


def evaluate_checkpoint(run_dir, make_generator, make_student=None, n_samples=None, device=None, sampler=None,
                        **options):
    """Evaluate run_dir/ckpt.pt with the generator its own method file makes (`make_generator(ckpt, device)`)
    and merge the metrics into run_dir/metrics.json; with `make_student`, also its agreement with the
    teacher. The method files call this for their mid-run and final evaluations; eval.py for a run
    directory. Options as `evaluate_generator`."""
    device = device or default_device()
    ckpt = runs.load_checkpoint(os.path.join(run_dir, "ckpt.pt"), device)
    if make_student is not None:
        options.setdefault("agreement", run_agreement(make_student, ckpt, device))
    metrics = evaluate_generator(make_generator(ckpt, device), ckpt, os.path.join(run_dir, "metrics.json"),
                                 sampler or ckpt["config"].get("method"), n_samples, device, label=run_dir, **options)
    cfg = ckpt["config"]
    if cfg["dataset"] in gmm.MIXTURES and "steps" in cfg:
        print_exact_context(cfg, metrics, sample_count(cfg, n_samples))
    return metrics


def prepare_shared(cfg, device=None, progress=True):
    """Make, once, what every run of a grid with this resolved config (teacher_path included) reads from the
    cache when it is evaluated: the FID reference statistics and the classifier of its training set, and its
    teachers' reference samples. Grids call it before fanning out, so parallel runs never race to make them."""
    device = device or default_device()
    preset, n = cfg.get("preset"), sample_count(cfg)
    ref_steps = PRESET_REF_STEPS.get(preset, REF_STEPS)
    amp = lambda: runs.autocast(SimpleNamespace(amp=cfg.get("amp", "none"), device=str(device)))
    with torch.random.fork_rng():
        if cfg["dataset"] not in gmm.MIXTURES:
            train = training_set(cfg["dataset"], cfg.get("data_dir"))
            ref_limit = REF_LIMIT.get(preset)
            idx = even_spread(len(train[0]), ref_limit or len(train[0]))
            reference(train[0][idx], "train", full=len(idx) == len(train[0]), device=device, progress=progress)
            load_classifier(*train, "tiny" if preset == "smoke" else "airbench", device, progress)
        for ref in teacher_refs(cfg, device):
            teacher_samples(ref["teacher_fn"], n, device, ref_steps, ref["cache_key"], None, amp, ref.get("grid"),
                            ref.get("ref_name") or f"ddim{ref_steps}")


def evaluate_images(images, ref_images=None, ref_name="ref", train=None, ref_limit=None, device=None, out=None, label=""):
    """FID and precision/recall/density/coverage of an image set uint8 [N, 3, H, W] against ref_images
    (named `ref` + its count) or else the training set `train` (named `train`)."""
    device = device or default_device()
    t0 = time.time()
    if ref_images is not None:
        ref = reference(ref_images, ref_name, full=False, device=device)
    else:
        idx = even_spread(len(train[0]), ref_limit or len(train[0]))
        ref = reference(train[0][idx], "train", full=len(idx) == len(train[0]), device=device)
    metrics = distribution_metrics(inception_features(images, device), ref, device)
    record = dict(n=len(images), reference=dict(name=ref["name"], n=ref["n"], cache=ref["key"]), device=str(device),
                  time_s=dict(total_s=time.time() - t0), time=time.time())
    if out:
        merge_metrics(out, metrics, record)
    print(summary_line(label, record, metrics))
    return metrics


def merge_metrics(path, metrics, record):
    """Add metrics to the JSON file at path (other keys kept), evals[N] = record, append to history."""
    data = {}
    if os.path.isfile(path):
        data = runs.read_json(path)
    data.update(metrics)
    skipped = {k: v for k, v in {**data.get("skipped", {}), **record.get("skipped", {})}.items() if k not in metrics}
    data.pop("skipped", None)
    if skipped:                        # optional metrics that could not be computed, and why
        data["skipped"] = skipped
    data.setdefault("evals", {})[str(record["n"])] = dict(record, metrics=sorted(metrics))
    data.setdefault("history", []).append(dict(step=record.get("step"), n=record["n"], **metrics))
    runs.write_json(path, data, indent=2, default=None)


def summary_line(label, record, metrics):
    step = "" if record.get("step") is None else f" step {record['step']}"
    body = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} [{', '.join(f'{x:.3g}' for x in v)}]"
                      for k, v in metrics.items())
    return f"eval {label}{step}: {body} | {record['time_s']['total_s']:.0f} s"


# --- The covariate-shift diagnostic (paper Sec. 3.2, measured) ---

@torch.no_grad()
def covariate_shift(out, make_student, n=256, ref_steps=64, device="cpu", memo=None):
    """For a trained student, at each of its K sampling times t_k: the mean squared gap between the
    student's x̂_0 and the teacher's x̂_0 on (a) forward-diffused data states and (b) the student's own
    rollout states (make_student: the method file's). The teacher's x̂_0 at a state is the end of its CFG DDIM trajectory from that state
    (`ref_steps` per unit time, no thresholding: one reference for every student): what a distilled
    student imitates (PD, LCM), rather than the one-shot posterior mean, which no few-step student
    predicts. On the exact benchmark (--dataset gmm) the teacher is the exact one (gmm.py), its trajectory
    the exact ODE's (gmm.ode_grid). memo: a dict reused across students of one teacher (the forward states
    and their teacher ends do not depend on the student). Returns (gap_fwd, gap_own), one value per step."""
    memo = {} if memo is None else memo
    ckpt = runs.load_checkpoint(os.path.join(out, "ckpt.pt"), device)
    cfg = ckpt["config"]
    x0_fn, times, stochastic = make_student(ckpt, device)
    if cfg["dataset"] in gmm.MIXTURES:
        teacher, grid = gmm.ExactTeacher(cfg["dataset"]), gmm.ode_grid()
        tail = lambda t: grid_tail(grid, t)
    else:
        teacher, _ = runs.load_teacher(cfg["teacher_path"], device)
        tail = lambda t: common.fine_grid(t, 0.0, ref_steps)
    teacher_fn = lambda z, t, y: common.denoise(teacher, z, t, y, cfg["guidance"])
    teacher_end = lambda z, t, y: common.sample(teacher_fn, z, y, tail(t))
    key = (cfg["teacher_path"], cfg["guidance"], cfg["dataset"], cfg.get("data_dir"), n, ref_steps)
    if key not in memo:
        memo[key] = {"data": runs.Dataset(*runs.load_images(cfg["dataset"], cfg.get("data_dir")), device)}
    cache = memo[key]
    noise, labels, renoise = common.seeded_batch(range(n), device)
    z = noise
    gap_fwd, gap_own = [], []
    with torch.random.fork_rng():
        for t, s in zip(times[:-1], times[1:]):
            if t not in cache:                    # (a) forward states at t and the teacher's ends, once per t
                torch.manual_seed(int(1e6 * t))
                x0, y = cache["data"].batch(n)
                z_fwd, _ = common.forward_diffuse(x0, t, torch.randn_like(x0))
                cache[t] = (z_fwd, y, teacher_end(z_fwd, t, y))
            z_fwd, y, end = cache[t]
            gap_fwd.append(float((x0_fn(z_fwd, t, y) - end).square().mean()))
            gap_own.append(float((x0_fn(z, t, labels) - teacher_end(z, t, labels)).square().mean()))
            z = common.sampler_step(x0_fn, z, t, s, labels, renoise if stochastic else None)
    return gap_fwd, gap_own
