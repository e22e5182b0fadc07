"""The command line every script shares (DESIGN §4, §7): argument types with one-line errors, the
common, DDIL and thresholding flag groups, presets, the one list of settings that define a run, and
run_main (a UserError becomes one line, never a traceback)."""

import argparse
import errno
import json
import math
import os
import sys

import torch

import gmm
import runs
from common import Busy, DDILSampler, SOURCES, Stopped, UserError


# --- Command line: shared flags, presets, validation (DESIGN §4, §7) ---

class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except 'None' (a preset's or another flag's value, which the help text names)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: ...`, no usage dump) and defaults in --help."""

    def __init__(self, **kw):
        # no abbreviations: `--pres gmm` is an error, never --preset (ablate.py's guard on the flags it sets
        # after `--` relies on it, and a flag added later can never change what an old command meant)
        super().__init__(formatter_class=_Formatter, allow_abbrev=False, **kw)

    def error(self, message):
        raise SystemExit(f"{self.prog}: error: {message}")


def number(s):
    """A finite number: nan and inf are refused, never trained with."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} must be a finite number")
    return x


def integer(s):
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None


def triple(s):
    parts = s.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{s!r} must be three comma-separated weights F,T,S")
    w = [weight(p) for p in parts]
    if sum(w) == 0:
        raise argparse.ArgumentTypeError(f"{s!r}: the weights sum to zero")
    return w


def fraction(s):
    w = weight(s)
    if w > 1:
        raise argparse.ArgumentTypeError(f"{s!r} must lie in [0, 1]")
    return w


def positive_int(s):
    n = integer(s)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive integer")
    return n


def positive(s):
    """A finite number > 0 (learning rates, scales)."""
    x = number(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be > 0")
    return x


def nonnegative(s):
    """A finite number >= 0 (0 usually switches the thing off; a prior weight)."""
    x = number(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 0")
    return x


weight = nonnegative            # the beta flags' prior weights: finite, >= 0 (normalised later)


def seed_int(s):
    n = integer(s)
    if not 0 <= n < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{s!r} must lie in [0, 2**63)")
    return n


def count(s):
    return 0 if s.strip() == "0" else positive_int(s)


def iterations(s):
    """A comma-separated list of iteration counts, e.g. 100,200,400 (sorted, no repeats)."""
    return sorted({positive_int(p) for p in s.split(",") if p.strip()})


def preset_help(p, presets):
    """Name each preset's value in the --help of every flag it sets, '(preset: smoke 80, gmm 300, cifar10
    40000)', so that the help shows the values a run will use. Call after the last add_argument."""
    table = {name: {**values, **(DDIL_PRESETS.get(name, {}) if any(a.dest == "max_age" for a in p._actions) else {})}
             for name, values in presets.items()}
    for a in p._actions:
        vals = [f"{name} {runs.compact(v)}" for name, v in ((n, t.get(a.dest)) for n, t in table.items()) if v is not None]
        if vals and a.default is None and a.help:
            a.help = a.help.replace(" (preset)", "") + f" (preset: {', '.join(vals)})"
    return p


# Every preset a script takes. A new one needs its values in each table keyed by these names: the
# scripts' PRESETS (teacher.py and the three methods), DDIL_PRESETS below, scoring.DEFAULT_SAMPLES and
# runs.ETA_MIN (a test checks that they agree).
PRESET_NAMES = ("quick", "smoke", "cifar10", "gmm", "gmm2")


def add_common_args(p, student=True):
    """Flags every script shares (DESIGN §7). Defaults of None come from the --preset."""
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=("auto",) + PRESET_NAMES, default="auto",
                   help="quick: the gmm2 benchmark with the exact teacher, briefly: a first run of minutes on a CPU "
                        "whose numbers are read against the floor and the exact teacher; smoke: tiny UNet on the "
                        "synthetic set, the CIFAR-10 code path in minutes on a CPU; cifar10: the single-GPU "
                        "configuration; gmm, gmm2: the exact benchmarks (--dataset gmm / gmm2, gmm.py) sized for 2 "
                        "CPU cores; auto: cifar10 when CUDA is present, else quick")
    g.add_argument("--dataset", choices=["cifar10", "synthetic", "gmm", "gmm2"], default=None,
                   help="training data: cifar10, synthetic (procedural shapes), gmm / gmm2 (the exact benchmarks' "
                        "Gaussian mixtures, gmm.py) (preset); ignored when --data-dir is given")
    g.add_argument("--data-dir", default=os.environ.get("DDIL_DATA_DIR"),
                   help="image-folder dataset train/<class>/* as a directory or .zip (e.g. "
                        "../shared/data/cifar10-jpeg-train.zip); env DDIL_DATA_DIR")
    if student:
        g.add_argument("--teacher", default="auto",
                       help="teacher checkpoint PATH; exact: the closed-form denoiser of a mixture data set (gmm.py), "
                            "no teacher error; auto: exact on mixture data sets, else reuse (or train with teacher.py) "
                            "runs/teacher-<preset>-s0")
        g.add_argument("--init", default="auto",
                       help="with --teacher exact, the UNet checkpoint the student (and DMD2's critic) starts from: "
                            "auto = the UNet teacher run runs/teacher-<preset>-s0 (trained by teacher.py when missing), "
                            "or a teacher checkpoint PATH (a UNet teacher's students start from the teacher itself)")
    g.add_argument("--guidance", type=nonnegative, default=None,
                   help="classifier-free guidance scale w of the teacher: 1 = none (the conditional model), 0 = the "
                        "unconditional model, between them weaker and above 1 stronger conditioning; w < 0 is refused "
                        "(preset)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of everything random in training")
    g.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto: cuda when available)")
    g.add_argument("--out", default=None, help="run directory (default runs/<method>-<preset>-<settings>-s<seed>)")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=positive_int, default=None, help="training iterations (preset)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="examples per iteration (preset)")
    g.add_argument("--lr", type=positive, default=None, help="AdamW learning rate (preset)")
    g.add_argument("--ema", type=fraction, default=None, help="EMA decay of the weights used for sampling (preset)")
    g.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="bf16 autocast (CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g = p.add_argument_group("logging, checkpoints and evaluation")
    g.add_argument("--log-every", type=positive_int, default=None, help="iterations per log line (preset)")
    g.add_argument("--save-every", type=positive_int, default=None, help="iterations per checkpoint (preset)")
    g.add_argument("--eval-every", type=count, default=None, help="iterations per evaluation, 0 = only at the end (preset)")
    g.add_argument("--eval-at", type=iterations, default=[],
                   help="also evaluate at these iterations, e.g. 100,200,400 (a learning curve in metrics.json's history)")
    g.add_argument("--eval-samples", type=count, default=None,
                   help="samples for the metrics (fid<N>_train ...); 0 = no metrics (preset)")
    g.add_argument("--reevaluate", action="store_true",
                   help="redo samples.png and metrics.json of a finished run (else a finished run does nothing)")
    return p


def add_ddil_args(p, critic=False):
    """The DDIL mixture and thresholding flags (DESIGN §4), identical in every method script."""
    g = p.add_argument_group("DDIL mixture (values are this project's choices: the paper gives none)")
    for name, sym in (("fwd", "β_frwd: forward-diffused data"), ("teacher", "β_teach_bckwrd: teacher backward rollouts"),
                      ("student", "β_student_bckwrd: the student's own backward rollouts")):
        g.add_argument(f"--beta-{name}", type=weight, nargs="?", const=1.0, default=None, metavar="W",
                       help=f"prior weight of {sym}; a bare flag means 1; weights are normalised to sum to 1; "
                            "with no beta flag the method's own baseline source is used")
    g.add_argument("--prior-schedule", choices=["constant", "linear", "cosine", "step"], default=None,
                   help="dynamic schedule moving the priors from --prior-start to the beta weights over "
                        "--prior-warmup (default constant; linear with --ddil)")
    g.add_argument("--prior-start", type=triple, default=[1.0, 0.0, 0.0], metavar="F,T,S",
                   help="start priors (fwd, teacher, student) of a dynamic schedule (early student rollouts are noise)")
    g.add_argument("--prior-warmup", type=fraction, default=None,
                   help="fraction of training over which the schedule moves (default 0.3; PD: of each round)")
    g.add_argument("--expert-prob", type=fraction, default=0.0,
                   help="DAgger mixture: probability that the teacher takes each step of a student backward rollout")
    g.add_argument("--buffer-size", type=count, default=None,
                   help="replay buffer of backward states per source, 0 = always fresh (default 0; 4096 with --ddil)")
    g.add_argument("--buffer-refresh", type=fraction, default=None,
                   help="fresh backward states per backward state served from the buffer, on average (default 0.25)")
    g.add_argument("--rollout-chunk", type=positive_int, default=None,
                   help="whole trajectories per buffer refill, each giving a state at every grid time "
                        "(default 4 with --preset smoke, 256 with cifar10: large batches keep a GPU busy)")
    g.add_argument("--max-age", type=count, default=None,
                   help="maximum age, in training iterations, of the student backward states served from the "
                        "replay buffer (DAgger trains on the current policy's states); older ones are dropped "
                        "and refills made small enough to keep the buffer filled; 0 = no bound "
                        "(preset: smoke 20, cifar10 100)")
    g.add_argument("--teacher-rollout-steps", type=positive_int, default=32,
                   help="teacher DDIM steps per unit time in backward rollouts, and never fewer than twice the "
                        "student's steps (a grid containing the student's, finer than it)")
    g.add_argument("--ddil", action="store_true",
                   help="the project's default DDIL mixture (our choice): (β_frwd, β_teach, β_student) = "
                        "(0.5, 0.1, 0.4), linear schedule from (1, 0, 0) over the first 30%% of training, buffer "
                        "4096 per source refreshed 25%% per iteration; explicit flags override any part")
    g = p.add_argument_group("thresholding of x̂_0 (reflected diffusion)")
    g.add_argument("--reflected", action="store_true", help="turn on every thresholding flag of this method")
    g.add_argument("--threshold-teacher", action="store_true",
                   help="threshold the teacher's x̂_0" + (" (the real score; without --threshold-critic this moves "
                                                          "DMD's fixed point: identical scores give an inward gradient)"
                                                          if critic else ""))
    g.add_argument("--threshold-student", action="store_true",
                   help="threshold the student's training target / output x̂_0 (implies --sample-clip)")
    g.add_argument("--sample-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp the student's x̂_0 to [-1, 1] at every step of its sampler, at inference and in "
                        "its DDIL rollouts, without touching training targets (default: the method's official "
                        "default: on for PD, as Google's CIFAR-10 eval_clip_denoised; off for LCM and DMD2)")
    if critic:
        g.add_argument("--threshold-critic", action="store_true",
                       help="threshold the fake-score critic's x̂_0 (without --threshold-teacher this moves DMD's "
                            "fixed point: identical scores give an outward gradient; both together are consistent)")
    g.add_argument("--threshold-mode", choices=["static", "dynamic"], default="static",
                   help="static: clamp to [-1, 1]; dynamic: Imagen percentile thresholding")
    g.add_argument("--threshold-percentile", type=fraction, default=0.995,
                   help="percentile p of |x̂_0| for dynamic thresholding")
    return p


# Flags that do not change what is trained, so they do not name the run directory.
_NOT_SETTINGS = {"preset", "seed", "device", "out", "dry_run", "teacher", "init", "data_dir", "dataset", "amp", "compile",
                 "log_every", "save_every", "eval_every", "eval_at", "eval_samples", "iters"}


def check_device(name):
    """--device as given ('auto': cuda when available), checked: a one-line error for what is no device here."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if cuda else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this code runs on cpu or cuda")
    if device.type == "cuda" and not cuda:
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def resolve(p, args, method, presets, default_source=None, sample_clip=False):
    """Fill preset values, expand --ddil / --reflected, validate, name the run directory.
    presets: {'smoke': {dest: value}, 'cifar10': {...}} for every flag whose default is None.
    default_source / sample_clip: the method's own baseline source and sampling-time clipping."""
    settings = [a for a in p._actions if a.dest not in _NOT_SETTINGS and a.dest != "help"
                and getattr(args, a.dest) != a.default]
    name = "-".join(a.dest if a.const is True else f"{a.dest}={runs.compact(getattr(args, a.dest))}" for a in settings)
    cuda = torch.cuda.is_available()
    args.device = check_device(args.device)
    if args.preset == "auto":
        args.preset, args.preset_reason = ("cifar10", "auto: CUDA present") if cuda else ("quick", "auto: no CUDA")
    else:
        args.preset_reason = "--preset"
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.preset_dataset = presets[args.preset]["dataset"]
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: the learning rate must be > 0")
    if not 0 <= args.ema < 1:
        raise UserError(f"--ema {args.ema}: an EMA decay lies in [0, 1) (e.g. 0.999)")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UserError(f"--guidance {args.guidance}: w must be >= 0 (1 = no guidance, 0 = unconditional)")
    if args.data_dir:
        args.dataset = "folder"
    if hasattr(args, "teacher"):
        mixture = args.dataset in gmm.MIXTURES
        if args.teacher == "auto" and mixture:
            args.teacher = "exact"          # the closed form: the students distil p(x | y) itself
        if args.teacher == "exact" and not mixture:
            raise UserError(f"--teacher exact: only a mixture data set ({', '.join(gmm.MIXTURES)}) has a closed-form "
                            f"teacher, not --dataset {args.dataset}")
        if args.init != "auto" and args.teacher != "exact":
            raise UserError(f"--init {args.init}: only with --teacher exact (a UNet teacher's students start from "
                            "the teacher itself)")
    if hasattr(args, "ddil"):
        _resolve_ddil(args, default_source, sample_clip)
    if args.out is None:
        args.out = runs.default_run_dir(method, args, name)
    return args


# Preset values of the DDIL flags that every method shares (each script holds its other preset values).
DDIL_PRESETS = {"smoke": dict(rollout_chunk=4, max_age=20), "cifar10": dict(rollout_chunk=256, max_age=100),
                "gmm": dict(rollout_chunk=16, max_age=20)}
DDIL_PRESETS["gmm2"] = dict(DDIL_PRESETS["gmm"])
DDIL_PRESETS["quick"] = dict(DDIL_PRESETS["gmm2"])      # quick is gmm2, briefly


def _resolve_ddil(args, default_source, sample_clip):
    if args.ddil:   # DESIGN §4 defaults; any explicit flag wins
        for k, v in (("beta_fwd", 0.5), ("beta_teacher", 0.1), ("beta_student", 0.4)):
            if getattr(args, k) is None:
                setattr(args, k, v)
        args.prior_schedule = args.prior_schedule or "linear"
        args.buffer_size = 4096 if args.buffer_size is None else args.buffer_size
    betas = [args.beta_fwd, args.beta_teacher, args.beta_student]
    if all(b is None for b in betas):   # no beta flag: the method's own baseline source
        betas = [float(s == default_source) for s in SOURCES]
    betas = [b or 0.0 for b in betas]
    if sum(betas) == 0:
        raise UserError("--beta-fwd/--beta-teacher/--beta-student: the weights sum to zero; give at least one positive weight")
    args.priors = [b / sum(betas) for b in betas]
    args.prior_schedule = args.prior_schedule or "constant"
    args.prior_warmup = 0.3 if args.prior_warmup is None else args.prior_warmup
    args.buffer_size = 0 if args.buffer_size is None else args.buffer_size
    args.buffer_refresh = 0.25 if args.buffer_refresh is None else args.buffer_refresh
    for k, v in DDIL_PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.reflected:
        for k in ("threshold_teacher", "threshold_student", "threshold_critic"):
            if hasattr(args, k):
                setattr(args, k, True)
    if args.threshold_student and args.sample_clip is False:
        raise UserError("--no-sample-clip contradicts --threshold-student / --reflected, which clip the student's "
                        "x̂_0 at every sampling step too")
    args.sample_clip = args.threshold_student or (sample_clip if args.sample_clip is None else args.sample_clip)


def clip_spec(args, on):
    """(mode, percentile) for `threshold` / `denoise`: mode None when this network is not thresholded."""
    return (args.threshold_mode if on else None, args.threshold_percentile)


def make_sampler(args, data):
    """The DDIL input sampler configured from the resolved flags."""
    return DDILSampler(data, args.priors, args.prior_start, args.prior_schedule, args.prior_warmup,
                       args.buffer_size, args.buffer_refresh, args.expert_prob, args.teacher_rollout_steps,
                       args.rollout_chunk, args.max_age)


def dry_run(args):
    print(json.dumps(vars(args), indent=2, default=str))


def run_main(main, argv=None):
    """Run a script's main(); a UserError becomes one line on stderr (status 1), a stop one line and
    status 130 (also a Ctrl-C before the training loop has started)."""
    try:
        return main(argv)
    except Busy as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(75)
    except UserError as e:
        raise SystemExit(f"error: {e}")
    except Stopped as e:
        print(e, flush=True)
        raise SystemExit(130)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise SystemExit(f"error: cannot write {e.filename or 'a file'} ({e.strerror}); free some space or fix "
                         "the permissions, then rerun the same command to resume")
