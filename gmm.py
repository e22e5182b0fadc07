"""The exact benchmark (DESIGN §9): a class-conditional Gaussian mixture in 3x32x32 pixel space whose
density, denoiser and class posterior are known in closed form.

Every component k = (class y, index m) is a Gaussian with a low-rank-plus-isotropic covariance,

    x_0 | k ~ N(mu_k, Sigma_k),   Sigma_k = U_k diag(lam_k) U_k^T + s^2 I,   U_k [D, r] orthonormal, D = 3072,
    p(x_0 | y) = sum_m pi_{y,m} N(x_0; mu_{y,m}, Sigma_{y,m}),   p(y) = 1/10,

so under the forward process z_t = alpha_t x_0 + sigma_t eps each component stays Gaussian with the same
eigenvectors, N(alpha_t mu_k, U_k diag(alpha_t^2 lam_k) U_k^T + (alpha_t^2 s^2 + sigma_t^2) I), and with
d = z_t - alpha_t mu_k (Woodbury in the r-dimensional subspace: no D x D matrix is ever formed)

    log N(z; .)       = -1/2 [D log 2 pi + (D - r) log s'^2 + sum_j log(lam'_j + s'^2)
                              + (|d|^2 - sum_j lam'_j / (lam'_j + s'^2) (U_j . d)^2) / s'^2]
    E[x_0 | z_t, k]   = mu_k + alpha_t [c_perp d + U_k ((c - c_perp) * U_k^T d)],
                        c_j = (lam_j + s^2) / (alpha_t^2 (lam_j + s^2) + sigma_t^2),  c_perp = s^2 / (alpha_t^2 s^2 + sigma_t^2)
    E[x_0 | z_t, y]   = sum_m p(m | z_t, y) E[x_0 | z_t, (y, m)]       (y = 10, the null class: all 30 components)

in float64. ExactTeacher returns the v-prediction (alpha_t z - E[x_0 | z_t, y]) / sigma_t, so it
goes wherever a teacher network goes (common.denoise, classifier-free guidance included). This file is a
layer just above common.py, whose diffusion conventions it uses (runs.py loads its data, eval.py its metrics).

Design choices (ours): 10 classes x 3 components (weights 0.5, 0.3, 0.2, so that dropping a mode shows),
rank r = 6 with eigenvalues decaying by 0.7, isotropic s = 0.08. Means are a class colour plus a smooth
pattern; the covariance directions are smooth patterns too (2-D cosines of spatial frequency <= 3 per
axis, mixed per channel): low-frequency, image-like structure that a UNet's inductive bias suits. The
amplitudes keep a sample inside [-1, 1] with probability above 0.999 (test_oracles.py checks it), so that
thresholding is judged on the models, not on the data. Everything is made from `seed` (default 0).

Exact metrics of samples x conditioned on labels y (`GMM.metrics`; eval.py names them with their sample
count N):

    nll{N}_exact         mean -log p(x | y) / D, nats per dimension: the precision side (off-manifold samples
                         pay quadratically; samples shrunk towards a mode gain at most 1/2 nat per dimension)
    class_post{N}_exact  mean p(y | x) of the conditioned class: the CLIP-score analogue, no classifier
    mode_tv{N}_exact     per class, the total-variation distance between the samples' mean component
                         responsibilities p(m | x, y) and the weights pi_{y,m}, averaged over classes: the
                         recall / mode-dropping side (exact samples: sampling noise only, ~0.03 at N = 1000)
    fd_px{N}_exact       (and its three terms fd_px_mean, fd_px_struct, fd_px_iso, which sum to it)
                         per class, the Frechet distance |m - m_y|^2 + Tr(S + Sigma_y - 2 (S Sigma_y)^1/2)
                         between the samples' mean and covariance S and the exact class mean and covariance,
                         averaged over classes: the FID analogue in pixel space, no Inception. S is estimated
                         in the structure Sigma_y has (`GMM.frechet`): with N/10 << D samples a full sample
                         covariance would rank over-smoothed samples above exact ones.

NLL's own bias, kept as the metric is defined: like any likelihood of samples it rewards samples pulled
towards a mode (a Gaussian's density peaks at its mean), so over-smoothed samples, such as few-step
DDIM's, score BELOW the exact samples' value (the data's entropy per dimension, `python gmm.py`); read it
against that value, and with fd_px, which penalises lost variance.

    python gmm.py --samples 1000          # the exact metrics of exact samples (the floor of each metric)
"""

import argparse
import math

import numpy as np
import torch

from common import _bc, alpha_sigma

D = 3 * 32 * 32
NUM_CLASSES = 10                    # label NUM_CLASSES = the null class: p(x_0) over all components
ODE_STEPS = 256                     # steps of the exact teacher's reference ODE (`ode_grid`)


def _smooth_fields(rng, n, side=32, max_freq=3):
    """n smooth images [n, 3, side, side]: random combinations of 2-D cosines cos(pi f_h (h + 1/2) / side)
    cos(pi f_w (w + 1/2) / side), f_h, f_w <= max_freq, with independent coefficients per channel, each
    scaled to max |value| = 1."""
    f = np.arange(max_freq + 1)
    grid = (np.arange(side) + 0.5) / side
    basis = np.cos(np.pi * f[:, None] * grid[None])                       # [F, side]
    coef = rng.normal(size=(n, 3, len(f), len(f))) / (1 + f[:, None] + f[None, :])   # lower frequencies dominate
    fields = np.einsum("ncab,ah,bw->nchw", coef, basis, basis)
    return fields / np.abs(fields).reshape(n, -1).max(1)[:, None, None, None]


def _windows(rng, n, side, width):
    """n Gaussian bumps [n, 1, side, side] at random centres, std `width` pixels, max 1: the spatial window that
    gives each component of the second mixture its own subspace."""
    c = rng.uniform(0, side, size=(n, 2))
    g = np.arange(side) + 0.5
    return np.exp(-((g[None, :, None] - c[:, 0, None, None]) ** 2 + (g[None, None, :] - c[:, 1, None, None]) ** 2)
                  / (2 * width ** 2))[:, None]


def _blob(rng, side, share):
    """A mask [side, side] of about `share` of the pixels: where a smooth random field is highest."""
    field = _smooth_fields(rng, 1, side, 2)[0, 0]
    return field >= np.quantile(field, 1 - share)


class GMM:
    """The mixture's parameters (float64, on `device`) and its closed forms (module docstring).

    Construction (keyword arguments; `MIXTURES` names the two benchmarks): `classes` x `components` with
    weights `weights` (default 0.5, 0.3, 0.2), rank `rank` with eigenvalues decaying by `decay`, isotropic s.
    Means: mean_scale (colour_share class colour + (1 - colour_share) pattern); smaller colour_share puts
    classes closer together. Directions: smooth fields of spatial frequency <= max_freq, times a Gaussian
    window of std `window` pixels per component (0: none, so all components share one span). Saturation:
    components with index in `saturate` get, on a blob of `blob` of the pixels (all channels), the mean
    +-`sat_level` (sign alternating with the class), so their samples pile up at and beyond +-1 there."""

    def __init__(self, seed=0, classes=10, components=3, rank=6, s=0.08, mean_scale=0.3, std_scale=0.09,
                 side=32, device="cpu", weights=(0.5, 0.3, 0.2), decay=0.7, colour_share=0.6, max_freq=3,
                 window=0.0, saturate=(), blob=0.1, sat_level=1.0):
        rng = np.random.default_rng(seed)
        C, M, r, D = classes, components, rank, 3 * side * side       # side < 32: tiny mixtures for tests
        hue = 2 * np.pi * np.arange(C) / C
        colour = np.stack([np.cos(hue + 2 * np.pi * c / 3) for c in range(3)], 1)        # [C, 3] in [-1, 1]
        pattern = _smooth_fields(rng, C * M, side, max_freq).reshape(C, M, 3, side, side)
        mu = mean_scale * (colour_share * colour[:, None, :, None, None] + (1 - colour_share) * pattern)
        fields = _smooth_fields(rng, C * M * r, side, max_freq).reshape(C * M, r, 3, side, side)
        if window:
            fields = fields * _windows(rng, C * M, side, window)[:, None]
        U = np.linalg.qr(fields.reshape(C * M, r, D).transpose(0, 2, 1))[0]              # [CM, D, r]
        for c in range(C):
            for m in saturate:
                mu[c, m][:, _blob(rng, side, blob)] = sat_level * (1 if c % 2 == 0 else -1)
        lam = (std_scale ** 2 * D) * decay ** np.arange(r) / (decay ** np.arange(r)).sum()  # per-pixel std ~ std_scale
        weights = np.array(weights[:M]) / np.sum(weights[:M])
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)
        self.C, self.M, self.r, self.s2, self.D, self.shape = C, M, r, s * s, D, (3, side, side)
        self.mu = t(mu.reshape(C * M, D))                                                  # [K, D], K = C M
        self.U = t(U)                                                                      # [K, D, r]
        self.lam = t(np.broadcast_to(lam, (C * M, r)))                                     # [K, r]
        self.log_pi = t(np.log(np.tile(weights, C)))                                      # [K]: log p(m | y)
        self.cls = torch.arange(C, device=device).repeat_interleave(M)                     # [K]: class of k
        self.device = device

    # --- Sampling ---

    def sample(self, y, generator=None):
        """Exact samples x_0 | y, float64 [n, 3, 32, 32], for labels y [n] (long)."""
        y = torch.as_tensor(y, device=self.device)
        n = len(y)
        m = torch.multinomial(self.log_pi.view(self.C, self.M)[y].exp(), 1, generator=generator).squeeze(1)
        k = y * self.M + m
        xi = torch.randn(n, self.r, generator=generator, dtype=torch.float64, device=self.device)
        eps = torch.randn(n, self.D, generator=generator, dtype=torch.float64, device=self.device)
        x = self.mu[k] + math.sqrt(self.s2) * eps
        for c in torch.unique(k).tolist():                 # x += U_k (sqrt(lam_k) * xi), one matmul per component
            rows = (k == c).nonzero().squeeze(1)
            x[rows] += (self.lam[c].sqrt() * xi[rows]) @ self.U[c].T
        return x.view(n, *self.shape)

    # --- Component log-densities of noisy states, responsibilities, denoiser ---
    # Everything below is a few matrix products of z with the group's stacked [U_k | mu_k] columns (no
    # [B, K, D] tensor): with p_k = U_k^T z - alpha U_k^T mu_k and |d_k|^2 = |z|^2 - 2 alpha z.mu_k + alpha^2 |mu_k|^2,
    # d = z - alpha mu_k never has to be formed.

    def _group(self, y):
        """Components of label y (an int): its class's M, or all C M for the null class NUM_CLASSES."""
        return torch.arange(len(self.mu), device=self.device) if y == NUM_CLASSES else \
            torch.arange(y * self.M, (y + 1) * self.M, device=self.device)

    def _posterior(self, z, alpha, sigma, ks):
        """For states z [B, D] and components ks [K']: log p(k | y) + log N(z; alpha mu_k, alpha^2 Sigma_k +
        sigma^2 I) [B, K'] and the projections p_k = U_k^T (z - alpha mu_k) [B, K', r]. alpha, sigma [B]."""
        K, r = len(ks), self.r
        U, mu, lam = self.U[ks], self.mu[ks], self.lam[ks]                                # [K, D, r], [K, D], [K, r]
        a, s2t = alpha[:, None], (alpha ** 2 * self.s2 + sigma ** 2)[:, None]            # [B, 1]: s'^2
        zU = (z @ U.permute(1, 0, 2).reshape(self.D, K * r)).view(-1, K, r)                # U_k^T z
        proj = zU - a[..., None] * torch.einsum("kdr,kd->kr", U, mu)[None]
        d2 = z.square().sum(1, keepdim=True) - 2 * a * (z @ mu.T) + a ** 2 * mu.square().sum(1)[None]
        lam_t = a[..., None] ** 2 * lam[None]                                              # lam' [B, K, r]
        quad = (d2 - (lam_t / (lam_t + s2t[..., None]) * proj.square()).sum(-1)) / s2t
        logdet = (self.D - r) * s2t.log() + (lam_t + s2t[..., None]).log().sum(-1)
        log_pi = self.log_pi[ks] - (math.log(self.C) if K > self.M else 0.0)              # null class: pi / C
        return log_pi[None] - 0.5 * (self.D * math.log(2 * math.pi) + logdet + quad), proj

    @torch.no_grad()
    def denoise(self, z, alpha, sigma, y):
        """E[x_0 | z_t, y] (module docstring), float64 [B, 3, H, W]. z: [B, 3, H, W]; alpha, sigma: the
        schedule at t, [B] (common.alpha_sigma); y: [B] (NUM_CLASSES = unconditional). With weights
        w_k = p(k | z_t, y) summing to 1, sum_k w_k E[x_0 | z_t, k] =
        (1 - alpha^2 c_perp) sum_k w_k mu_k + alpha c_perp z + alpha sum_k w_k U_k ((c_k - c_perp) * p_k)."""
        B = z.shape[0]
        z = z.reshape(B, self.D).to(self.device, torch.float64)
        alpha, sigma = (torch.as_tensor(a, dtype=torch.float64, device=self.device).expand(B) for a in (alpha, sigma))
        y = torch.as_tensor(y, device=self.device)
        out = torch.empty_like(z)
        for label in torch.unique(y).tolist():
            rows, ks = (y == label).nonzero().squeeze(1), self._group(label)
            zb, a, sg = z[rows], alpha[rows], sigma[rows]
            logw, proj = self._posterior(zb, a, sg, ks)
            w = torch.softmax(logw, dim=1)                                                  # [b, K]
            lam_s = self.lam[ks][None] + self.s2                                            # lam_j + s^2
            c = lam_s / (a[:, None, None] ** 2 * lam_s + sg[:, None, None] ** 2)            # [b, K, r]
            c_perp = (self.s2 / (a ** 2 * self.s2 + sg ** 2))[:, None]                      # [b, 1]
            coef = (w[..., None] * (c - c_perp[..., None]) * proj).flatten(1)              # [b, K r]
            back = coef @ self.U[ks].permute(0, 2, 1).reshape(-1, self.D)                   # sum_k U_k (...)
            out[rows] = (1 - a[:, None] ** 2 * c_perp) * (w @ self.mu[ks]) + a[:, None] * (c_perp * zb + back)
        return out.view(B, *self.shape)

    # --- Densities of clean samples ---

    @torch.no_grad()
    def log_joint(self, x):
        """log p(m | y) + log N(x; mu_k, Sigma_k) for every component k = (y, m), float64 [n, K] (t = 0)."""
        x = x.reshape(len(x), self.D).to(self.device, torch.float64)
        one, zero = torch.ones(len(x), dtype=torch.float64, device=self.device), \
            torch.zeros(len(x), dtype=torch.float64, device=self.device)
        every = self._group(NUM_CLASSES)
        return self._posterior(x, one, zero, every)[0] + math.log(self.C)   # the null group used pi / C

    def log_prob(self, x, y):
        """log p(x | y) [n] (float64)."""
        lj = self.log_joint(x).view(len(x), self.C, self.M)
        return torch.logsumexp(lj[torch.arange(len(x)), torch.as_tensor(y, device=self.device)], dim=1)

    def class_posterior(self, x):
        """p(y | x) [n, 10] with p(y) = 1/10."""
        return torch.softmax(torch.logsumexp(self.log_joint(x).view(len(x), self.C, self.M), dim=2), dim=1)

    # --- Exact class statistics and metrics ---

    def class_stats(self, y):
        """Mean [D] and covariance factors of class y: Sigma_y = s^2 I + F F^T with F [D, M (r + 1)], from
        Sigma_y = sum_m pi_m (Sigma_m + (mu_m - m_y)(mu_m - m_y)^T)."""
        ks = self._group(y)
        pi = self.log_pi[ks].exp()
        mean = (pi[:, None] * self.mu[ks]).sum(0)
        low = self.U[ks] * (pi[:, None, None] * self.lam[ks][:, None, :]).sqrt()            # [M, D, r]
        spread = (pi.sqrt()[:, None] * (self.mu[ks] - mean)).T                                # [D, M]
        return mean, torch.cat([low.permute(1, 0, 2).reshape(self.D, -1), spread], 1)

    def frechet(self, x, y):
        """The Frechet distance of `frechet_terms`, their sum."""
        return sum(self.frechet_terms(x, y).values())

    def frechet_terms(self, x, y):
        """Frechet distance between the samples x of class y and the exact class statistics (m_y, Sigma_y):
        |m - m_y|^2 + Tr(S + Sigma_y - 2 (S^1/2 Sigma_y S^1/2)^1/2), with the samples' covariance S estimated
        in the structure Sigma_y itself has: in full inside the class's structured subspace Q (its components'
        directions and mean differences, q = span of F <= M (r + 1) = 21 dimensions), and as one isotropic
        variance v in the complement, where Sigma_y is s^2 I. Both are then block-diagonal in [Q, Q_perp], so

            FD = |m - m_y|^2 + FD_q(S_Q, Sigma_Q) + (D - q) (sqrt(v) - s)^2.

        (With N/10 samples per class, far fewer than D = 3072, the full sample covariance has rank < N/10:
        its Frechet distance is dominated by a bias of about 2 s^2 D (1 - sqrt(n / D)) that shrinks when the
        samples lose their isotropic detail, so it would rank over-smoothed samples above exact ones.)
        Returns the three terms: dict(mean=|m - m_y|^2, struct=FD_q (the full sample covariance inside Q,
        where N/10 samples suffice), iso=(D - q) (sqrt(v) - s)^2)."""
        x = x.reshape(len(x), self.D).to(self.device, torch.float64)
        mean, F = self.class_stats(y)
        Q = torch.linalg.svd(F, full_matrices=False)[0]
        Q = Q[:, :int((torch.linalg.svdvals(F) > 1e-9 * torch.linalg.svdvals(F)[0]).sum())]   # [D, q]
        q, m = Q.shape[1], x.mean(0)
        xc = x - m
        coords = xc @ Q                                                                      # [n, q]
        S_Q = coords.T @ coords / (len(x) - 1)
        v = ((xc.square().sum() - coords.square().sum()) / ((len(x) - 1) * (self.D - q)))   # complement variance
        FQ = Q.T @ F
        sigma_Q = self.s2 * torch.eye(q, dtype=torch.float64, device=self.device) + FQ @ FQ.T
        e, V = torch.linalg.eigh(S_Q)
        root = (V * e.clamp(min=0).sqrt()) @ V.T                                             # S_Q^1/2
        cross = torch.linalg.eigvalsh(root @ sigma_Q @ root).clamp(min=0).sqrt().sum()
        fd_q = torch.trace(S_Q) + torch.trace(sigma_Q) - 2 * cross
        return dict(mean=float((m - mean).square().sum()), struct=float(fd_q),
                    iso=float((self.D - q) * (v.sqrt() - math.sqrt(self.s2)) ** 2))

    def metrics(self, x, labels):
        """The exact metrics (module docstring) of samples x [N, 3, H, W] (float in [-1, 1]) conditioned on
        labels [N]: dict nll, class_post, mode_tv, fd_px."""
        x = x.double().to(self.device)
        y = torch.as_tensor(labels).cpu()
        lj = self.log_joint(x).view(len(x), self.C, self.M).cpu()
        rows = torch.arange(len(x))
        own = lj[rows, y]                                                      # log pi_m + log N(x; mu_(y,m), .)
        nll = -torch.logsumexp(own, dim=1) / self.D
        post = torch.softmax(torch.logsumexp(lj, dim=2), dim=1)[rows, y]
        resp = torch.softmax(own, dim=1)                                       # p(m | x, y)
        pi = self.log_pi.view(self.C, self.M).exp().cpu()
        classes = torch.unique(y).tolist()
        tv = [0.5 * float((resp[y == c].mean(0) - pi[c]).abs().sum()) for c in classes]
        fd = [self.frechet_terms(x[y == c], c) for c in classes if int((y == c).sum()) > 1]
        terms = {f"fd_px_{k}": float(np.mean([f[k] for f in fd])) for k in ("mean", "struct", "iso")}
        return dict(nll=float(nll.mean()), class_post=float(post.mean()), mode_tv=float(np.mean(tv)),
                    fd_px=float(np.mean([sum(f.values()) for f in fd])), **terms)


# The benchmarks by data-set name (--dataset). Each is fixed here before any run on it; a change makes a new name.
MIXTURES = {
    # The first benchmark: 3 components per class, rank 6, every direction a smooth field of frequency <= 3
    # (all components share one 48-dimensional span), samples inside [-1, 1] (thresholding never acts).
    "gmm": dict(seed=0),
    # The second: what DDIL targets can happen. 5 components per class, rank 10 and frequency <= 6, each
    # component's directions in its own spatial window, classes closer together (colour_share 0.3), and
    # saturation: the second component of every class (weight 0.25, a quarter of the images) has a blob of
    # 10 % of its pixels at +-1, as over- and under-exposed regions of photographs, so that x̂_0 estimates
    # overshoot the data range and thresholding has something to act on (`python gmm.py --mixture gmm2`
    # prints the shares).
    "gmm2": dict(seed=1, components=5, weights=(0.3, 0.25, 0.2, 0.15, 0.1), rank=10, decay=0.8, s=0.06,
                 mean_scale=0.35, std_scale=0.12, colour_share=0.3, max_freq=6, window=8.0, saturate=(1,),
                 blob=0.1, sat_level=1.0),
}

_CACHE = {}


def mixture(name="gmm", device="cpu"):
    """The benchmark mixture `name` (MIXTURES), made once per process and device."""
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r} (one of {', '.join(MIXTURES)})")
    key = (name, str(device))
    if key not in _CACHE:
        _CACHE[key] = GMM(**MIXTURES[name], device=device)
    return _CACHE[key]


build_mixture = mixture         # ExactTeacher's `mixture` argument shadows the function's name


def levels(x):
    """x quantised like an 8-bit image: round((clamp(x, -1, 1) + 1) 127.5), values 0..255 (x's dtype). Values
    beyond +-1 saturate at 0 and 255, as a camera's do."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def dataset(n, split="train", name="gmm"):
    """uint8 [n, 3, 32, 32] exact samples of mixture `name`, quantised like images (values beyond +-1
    saturate at 0 and 255, as a camera's do), and labels [n], balanced over the 10 classes; deterministic per
    split (train: generator seed 1, test: 2)."""
    g = torch.Generator().manual_seed(1 if split == "train" else 2)
    y = torch.arange(n) % NUM_CLASSES
    y = y[torch.randperm(n, generator=g)]
    x = torch.cat([mixture(name).sample(y[i:i + 512], g) for i in range(0, n, 512)])
    return levels(x).to(torch.uint8), y


def ode_grid(steps=ODE_STEPS, log_snr=(-10.0, 10.0)):
    """Times [1, ..., 0] of the exact teacher's reference ODE: DDIM steps uniform in log-SNR
    lambda = 2 log(alpha_t / sigma_t) over `log_snr` (where this mixture's variances live; uniform in t
    under-resolves the low-noise end, where DDIM's error on the smallest variance s^2 would stay at 3 %
    after 256 steps), then a last step to 0. t(lambda) inverts common's cosine schedule."""
    lo, hi = log_snr
    lam = [lo + (hi - lo) * i / (steps - 1) for i in range(steps)]
    return [1.0] + [2 / math.pi * math.atan(math.exp(-l / 2)) for l in lam[1:]] + [0.0]


class ExactTeacher(torch.nn.Module):
    """The exact benchmark's denoiser E[x_0 | z_t, y] (the closed form above, float64) as a v-prediction
    network, v = (alpha_t z - x̂_0) / sigma_t: it goes wherever a teacher network goes (`common.denoise` inverts
    it exactly, classifier-free guidance included; label NULL_CLASS is the unconditional mixture)."""

    def __init__(self, name="gmm", mixture=None):
        super().__init__()
        self.mixture = mixture if mixture is not None else build_mixture(name)

    def forward(self, z, t, y):
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(z.shape[0])
        alpha, sigma = alpha_sigma(t)
        x0 = self.mixture.denoise(z, alpha, sigma, y).to(z.device)
        alpha, sigma = (_bc(a.double().to(z.device), z) for a in (alpha, sigma))
        return ((alpha * z.double() - x0) / sigma).to(z.dtype)


def saturation(x):
    """Shares of a float batch x in [-1, 1] scale: pixel values beyond [-1, 1], values at 0 or 255 once
    quantised, values within 5 levels of them, and samples with any value beyond [-1, 1]."""
    q = levels(x)
    edge = torch.minimum(q, 255 - q)
    return dict(px_out=float((x.abs() > 1).double().mean()), px_at_0_255=float((edge == 0).double().mean()),
                px_within_5=float((edge <= 5).double().mean()),
                samples_out=float((x.abs() > 1).flatten(1).any(1).double().mean()))


def main(argv=None):
    p = argparse.ArgumentParser(description="The exact metrics of exact samples of the mixture: each metric's floor.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mixture", choices=list(MIXTURES), default="gmm", help="which benchmark mixture")
    p.add_argument("--samples", type=int, default=1000, help="N samples (labels i mod 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(args.samples) % NUM_CLASSES
    mix = mixture(args.mixture)
    x = mix.sample(labels, g)
    q = levels(x) / 127.5 - 1                                                # quantised, as eval.py scores
    out = mix.metrics(q, labels)
    print(f"{args.mixture}: exact samples, N = {args.samples}: " + " | ".join(f"{k} {v:.4g}" for k, v in out.items()))
    print("saturation: " + " | ".join(f"{k} {v:.4f}" for k, v in saturation(x).items()))
    return out


if __name__ == "__main__":
    main()
