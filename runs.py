"""Run plumbing shared by the training scripts (DESIGN §7, §8): data, networks and optimisers, seeding
and RNG state, atomic checkpoints and resume, signals, the run directory (lock, config.json, name),
logging and progress, and what happens at the end of a step and of a run. No maths of any method."""

import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

import gmm
from common import Busy, NUM_CLASSES, Stopped, UserError, seeded_batch


# --- Data ---

def synthetic_dataset(n=5000, seed=0):
    """A procedural, deterministic 10-class 32x32 image set (no download): class c draws shape
    c % 5 (disc, square, ring, cross, stripes) in palette c // 5 (warm / cool), at a random position
    and size, over a noisy gradient background. Returns uint8 [n, 3, 32, 32] and labels [n]."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % NUM_CLASSES
    rng.shuffle(y)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)[:, None] / 31.0          # [2][1, 32, 32]
    cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(np.float32)
    r = rng.uniform(0.15, 0.3, (n, 1, 1)).astype(np.float32)
    dx, dy = xx - cx, yy - cy
    d = np.sqrt(dx ** 2 + dy ** 2)
    shapes = np.stack([d < r,                                                 # disc
                       np.maximum(abs(dx), abs(dy)) < r,                      # square
                       abs(d - r) < 0.06,                                     # ring
                       (np.minimum(abs(dx), abs(dy)) < 0.06) & (d < r * 1.4),   # cross
                       (np.sin(40 * (dx + dy)) > 0) & (d < r * 1.3)])           # stripes
    mask = shapes[y % 5, np.arange(n)].astype(np.float32)[:, None]           # [n, 1, 32, 32]
    warm = np.array([0.9, 0.5, 0.1], np.float32)
    cool = np.array([0.1, 0.5, 0.9], np.float32)
    colour = np.where((y // 5)[:, None] == 0, warm, cool) + rng.normal(0, 0.05, (n, 3)).astype(np.float32)
    bg = 0.25 + 0.2 * (xx[None] * rng.uniform(-1, 1, (n, 1, 1, 1)) + yy[None] * rng.uniform(-1, 1, (n, 1, 1, 1)))
    img = bg * (1 - mask) + colour[:, :, None, None] * mask + rng.normal(0, 0.03, (n, 3, 32, 32))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)


def image_folder(path, split="train", limit=None):
    """An image-folder layout `<split>/<class>/*` (a directory or a .zip of one); classes are the
    sorted folder names (CIFAR-10's label order for ../shared/data's copy). Returns uint8, labels."""
    from PIL import Image
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names = [n for n in archive.namelist() if n.startswith(f"{split}/") and not n.endswith("/")]
        read = archive.open
    elif os.path.isdir(os.path.join(path, split)):
        root = os.path.join(path, split)
        names = [f"{split}/{c}/{f}" for c in os.listdir(root) if os.path.isdir(os.path.join(root, c))
                 for f in os.listdir(os.path.join(root, c))]
        read = lambda n: open(os.path.join(path, n), "rb")
    else:
        raise UserError(f"--data-dir {path}: expected a directory or .zip holding {split}/<class>/<image>")
    hidden = lambda n: any(part.startswith(".") or part == "__MACOSX" for part in n.split("/"))
    names = sorted(n for n in names if not hidden(n) and len(n.split("/")) == 3)    # .DS_Store, ._x.png ...
    classes = sorted({n.split("/")[1] for n in names})
    if not names:
        raise UserError(f"--data-dir {path}: no images under {split}/<class>/")
    if len(classes) > NUM_CLASSES:      # label NUM_CLASSES is the guidance null label; more do not fit the UNet
        raise UserError(f"--data-dir {path}: {len(classes)} class folders under {split}/ ({', '.join(classes[:12])}"
                        f"{' ...' if len(classes) > 12 else ''}); this code trains at most {NUM_CLASSES} classes")
    if limit is not None:   # an evenly spread slice keeps every class
        names = [names[i] for i in np.linspace(0, len(names) - 1, min(limit, len(names))).round().astype(int)]
    images = []
    for n in names:
        try:
            with read(n) as f:
                images.append(np.asarray(Image.open(f).convert("RGB").resize((32, 32))))
        except Exception as e:         # not an image, truncated, a bad CRC in the zip ...
            raise UserError(f"--data-dir {path}: {n} is not a readable image ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:80] if str(e) else ''})") from None
    labels = np.array([classes.index(n.split("/")[1]) for n in names], dtype=np.int64)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), labels


def cache_dir():
    """Where computed data sets, reference statistics and teacher samples are kept: $DDIL_CACHE, else cache/."""
    path = os.environ.get("DDIL_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
    os.makedirs(path, exist_ok=True)
    return path


def code_sha(*modules):
    """12 hex digits of the modules' source: a cache key that changes with any edit of the code that made it."""
    h = hashlib.sha256()
    for m in modules:
        with open(m.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


_MIXTURE_SETS = {}


def mixture_set(dataset, split):
    """An exact benchmark's data set (`gmm.dataset`: 50,000 train / 10,000 test samples, quantised), made once:
    kept for the process (a teacher trained on the way reuses it) and cached under the hash of gmm.py, so
    that an edit of the mixtures' code makes a new one. numpy uint8 [N, 3, 32, 32] and labels [N]."""
    if (dataset, split) not in _MIXTURE_SETS:
        n = 50_000 if split == "train" else 10_000
        path = os.path.join(cache_dir(), f"mixture-{dataset}-{split}-n{n}-{code_sha(gmm)}.npz")
        if os.path.isfile(path):
            with np.load(path) as f:
                x, y = f["x"], f["y"]
        else:
            x, y = (v.numpy() for v in gmm.dataset(n, split, dataset))
            tmp = f"{path}.{os.getpid()}.tmp.npz"          # two runs of a grid may make it at once: each writes whole
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
        _MIXTURE_SETS[dataset, split] = x, y
    return _MIXTURE_SETS[dataset, split]


def load_images(dataset, data_dir=None, split="train", limit=None):
    """uint8 [N, 3, 32, 32] and labels [N] as torch tensors on the CPU (DESIGN §8)."""
    if data_dir:
        if not os.path.exists(data_dir):
            raise UserError(f"--data-dir {data_dir}: no such file or directory")
        x, y = image_folder(data_dir, split, limit)
    elif dataset == "synthetic":
        x, y = synthetic_dataset(5000 if split == "train" else 1000, seed=0 if split == "train" else 1)
    elif dataset in gmm.MIXTURES:   # an exact benchmark's mixture (gmm.py), sampled once, quantised like images
        x, y = mixture_set(dataset, split)
    elif dataset == "cifar10":
        import torchvision
        root = os.environ.get("DDIL_CIFAR_ROOT", "data")
        try:
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=True)
        except Exception as e:   # offline, firewalled, bad mirror ...
            raise UserError(f"CIFAR-10 could not be loaded or downloaded into {root}/ ({type(e).__name__}: "
                            f"{str(e)[:80]}); use --data-dir PATH (an image folder or zip, e.g. "
                            "../shared/data/cifar10-jpeg-train.zip) or --dataset synthetic") from None
        x, y = ds.data.transpose(0, 3, 1, 2).copy(), np.asarray(ds.targets, dtype=np.int64)
    else:
        raise UserError(f"--dataset {dataset}: unknown (choose cifar10, synthetic, {', '.join(gmm.MIXTURES)}, or give --data-dir)")
    if limit is not None and len(x) > limit:
        x, y = x[:limit], y[:limit]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


class Dataset:
    """The whole uint8 dataset resident on the training device; batches are sliced there (as
    airbench does), with no per-image DataLoader work in the loop."""

    def __init__(self, images, labels, device):
        self.x, self.y = images.to(device), labels.to(device)

    def __len__(self):
        return len(self.x)

    def batch(self, n, hflip=False):
        """x_0 [n, 3, 32, 32] float in [-1, 1] and y [n], drawn with replacement (global RNG)."""
        idx = torch.randint(len(self.x), (n,), device=self.x.device)
        x = self.x[idx].float() / 127.5 - 1
        if hflip:
            x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x, self.y[idx]


# --- Networks, optimisers, seeding and RNG state ---

def build_unet(config, device):
    from unet import UNet
    net = UNet(**config).to(device)
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else net


def load_teacher(path, device, flag="--teacher"):
    """The teacher's EMA network, frozen, in eval mode, and its checkpoint."""
    ckpt = load_checkpoint(path, device)
    if "unet" not in ckpt or "ema" not in ckpt.get("nets", {}):
        raise UserError(f"{flag} {path}: not a teacher checkpoint (no 'unet' config / 'ema' weights)")
    if "model" not in ckpt["nets"]:           # students keep "student" (and critic / target / round teacher)
        raise UserError(f"{flag} {path}: a distilled student's checkpoint (networks {', '.join(ckpt['nets'])}), "
                        "not a teacher's; give a teacher.py checkpoint")
    net = build_unet(ckpt["unet"], device)
    net.load_state_dict(ckpt["nets"]["ema"])
    return net.eval().requires_grad_(False), ckpt


def weights_sha(path):
    """The first 12 hex digits of the sha256 of a teacher.py checkpoint's EMA weights (names and bytes, in
    name order): which UNet a run started from. Two trainings of the same settings give other weights on
    another CPU (other kernels, other rounding), so the path and settings alone do not name them."""
    h = hashlib.sha256()
    for name, w in sorted(load_checkpoint(path)["nets"]["ema"].items()):
        h.update(name.encode())
        h.update(w.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def load_networks(args, device):
    """(teacher, init): the teacher a student run distils (a frozen UNet, or `gmm.ExactTeacher` when
    args.teacher_path is "exact") and the checkpoint of the UNet its student starts from (args.init_path:
    the teacher itself, or with the exact teacher --init's UNet). Both paths are set by teacher.ensure_teacher."""
    net, init = load_teacher(args.init_path, device, "--init" if args.teacher_path == "exact" else "--teacher")
    if args.dataset in gmm.MIXTURES and init["config"].get("hflip"):
        print(f"warning: {args.init_path} was trained with horizontal flips, but {args.dataset} is not mirror-symmetric: "
              "that UNet learned the flip-symmetrised mixture (teacher.py no longer flips mixture data; retrain it "
              "without --hflip)", flush=True)
    if args.teacher_path == "exact":
        return gmm.ExactTeacher(args.dataset, gmm.mixture(args.dataset, device)), init
    return net, init


def teacher_checkpoint(args):
    """The one UNet checkpoint a student run needs, and whether that run has finished: its teacher
    (--teacher PATH), or with --teacher exact the network its student starts from (--init PATH). Otherwise
    (auto) the default teacher run (runs/teacher-<preset>[-<data>]-s0/ckpt.pt, what `python teacher.py
    --preset P` writes). The method scripts train a missing one with teacher.py (`ensure_teacher`)."""
    init = getattr(args, "init", "auto")
    source, flag = (init, "--init") if args.teacher == "exact" else (args.teacher, "--teacher")
    if source not in ("auto", "exact"):
        if not os.path.isfile(source):
            raise UserError(f"{flag} {source}: no such checkpoint (train one with teacher.py, or {flag} auto)")
        return source, True
    path = os.path.join(default_run_dir("teacher", args, seed=0), "ckpt.pt")
    ckpt = load_checkpoint(path) if os.path.isfile(path) else None
    return path, ckpt is not None and ckpt["step"] >= ckpt["config"]["iters"]


def optimizer(params, lr, device, betas=(0.9, 0.999), weight_decay=0.0):
    """AdamW; the fused kernel on CUDA (one launch for all parameters)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=torch.device(device).type == "cuda")


def lr_at(step, base, warmup):
    """Linear warm-up over `warmup` steps, then constant (resume-safe: depends on step only)."""
    return base * min(1.0, (step + 1) / max(1, warmup))


def autocast(args):
    """bf16 autocast on CUDA when --amp bf16; a no-op on the CPU."""
    if args.amp == "bf16" and torch.device(args.device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def maybe_compile(net, args):
    return torch.compile(net) if args.compile else net


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA). Training randomness uses the global torch RNG,
    whose state goes into every checkpoint, so a resumed run continues the same stream."""
    import random
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def untouched_rng():
    """Run a block (a mid-run evaluation: it builds networks and draws noise) without moving the training
    streams: Python's, NumPy's and torch's RNG states are restored after it, so a run resumed from the
    checkpoint saved before the block continues bitwise as the uninterrupted run does."""
    import random
    py, npy, pt = random.getstate(), np.random.get_state(), rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        set_rng_state(pt)


# --- Checkpoints: one dict, written atomically, resumed automatically ---

def save_checkpoint(path, state):
    """torch.save to `path.<pid>.tmp`, fsync, then rename over `path`: a kill at any moment leaves either
    the old or the new checkpoint, never a half-written one, and two processes writing one cache entry
    never share a temporary file. Non-finite network weights are never saved: the last good checkpoint
    stays as it was."""
    for name, net in (state.get("nets") or {}).items():
        for k, v in (net or {}).items():
            if torch.is_floating_point(v) and not bool(torch.isfinite(v).all()):
                raise UserError(f"step {state.get('step')}: non-finite weights in {name}.{k}; not saved, the last good "
                                f"checkpoint {path} is kept (the run diverged: lower --lr)")
    remove_stale_temporaries(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    _WRITE["busy"] = True               # a second Ctrl-C now waits for the write (GracefulStop)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:    # disk full, quota, read-only: torch.save reports some as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)              # a partial file would keep the disk full for every rerun
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:100]
        raise UserError(f"cannot write the checkpoint {path} ({why}); the last complete checkpoint is kept: "
                        "free some space and rerun the same command to resume") from None
    finally:
        _WRITE["busy"] = False
    if _WRITE.pop("exit", False):
        print(f"stopped after writing {path}", flush=True)
        raise SystemExit(130)


_WRITE = {"busy": False}     # a checkpoint is being written; "exit": a second Ctrl-C came meanwhile


def remove_stale_temporaries(path):
    """Delete `path.<pid>.tmp` files left by writers that died mid-write (kill -9, a full disk): a
    temporary of a live process is left alone."""
    folder, name = os.path.split(os.path.abspath(path))
    for f in os.listdir(folder):
        pid = f[len(name) + 1:-len(".tmp")]
        if f.startswith(name + ".") and f.endswith(".tmp") and pid.isdigit() and not pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, f))
            except FileNotFoundError:
                pass


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def resuming(path):
    """Around a resume: a checkpoint whose networks, optimisers or keys do not fit the ones this run builds
    (the teacher it was distilled from was replaced by one of another width, a file from another version)
    is a one-line error naming it, never a traceback."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} does not fit this run ({type(e).__name__}: {first}); was its teacher replaced "
                        "since it started? Start a new run (another --out) or restore that teacher") from None


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint dict; an unreadable file is a one-line UserError, not a traceback."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                        "it is truncated or not a torch checkpoint - delete it or point elsewhere") from None


class GracefulStop:
    """SIGINT / SIGTERM / SIGUSR2 set `requested`; the loop saves a checkpoint at the next step boundary
    and exits (status 130). SIGUSR2 is what SLURM sends every process of a job shortly before its time
    limit (and submitit's requeue hook follows with SIGTERM): both only ask for the stop once. A second
    Ctrl-C (SIGINT) stops at once. (A SIGKILL loses at most the steps since the last periodic save.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum != signal.SIGINT:     # a scheduler's repeated stop request: already saving
            return
        if self.requested and _WRITE["busy"]:   # never interrupt torch.save: exit once the file is whole
            print(f"\n{signal.Signals(signum).name} again: stopping once the checkpoint being written is complete",
                  flush=True)
            _WRITE["exit"] = True
            return
        if self.requested:           # second Ctrl-C: stop now, without the step's checkpoint
            print(f"\n{signal.Signals(signum).name} again: stopped without saving this step; the last checkpoint "
                  "is kept", flush=True)
            raise SystemExit(130)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(Ctrl-C again: stop now) ...", flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# --- Saying up front what a command will do ---

# Rough wall-clock minutes per phase: smoke and gmm measured on a 2-core CPU (README, "First run" and
# "The exact benchmark"), cifar10 estimated for one H100 from FLOP counts (README). Printed, never used.
ETA_MIN = {"smoke": dict(teacher=0.7, pd=0.5, lcm=0.5, dmd2=0.7, eval=1, first_eval=1.5),
           "gmm": dict(teacher=7, pd=2, lcm=2.5, dmd2=3.5, eval=1.5, first_eval=7),
           "gmm2": dict(teacher=23, pd=5, lcm=6, dmd2=3, eval=2, first_eval=3),   # one of two 1-thread runs; pd estimated
           "quick": dict(teacher=1, pd=1, lcm=1, dmd2=0.5, eval=0.5, first_eval=1),   # bench.py --first-run: 145 s
           "cifar10": dict(teacher=60, pd=60, lcm=35, dmd2=75, eval=5, first_eval=10)}


def announce(args, method):
    """One line before anything runs: what this command will do, in order, and roughly how long."""
    eta = ETA_MIN.get(args.preset, {})
    about = lambda phase: f" (~{eta[phase]:g} min)" if phase in eta else ""
    steps = []
    if method != "teacher":
        path, done = teacher_checkpoint(args)
        if not done:
            steps.append(f"train the teacher into {os.path.dirname(path)}{about('teacher')}")
    steps.append(f"train {method}: {args.iters} iterations{about(method)}")
    if args.eval_samples:
        first = not os.path.isfile(os.path.join(args.out, "metrics.json"))
        steps.append(f"evaluate {args.eval_samples} samples{about('first_eval' if first else 'eval')}"
                     + (" (the first evaluation also makes the cached reference statistics)" if first else ""))
    where = "one H100, estimated" if args.preset == "cifar10" else "2-core CPU, measured"
    print(f"plan: {'; then '.join(steps)} [times: {where}]", flush=True)


# --- The end of every training step, and of every run (shared by the four training scripts) ---

def check_finite(step, **values):
    """A non-finite loss or gradient norm ends the run with one line naming the step, before the optimiser
    applies it: the last good checkpoint stays as it was. One host sync for all values."""
    v = torch.stack([torch.as_tensor(x, dtype=torch.float32, device="cpu" if not isinstance(x, torch.Tensor)
                                     else x.device).reshape(()) for x in values.values()])
    if not bool(torch.isfinite(v).all()):
        bad = ", ".join(f"{k} {float(x):g}" for k, x in zip(values, v.tolist()) if not math.isfinite(x))
        raise UserError(f"step {step + 1}: {bad}: the run diverged (lower --lr); nothing past the last checkpoint "
                        "was saved")


def end_of_step(args, step, save, stop, evaluate):
    """Checkpoint every --save-every steps, at the last step and on a stop request; call evaluate()
    (the script's metrics.json writer) every --eval-every steps and at the --eval-at steps. Raises Stopped
    after saving when Ctrl-C / SIGTERM asked the loop to stop."""
    scheduled = (args.eval_every and step % args.eval_every == 0) or step in getattr(args, "eval_at", ())
    due = bool(scheduled and step < args.iters and args.eval_samples
               and not stop.requested)                        # a stop request: save and go, no evaluation first
    if step % args.save_every == 0 or step == args.iters or stop.requested or due:
        save()                                   # the evaluation reads the checkpoint
    if due:
        with untouched_rng():       # the checkpoint above holds the RNG state: training must go on from it
            evaluate()
    if stop.requested:
        raise Stopped(f"stopped at step {step}; rerun the same command to resume")


def finished(args, step):
    """Whether the run in args.out was already finished (step == --iters, samples.png, and metrics.json's
    evaluation with --eval-samples at that step): rerunning it then does nothing but say so."""
    if step < args.iters or args.reevaluate or not os.path.isfile(os.path.join(args.out, "samples.png")):
        return False
    if args.eval_samples:
        path = os.path.join(args.out, "metrics.json")
        if not os.path.isfile(path):
            return False
        if read_json(path).get("evals", {}).get(str(args.eval_samples), {}).get("step") != step:
            return False
    print(f"{args.out} is finished (step {step}); nothing to do (--reevaluate redoes its samples and metrics; "
          f"python eval.py {args.out} --samples N evaluates it at another count)")
    return True


def finish(args, ckpt_path, make_generator, evaluate):
    """samples.png (class-by-seed grid) and, with --eval-samples, evaluate() (metrics.json) of a
    finished run. make_generator(ckpt, device) -> generate(noise, labels, renoise)."""
    ckpt = load_checkpoint(ckpt_path, args.device)
    if finished(args, ckpt["step"]):
        return ckpt_path
    # Training is over and saved: a scheduler's stop (SLURM's SIGUSR2 before a time limit, SIGTERM) lets the
    # samples and the evaluation finish rather than kill them and redo them in the next job. (Ctrl-C still
    # interrupts; a scheduler that does not wait ends the process with SIGKILL, and a rerun redoes this.)
    deferred = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        with autocast(args):
            class_grid(make_generator(ckpt, args.device), args.device, os.path.join(args.out, "samples.png"))
        if args.eval_samples:
            evaluate()
    finally:
        for s, handler in deferred.items():
            signal.signal(s, handler)
    print(f"done: {ckpt_path}")
    return ckpt_path


# --- Run directory and logging ---

def versions():
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "host": platform.node()}


# Resolved flags that may change when a run is resumed: where and how often it logs, saves and evaluates.
RESUMABLE = {"out", "dry_run", "device", "log_every", "save_every", "eval_every", "eval_at", "eval_samples", "compile",
             "preset_reason", "reevaluate", "teacher", "versions"}
_LOCKS = {}                     # run directory -> its open lock file: held for the life of the process


def lock_run_dir(out):
    """One writer per run directory: an exclusive flock on <out>/lock for the life of this process (taken
    once per process: in-process reruns, as tests and bench.py make, keep it). The kernel releases it when
    the process dies, however it dies, so a killed run never leaves it stuck."""
    import fcntl
    if os.path.realpath(out) in _LOCKS:
        return
    f = open(os.path.join(out, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise Busy(f"{out} is in use by {owner}; wait for it or give another --out") from None
    f.seek(0), f.truncate(), f.write(f"pid {os.getpid()} on {platform.node()}"), f.flush()
    _LOCKS[os.path.realpath(out)] = f


def run_dir_in_use(out):
    """Whether a live process holds <out>/lock (`lock_run_dir`): probed with a non-blocking flock that is
    released at once. This process's own lock does not count."""
    import fcntl
    path = os.path.join(out, "lock")
    if os.path.realpath(out) in _LOCKS or not os.path.isfile(path):
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


def read_json(path, *keys):
    """A JSON file a run left (config.json, metrics.json, ...) as a dict, which must hold `keys`;
    unreadable, not JSON (a file cut short), not an object or lacking a key is a one-line error naming the
    file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:80]}); restore or delete it (a run "
                        "directory whose config.json is gone starts afresh)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; restore or delete it")
    lacking = [k for k in keys if k not in data]
    if lacking:
        raise UserError(f"{path}: no {', '.join(lacking)}; delete the record or run directory that holds it and "
                        "rerun the grid to redo that run")
    return data


def write_json(path, data, indent=1, default=str):
    """Write `data` as JSON, atomically, like every file a run leaves: a temporary named by this process
    (path.<pid>.tmp: two writers of one file never share one; remove_stale_temporaries clears a dead
    writer's), then a rename. default: json.dump's (None: a value JSON cannot hold is an error)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, default=default)
    os.replace(tmp, path)


def _parse_line(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_log(path):
    """The rows of a run's log.jsonl (none when there is no file; a line cut short by a crash is skipped)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(_parse_line, f) if isinstance(r, dict)]


# Settings added after runs were recorded, at the value that reproduces what those runs did: left out of a
# run's settings at that value (its resume check here, its identity in ablate.py), so that earlier run
# directories resume and earlier records keep their names.
ADDED_LATER = {"init": "auto"}


def without_added_later(settings):
    return {k: v for k, v in settings.items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}


def _settings(config):
    out = without_added_later({k: v for k, v in json.loads(json.dumps(config, default=str)).items()
                               if k not in RESUMABLE})
    if out.get("init_path") == out.get("teacher_path"):   # resolved from init: a UNet teacher is its own init
        out.pop("init_path", None)
    return out


def prepare_run(args, method):
    """Create (or claim) the run directory and write config.json (every resolved flag plus library
    versions); return the path of its checkpoint. A run directory belongs to one method and one resolved
    configuration: another method, or other settings than those it was started with, is a one-line
    error before anything is written; so is a second live process on it (`lock_run_dir`). The first
    log line says which preset is in force."""
    try:
        os.makedirs(args.out, exist_ok=True)
        lock_run_dir(args.out)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create or write the run directory ({e.strerror})") from None
    path = os.path.join(args.out, "config.json")
    if os.path.isfile(path):
        old = read_json(path)
        if old.get("method") != method:
            raise UserError(f"--out {args.out} holds a {old.get('method')} run, not a {method} one; give another --out")
        new = _settings({"method": method, **vars(args)})
        old = _settings(old)
        diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        if diff:
            raise UserError(f"--out {args.out} was started with other settings ({'; '.join(diff[:4])}"
                            f"{'; ...' if len(diff) > 4 else ''}); resume it with its own, or give another --out")
    print(f"{method}: preset {args.preset} on {args.device} ({args.preset_reason}); run directory {args.out}")
    with open(path + ".tmp", "w") as f:  # atomic: a run killed here never leaves an empty config.json
        json.dump({"method": method, **vars(args), "versions": versions()}, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return os.path.join(args.out, "ckpt.pt")


class RunLog:
    """One printed line per interval and the same numbers appended to log.jsonl. Values may be device
    tensors: they are read (one host sync) only here, at log time. ms/it is over the last interval
    (so it excludes start-up once past the first line); peak GPU memory is added on CUDA."""

    def __init__(self, out_dir, total_steps, start_step=0):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.total, self.t_last, self.s_last = total_steps, time.time(), start_step
        self.t_print, self.acc = time.time(), {}
        if os.path.isfile(self.path):      # resumed: drop lines written after the checkpoint (they recur)
            with open(self.path) as f:
                every = f.readlines()
            # a line that is not JSON (cut short by a crash mid-write) is dropped with the rest past the checkpoint
            lines = [line for line in every if isinstance(_parse_line(line), dict)
                     and _parse_line(line).get("step", 0) <= start_step and line.endswith("\n")]
            if lines != every:                       # rewritten only when something is dropped
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(lines)
                os.replace(self.path + ".tmp", self.path)

    def tick(self, step, every=30.0):
        """Called every step: a short progress line when nothing has been printed for `every` seconds
        (long log intervals, slow machines), not written to log.jsonl."""
        now = time.time()
        if now - self.t_print >= every:
            self.t_print = now
            ms = 1000 * (now - self.t_last) / max(1, step - self.s_last)
            print(f"step {step}/{self.total} | {ms:.0f} ms/it | eta {hms(ms * (self.total - step) / 1000)}", flush=True)

    def add(self, **values):
        """Accumulate values (device tensors stay on the device) until the next write, which logs the
        mean of each over the times it was added: the steps actually taken, also in the first interval
        after a resume."""
        for k, v in values.items():
            total, n = self.acc.get(k, (0.0, 0))
            self.acc[k] = (total + (v.detach().float() if isinstance(v, torch.Tensor) else v), n + 1)

    def write(self, step, **values):
        """Log the means of what was added since the last write, then `values` as they are."""
        values = {**{k: total / n for k, (total, n) in self.acc.items()}, **values}
        self.acc = {}
        rec = {"step": step}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            rec[k] = float(v) if isinstance(v, (float, np.floating)) else v
        now = time.time()
        ms = 1000 * (now - self.t_last) / max(1, step - self.s_last)
        self.t_last, self.s_last = now, step
        if torch.cuda.is_available():
            rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        rec.update(ms_per_it=ms, eta_s=ms * (self.total - step) / 1000, time=now)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        body = " | ".join(f"{k} {_fmt(v)}" for k, v in rec.items()
                          if k not in ("step", "time", "ms_per_it", "eta_s"))
        print(f"step {step}/{self.total} | {body} | {ms:.0f} ms/it | eta {hms(rec['eta_s'])}", flush=True)
        self.t_print = now


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def hms(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def progress(iterable, desc, enabled=True, every=30.0):
    """tqdm on a terminal; elsewhere (a log file, a pipe, a SLURM job) one line at least every `every`
    seconds, so that a long phase is never silent."""
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, leave=False)
    return _every(iterable, desc, every)


def _every(iterable, desc, every):
    total = len(iterable) if hasattr(iterable, "__len__") else "?"
    t0 = last = time.time()
    for i, x in enumerate(iterable, 1):
        yield x
        if time.time() - last >= every:
            last = time.time()
            print(f"{desc}: {i}/{total} ({last - t0:.0f} s)", flush=True)


def save_grid(images, path, nrow=10):
    """Save images [N, 3, 32, 32] in [-1, 1] as a PNG grid, nrow per row."""
    import torchvision
    torchvision.utils.save_image((images.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=1)


@torch.no_grad()
def class_grid(generate, device, path, per_class=10, batch=100):
    """samples.png: rows are classes 0..9, columns seeds; sample i uses seed i and label i mod 10.
    generate(noise, labels, renoise) -> x̂_0 [B, 3, 32, 32]."""
    seeds = [c + NUM_CLASSES * k for c in range(NUM_CLASSES) for k in range(per_class)]
    out = []
    for i in range(0, len(seeds), batch):
        noise, labels, renoise = seeded_batch(seeds[i:i + batch], device)
        out.append(generate(noise, labels, renoise).float().cpu())
    save_grid(torch.cat(out), path, nrow=per_class)


def default_run_dir(method, args, settings="", seed=None):
    """runs/<method>-<preset>[-<data>][-<settings>]-s<seed>; <data> only when not the preset's own."""
    data = os.path.splitext(os.path.basename(args.data_dir.rstrip("/")))[0] if args.data_dir else args.dataset
    data = "" if data == args.preset_dataset else data
    seed = args.seed if seed is None else seed
    return os.path.join("runs", "-".join(x for x in (method, args.preset, data, settings, f"s{seed}") if x))


def compact(v):
    return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else (f"{v:g}" if isinstance(v, float) else str(v))
