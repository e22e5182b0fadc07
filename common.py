"""What every DDIL script shares, and nothing method-specific (DESIGN.md §3, §4, §7).

DDIL: Garrepalli, Mahajan, Hayat, Porikli, "DDIL: Improved Diffusion Distillation with Imitation
Learning", arXiv 2410.11971. A method's loss never lives here; this file holds the diffusion
conventions, the sampler loop that training rollouts and evaluation share, the DDIL input sampler,
data, EMA, seeding, checkpoints and the run directory.

Range contract (stated once, used everywhere):
    images  float [B, 3, 32, 32] in [-1, 1] (uint8 [N, 3, 32, 32] while stored)
    labels  long  [B] in {0..9}; NULL_CLASS = 10 means "unconditional" (classifier-free guidance)
    time    float t in [0, 1], t = 1 is pure noise; alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2)
    network output v = alpha_t * eps - sigma_t * x_0  (v-prediction)
"""

import argparse
import errno
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

NUM_CLASSES = 10
NULL_CLASS = 10
SOURCES = ("fwd", "teacher", "student")     # β_frwd, β_teach_bckwrd, β_student_bckwrd
# log-SNR = 2 log(alpha/sigma) = -2 log tan(pi t / 2) stays in [-20, 20]  <=>  t in [T_MIN, T_MAX].
T_MIN = 2 / math.pi * math.atan(math.exp(-10.0))
T_MAX = 1.0 - T_MIN


class UserError(Exception):
    """Bad input from the user: printed as one line by `run_main`, never as a traceback."""


class Busy(UserError):
    """The run directory is in use by another live process: exit status 75 (EX_TEMPFAIL), which ablate.py
    reads as "running elsewhere", not as a failure."""


class Stopped(Exception):
    """A run stopped by Ctrl-C / SIGTERM after saving its checkpoint: `run_main` exits with status 130, as
    shells expect, so that `python ddil_pd.py && python eval.py ...` does not go on."""


# --- Diffusion conventions (DESIGN §3) ---

def _bc(a, x):
    """Broadcast a per-example [B] (or scalar) tensor against x [B, ...]."""
    return a.reshape(-1, *([1] * (x.ndim - 1))) if a.ndim else a


def alpha_sigma(t):
    """Variance-preserving cosine schedule: (alpha_t, sigma_t) = (cos(pi t/2), sin(pi t/2)), t clipped
    to [T_MIN, T_MAX] so that log-SNR stays within [-20, 20]. Same shape as t."""
    t = torch.as_tensor(t, dtype=torch.float32).clamp(T_MIN, T_MAX)
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def to_x0_eps(z, t, v):
    """v-parameterisation -> (x̂_0, ε̂):  x̂_0 = alpha_t z - sigma_t v,  ε̂ = sigma_t z + alpha_t v."""
    alpha_t, sigma_t = (_bc(a.to(z.device), z) for a in alpha_sigma(t))
    return alpha_t * z - sigma_t * v, sigma_t * z + alpha_t * v


def ddim_step(z, t, s, x0, eps=None):
    """DDIM step t -> s:  z_s = alpha_s x̂_0 + sigma_s ε̂.

    With eps=None, ε̂ = (z_t - alpha_t x̂_0) / sigma_t is recomputed from z_t and the (possibly
    thresholded) x̂_0, so the step stays on the line through z_t (Song et al. 2021, eq. 12 with
    sigma = 0). Pass fresh noise as eps for the re-noising step of consistency / DMD2 samplers."""
    alpha_s, sigma_s = (_bc(a.to(z.device), z) for a in alpha_sigma(s))
    if eps is None:
        alpha_t, sigma_t = (_bc(a.to(z.device), z) for a in alpha_sigma(t))
        eps = (z - alpha_t * x0) / sigma_t
    return alpha_s * x0 + sigma_s * eps


def threshold(x0, mode, p=0.995):
    """Threshold x̂_0 to the data range (the reflected-diffusion view of DDIL).

    mode None  -> x0 unchanged
    'static'   -> clamp(x0, -1, 1)
    'dynamic'  -> Imagen (Saharia et al. 2022, §2.3): s = max(1, quantile(|x0|, p)) per sample,
                  clamp(x0, -s, s) / s."""
    if mode is None:
        return x0
    if mode == "static":
        return x0.clamp(-1, 1)
    if mode == "dynamic":
        s = torch.quantile(x0.abs().flatten(1).float(), p, dim=1).clamp(min=1.0)
        s = _bc(s, x0)
        return x0.clamp(-s, s) / s
    raise ValueError(f"unknown threshold mode {mode!r}")


def out_of_range(x0):
    """Fraction of x̂_0 pixels outside [-1, 1] (what thresholding would clip); a device scalar."""
    return (x0.detach().abs() > 1).float().mean()


def denoise(net, z, t, y, guidance=1.0, clip=(None, 0.995)):
    """x̂_0 of a v-prediction network at (z_t, t, y), with classifier-free guidance on v
    (v̂ = v̂_uncond + w (v̂_cond - v̂_uncond); w = 1 is no guidance) and thresholding
    `clip = (mode, percentile)`. z: [B, 3, 32, 32]; t: float or [B]; y: [B]. Returns fp32 x̂_0."""
    t = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(z.shape[0])
    if guidance == 1.0:
        v = net(z, t, y).float()
    else:
        y_null = torch.full_like(y, NULL_CLASS)
        v_cond, v_uncond = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
    x0, _ = to_x0_eps(z, t, v)
    return threshold(x0, *clip)


class ExactTeacher(torch.nn.Module):
    """The exact benchmark's denoiser E[x_0 | z_t, y] (gmm.py, closed form, float64) as a v-prediction
    network, v = (alpha_t z - x̂_0) / sigma_t: it goes wherever a teacher network goes (`denoise` inverts
    it exactly, classifier-free guidance included; label NULL_CLASS is the unconditional mixture)."""

    def __init__(self, seed=0, mixture=None):
        super().__init__()
        self.mixture = mixture or gmm.mixture(seed)

    def forward(self, z, t, y):
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(z.shape[0])
        alpha, sigma = alpha_sigma(t)
        x0 = self.mixture.denoise(z, alpha, sigma, y).to(z.device)
        alpha, sigma = (_bc(a.double().to(z.device), z) for a in (alpha, sigma))
        return ((alpha * z.double() - x0) / sigma).to(z.dtype)


# --- Sampler loop: shared by evaluation and by the DDIL rollouts, so they cannot drift ---

def sampler_step(model_fn, z, t, s, y, renoise=None):
    """One transition t -> s. model_fn(z, t, y) -> x̂_0 (guidance and thresholding already inside).
    renoise=None: DDIM (deterministic); renoise(z) -> fresh ε: x̂_0 re-noised to s (consistency
    models / DMD2 multistep). The last step (s = 0) returns x̂_0 itself."""
    x0 = model_fn(z, t, y)
    if s <= 0:
        return x0
    return ddim_step(z, t, s, x0, None if renoise is None else renoise(z))


@torch.no_grad()
def sample(model_fn, noise, labels, times, renoise=None):
    """Run the sampler along `times` (descending, e.g. [1, 0.75, 0.5, 0.25, 0]) from z_{times[0]} =
    noise. Returns x̂_0 [B, 3, 32, 32] when times ends at 0, else z_{times[-1]}."""
    z = noise
    for t, s in zip(times[:-1], times[1:]):
        z = sampler_step(model_fn, z, float(t), float(s), labels, renoise)
    return z


def fine_grid(t, s, steps_per_unit, min_steps=1):
    """[t, ..., s] split into max(min_steps, ceil(steps_per_unit (t - s))) equal DDIM steps: a teacher
    grid that contains every student grid time (DESIGN §4, --teacher-rollout-steps)."""
    n = max(min_steps, math.ceil(steps_per_unit * (t - s) - 1e-6))
    return [t + (s - t) * i / n for i in range(n + 1)]


def _policy_step(student_fn, teacher_fn, z, y, t, s, expert_prob, renoise, teacher_steps):
    """One transition t -> s of every example of z under DAgger's mixture policy
    pi = p pi* + (1 - p) pi_hat (Ross et al. 2011): the teacher (DDIM on a finer grid, `teacher_steps`
    per unit time, and at least two per student step: the expert is finer than the learner) with
    probability p = expert_prob, otherwise the student's own sampler step."""
    teacher = lambda z, y: sample(teacher_fn, z, y, fine_grid(t, s, teacher_steps, min_steps=2))
    student = lambda z, y: sampler_step(student_fn, z, t, s, y, renoise)
    if expert_prob >= 1.0:
        return teacher(z, y)
    if expert_prob <= 0.0:
        return student(z, y)
    by_teacher = torch.rand(len(z), device=z.device) < expert_prob
    out = z.clone()
    for idx, step in ((by_teacher.nonzero().squeeze(1), teacher), ((~by_teacher).nonzero().squeeze(1), student)):
        if len(idx):
            out[idx] = step(z[idx], y[idx]).to(out.dtype)
    return out


@torch.no_grad()
def rollout(student_fn, teacher_fn, noise, labels, times, j, expert_prob=0.0, renoise=None, teacher_steps=32):
    """Backward states for DDIL: example b runs j[b] transitions of the grid `times` from pure noise
    and ends at z_{times[j[b]]} (j = 0 returns the noise). expert_prob = 1 gives β_teach_bckwrd states,
    0 gives β_student_bckwrd states, in between DAgger's mixture (`_policy_step`)."""
    z = noise.clone()
    for i in range(int(j.max()) if len(j) else 0):
        active = (j > i).nonzero().squeeze(1)
        z[active] = _policy_step(student_fn, teacher_fn, z[active], labels[active], float(times[i]),
                                 float(times[i + 1]), expert_prob, renoise, teacher_steps).to(z.dtype)
    return z


@torch.no_grad()
def trajectory(student_fn, teacher_fn, noise, labels, times, expert_prob=0.0, renoise=None, teacher_steps=32):
    """Whole backward trajectories from pure noise: the states at times[0..K-1] (K = len(times) - 1),
    [K, B, 3, 32, 32]. Each trajectory yields one state per grid time, so j is uniform over the grid as
    in `rollout`, at a cost per state of (K - 1) / K transitions instead of (K - 1) / 2 on average, in
    batches large enough to keep a GPU busy. The replay buffer refills itself this way."""
    states = [noise]
    for t, s in zip(times[:-2], times[1:-1]):
        states.append(_policy_step(student_fn, teacher_fn, states[-1], labels, float(t), float(s), expert_prob,
                                   renoise, teacher_steps).to(noise.dtype))
    return torch.stack(states)


class StackedRandomGenerator:
    """One torch.Generator per example, seeded by its index, so that sample i is drawn from seed i
    whatever the batch size (EDM's generate.py)."""

    def __init__(self, device, seeds):
        self.device = device
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size):
        return torch.stack([torch.randn(size, generator=g, device=self.device) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape[1:]).to(x.dtype)


def seeded_batch(seeds, device):
    """Noise z_1 [B, 3, 32, 32], labels (seed mod 10) and a per-example fresh-noise function for seeds."""
    rng = StackedRandomGenerator(device, seeds)
    labels = torch.tensor([int(s) % NUM_CLASSES for s in seeds], device=device)
    return rng.randn((3, 32, 32)), labels, rng.randn_like


# --- The DDIL input sampler (DESIGN §4) ---

def prior_weight(schedule, progress, warmup):
    """Interpolation weight u in [0, 1] from --prior-start (u = 0) to the end priors (u = 1)."""
    if schedule == "constant":
        return 1.0
    x = 1.0 if warmup <= 0 else min(1.0, progress / warmup)
    if schedule == "linear":
        return x
    if schedule == "cosine":
        return 0.5 * (1 - math.cos(math.pi * x))
    if schedule == "step":
        return 1.0 if x >= 1.0 else 0.0
    raise ValueError(f"unknown prior schedule {schedule!r}")


class DDILSampler:
    """Draws each training batch (x_t, t, y, source) from the DDIL mixture (DESIGN §4):

        source ~ Categorical(β_frwd, β_teach_bckwrd, β_student_bckwrd)   (priors at training progress)
        fwd:     x_t = alpha_t x_0 + sigma_t ε,  x_0 from data, t from the method's forward times
        teacher: the teacher's DDIM sampler from z_1 ~ N(0, I) down to a student grid time (no grad)
        student: the student's own sampler for j ~ U{0..K-1} steps (DAgger mixture if expert_prob > 0)

    Examples come back grouped by source (fwd, teacher, student); shuffle before slicing a batch.
    One draw is one training iteration: `self.it` counts them and is the clock of a state's age.

    buffer_size = 0: every backward state is a fresh rollout to its own random j (`rollout`).
    buffer_size > 0: a FIFO replay buffer per source of whole trajectories (`trajectory`: one state at
    every grid time, so every grid time is always served, high noise included), holding at most
    buffer_size // K of them. It takes in, on average, `refresh` fresh states per backward state
    served, rolled out `chunk` trajectories at a time: dozens of sequential teacher calls on a
    handful of states per iteration would leave a GPU idle. (This departs from "refresh a fraction of
    every batch" for speed.) DAgger trains on the current policy's states, so student states older
    than `max_age` iterations are dropped before serving (0 = no bound), and student refills are
    made small enough (at most rate * max_age / 2 trajectories, rate = the refresh credit per
    iteration) that at least two land within every age window. The buffer is in `state_dict()`,
    stored in float16 (the states are N(0, 1)-scale; half precision is 5e-4 relative)."""

    def __init__(self, data, priors, prior_start=(1.0, 0.0, 0.0), schedule="constant", warmup=0.3,
                 buffer_size=0, refresh=0.25, expert_prob=0.0, teacher_steps=32, chunk=8, max_age=0):
        self.data = data
        self.end = torch.tensor(priors, dtype=torch.float64)
        self.start = torch.tensor(prior_start, dtype=torch.float64)
        self.schedule, self.warmup = schedule, warmup
        self.buffer_size, self.refresh, self.chunk, self.max_age = buffer_size, refresh, chunk, max_age
        self.expert_prob, self.teacher_steps = expert_prob, teacher_steps
        self.it = 0
        self.reset()
        self._age_stats()

    def reset(self):
        """Forget buffered states (e.g. when the student's grid changes between PD rounds)."""
        self.buffers = {"teacher": None, "student": None}

    def priors(self, progress):
        """(β_frwd, β_teach_bckwrd, β_student_bckwrd) at training progress in [0, 1]; sums to 1."""
        u = prior_weight(self.schedule, progress, self.warmup)
        p = (1 - u) * self.start / self.start.sum() + u * self.end / self.end.sum()
        return p / p.sum()

    def draw(self, n, progress, fwd_times, times, student_fn, teacher_fn, renoise=None):
        """A batch of n inputs. fwd_times: candidate t for forward states; times: the student's
        sampling grid (descending, times[0] = 1, times[-1] = 0); student_fn / teacher_fn(z, t, y) -> x̂_0
        and renoise as in `sampler_step`. Returns dict x_t, t, y (device) and source (long: 0/1/2)."""
        counts = torch.bincount(torch.multinomial(self.priors(progress), n, replacement=True), minlength=3)
        n_fwd, n_teacher, n_student = counts.tolist()
        x0, y = self.data.batch(n_fwd)
        t = fwd_times.to(x0.device)[torch.randint(len(fwd_times), (n_fwd,), device=x0.device)]
        alpha_t, sigma_t = (_bc(a.to(x0.device), x0) for a in alpha_sigma(t))
        parts = [(alpha_t * x0 + sigma_t * torch.randn_like(x0), t, y)]
        # The expert's grid is at least twice as fine as the student's (DESIGN §4): in PD's first round
        # (n = 32) a 32-per-unit teacher grid would be the student's own grid, one DDIM step per step.
        teacher_steps = max(self.teacher_steps, 2 * (len(times) - 1))
        for name, m, p in (("teacher", n_teacher, 1.0), ("student", n_student, self.expert_prob)):
            rollout_fns = (student_fn, teacher_fn, p, renoise, teacher_steps)
            z, t, y, age = (self._fresh(m, times, *rollout_fns) if self.buffer_size == 0 else
                            self._from_buffer(name, m, times, *rollout_fns))
            parts.append((z, t, y))
            if m:
                s = self.ages[name]
                s[0], s[1], s[2] = s[0] + float(age.float().sum()), s[1] + m, max(s[2], int(age.max()))
        self.it += 1
        x_t, t, y = (torch.cat(v) for v in zip(*parts))
        source = torch.repeat_interleave(torch.arange(3, device=x_t.device), counts.to(x_t.device))
        return dict(x_t=x_t, t=t, y=y, source=source)

    def _age_stats(self):
        """{source: [sum of ages, states served, max age]} since the last `log_stats`."""
        self.ages = {"teacher": [0.0, 0, 0], "student": [0.0, 0, 0]}

    def log_stats(self):
        """Mean and maximum age, in iterations, of the backward states served per source since the
        last call (age_mean_student, age_max_student, ...; 0 for fresh rollouts), for log.jsonl."""
        out = {}
        for name, (total, count, oldest) in self.ages.items():
            if count:
                out[f"age_mean_{name}"], out[f"age_max_{name}"] = total / count, oldest
        self._age_stats()
        return out

    def _fresh(self, m, times, student_fn, teacher_fn, expert_prob, renoise, teacher_steps):
        """m backward states, each rolled out to its own j ~ U{0..K-1}; all of age 0."""
        _, y = self.data.batch(m)                                       # labels follow the data's classes
        j = torch.randint(len(times) - 1, (m,), device=y.device)
        noise = torch.randn(m, 3, 32, 32, device=y.device)
        z = rollout(student_fn, teacher_fn, noise, y, times, j, expert_prob, renoise, teacher_steps)
        t = torch.as_tensor(times, dtype=torch.float32, device=y.device)[j]
        return z.float(), t, y, torch.zeros_like(j)

    def _from_buffer(self, name, m, times, student_fn, teacher_fn, expert_prob, renoise, teacher_steps):
        """m backward states drawn uniformly from the source's live (trajectory, grid time) pairs, after
        dropping student trajectories older than max_age and refilling with whole trajectories when the
        buffer holds fewer than m states or has earned a chunk of credit."""
        if m == 0:
            return self._fresh(0, times, student_fn, teacher_fn, expert_prob, renoise, teacher_steps)
        K = len(times) - 1
        C = max(1, self.buffer_size // K)                               # capacity in trajectories
        buf = self.buffers[name]
        if buf is None or buf["K"] != K:
            buf = self.buffers[name] = dict(z=None, y=None, born=None, K=K, ptr=0, n=0, credit=0.0)
        rate = self.refresh * m / K                                     # trajectories earned per draw
        buf["credit"] += rate
        chunk = min(self.chunk, C)
        if name == "student" and self.max_age:
            live = self._live(buf)
            buf["n"] -= int((self.it - buf["born"][live] > self.max_age).sum()) if buf["n"] else 0
            chunk = max(1, min(chunk, int(rate * self.max_age / 2)))     # >= 2 refills per age window
        new = chunk * int(buf["credit"] // chunk)                       # the credit, in whole chunks
        short = math.ceil(m / K) - buf["n"]                             # too few states to serve m
        if short > 0:
            new = max(new, short, chunk)
        if new:
            new = min(new, C)
            _, y = self.data.batch(new)
            noise = torch.randn(new, 3, 32, 32, device=y.device)
            z = trajectory(student_fn, teacher_fn, noise, y, times, expert_prob, renoise, teacher_steps)
            self._push(buf, z.transpose(0, 1), y, C)                    # [new, K, 3, 32, 32]
            buf["credit"] = max(0.0, buf["credit"] - new)
        live = self._live(buf)
        i = live[torch.randint(buf["n"], (m,), device=live.device)]     # trajectory
        k = torch.randint(K, (m,), device=live.device)                  # grid time
        t = torch.as_tensor(times[:K], dtype=torch.float32, device=buf["y"].device)[k]
        return buf["z"][i, k].float(), t, buf["y"][i], self.it - buf["born"][i]

    @staticmethod
    def _live(buf):
        """Indices of the live trajectories in the ring, oldest first."""
        if buf["y"] is None:
            return torch.zeros(0, dtype=torch.long)
        return (buf["ptr"] - buf["n"] + torch.arange(buf["n"], device=buf["y"].device)) % len(buf["y"])

    def _push(self, buf, z, y, C):
        """Append trajectories z [B, K, ...] (B <= C) to the FIFO ring; the oldest are overwritten."""
        if buf["z"] is None:
            buf.update(z=z.new_zeros(C, *z.shape[1:], dtype=torch.float16), y=y.new_zeros(C),
                       born=y.new_zeros(C, dtype=torch.long))
        idx = (buf["ptr"] + torch.arange(len(z), device=z.device)) % C
        buf["z"][idx], buf["y"][idx], buf["born"][idx] = z.half(), y, self.it
        buf["ptr"] = (buf["ptr"] + len(z)) % C
        buf["n"] = min(C, buf["n"] + len(z))

    def state_dict(self):
        """The draw count and the buffers' live trajectories, oldest first (a half-empty buffer costs
        half the bytes)."""
        buffers = {}
        for name, b in self.buffers.items():
            live = None if b is None or b["z"] is None else self._live(b)
            buffers[name] = None if b is None else {
                **b, **{k: None if live is None else b[k][live.to(b[k].device)] for k in ("z", "y", "born")}}
        return {"it": self.it, "buffers": buffers}

    def load_state_dict(self, state):
        self.reset()
        self.it = state["it"]
        for name, b in state["buffers"].items():
            if b is None:
                continue
            buf = self.buffers[name] = dict(b, z=None, y=None, born=None, ptr=0, n=0)
            if b["z"] is not None:
                C = max(1, self.buffer_size // b["K"])
                self._push(buf, b["z"], b["y"], C)
                buf["born"][:b["n"]] = b["born"]


class SourceStats:
    """Per-source sums of a per-example quantity, accumulated on the device (no host sync)."""

    def __init__(self, device):
        self.sums, self.counts = torch.zeros(3, device=device), torch.zeros(3, device=device)

    def add(self, values, source):
        self.sums.index_add_(0, source, values.detach().float())
        self.counts.index_add_(0, source, torch.ones_like(values, dtype=torch.float32))

    def summary(self, prefix):
        """{prefix_fwd: mean, ...} for sources seen, and the realised mix {frac_fwd: ...}."""
        sums, counts = self.sums.tolist(), self.counts.tolist()
        total = max(1.0, sum(counts))
        out = {f"{prefix}_{s}": sums[i] / counts[i] for i, s in enumerate(SOURCES) if counts[i] > 0}
        out.update({f"frac_{s}": counts[i] / total for i, s in enumerate(SOURCES)})
        self.sums.zero_(), self.counts.zero_()
        return out


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


def load_images(dataset, data_dir=None, split="train", limit=None):
    """uint8 [N, 3, 32, 32] and labels [N] as torch tensors on the CPU (DESIGN §8)."""
    if data_dir:
        if not os.path.exists(data_dir):
            raise UserError(f"--data-dir {data_dir}: no such file or directory")
        x, y = image_folder(data_dir, split, limit)
    elif dataset == "synthetic":
        x, y = synthetic_dataset(5000 if split == "train" else 1000, seed=0 if split == "train" else 1)
    elif dataset == "gmm":        # the exact benchmark's mixture (gmm.py), sampled once, quantised like images
        x, y = (v.numpy() for v in gmm.dataset(50_000 if split == "train" else 10_000, split))
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
        raise UserError(f"--dataset {dataset}: unknown (choose cifar10, synthetic or gmm, or give --data-dir)")
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


# --- Networks: EMA, teacher loading, speed settings ---

@torch.no_grad()
def ema_update(ema, net, decay, step):
    """ema <- lerp(ema, net, 1 - d) with d = min(decay, (1 + step) / (10 + step)) (a warm-up that
    keeps short runs from averaging in the initialisation)."""
    d = min(decay, (1 + step) / (10 + step))
    e, p = list(ema.parameters()), list(net.parameters())
    torch._foreach_lerp_(e, p, 1 - d)
    for b_e, b_p in zip(ema.buffers(), net.buffers()):
        b_e.copy_(b_p)


def build_unet(config, device):
    from unet import UNet
    net = UNet(**config).to(device)
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else net


def load_teacher(path, device):
    """The teacher's EMA network, frozen, in eval mode, and its checkpoint."""
    ckpt = load_checkpoint(path, device)
    if "unet" not in ckpt or "ema" not in ckpt.get("nets", {}):
        raise UserError(f"--teacher {path}: not a teacher checkpoint (no 'unet' config / 'ema' weights)")
    if "model" not in ckpt["nets"]:           # students keep "student" (and critic / target / round teacher)
        raise UserError(f"--teacher {path}: a distilled student's checkpoint (networks {', '.join(ckpt['nets'])}), "
                        "not a teacher's; give a teacher.py checkpoint")
    net = build_unet(ckpt["unet"], device)
    net.load_state_dict(ckpt["nets"]["ema"])
    return net.eval().requires_grad_(False), ckpt


def teacher_checkpoint(args):
    """--teacher PATH checked, or for --teacher auto the default teacher run's checkpoint path
    (runs/teacher-<preset>[-<data>]-s0/ckpt.pt, what `python teacher.py --preset P` writes) and whether
    that run has finished. The method scripts train a missing one with teacher.py (`ensure_teacher`)."""
    if args.teacher != "auto":
        if not os.path.isfile(args.teacher):
            raise UserError(f"--teacher {args.teacher}: no such checkpoint (train one with teacher.py, or --teacher auto)")
        return args.teacher, True
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
    (the script's metrics.json writer) every --eval-every steps. Raises Stopped after saving when
    Ctrl-C / SIGTERM asked the loop to stop."""
    due = bool(args.eval_every and step % args.eval_every == 0 and step < args.iters and args.eval_samples)
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
    with autocast(args):
        class_grid(make_generator(ckpt, args.device), args.device, os.path.join(args.out, "samples.png"))
    if args.eval_samples:
        evaluate()
    print(f"done: {ckpt_path}")
    return ckpt_path


# --- Run directory and logging ---

def versions():
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "host": platform.node()}


# Resolved flags that may change when a run is resumed: where and how often it logs, saves and evaluates.
RESUMABLE = {"out", "dry_run", "device", "log_every", "save_every", "eval_every", "eval_samples", "compile",
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


def read_json(path):
    """A JSON file a run left (config.json, metrics.json, ...) as a dict; unreadable, not JSON (a file cut
    short) or not an object is a one-line error naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:80]}); restore or delete it (a run "
                        "directory whose config.json is gone starts afresh)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; restore or delete it")
    return data


def _parse_line(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _settings(config):
    return {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in RESUMABLE}


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
            print(f"step {step}/{self.total} | {ms:.0f} ms/it | eta {_hms(ms * (self.total - step) / 1000)}", flush=True)

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
        print(f"step {step}/{self.total} | {body} | {ms:.0f} ms/it | eta {_hms(rec['eta_s'])}", flush=True)
        self.t_print = now


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _hms(seconds):
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


def _weight(s):
    try:
        w = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(w) or w < 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a finite non-negative weight")
    return w


def _triple(s):
    parts = s.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{s!r} must be three comma-separated weights F,T,S")
    w = [_weight(p) for p in parts]
    if sum(w) == 0:
        raise argparse.ArgumentTypeError(f"{s!r}: the weights sum to zero")
    return w


def _fraction(s):
    w = _weight(s)
    if w > 1:
        raise argparse.ArgumentTypeError(f"{s!r} must lie in [0, 1]")
    return w


def _positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive integer")
    return n


def _number(s):
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} must be a finite number")
    return x


def _positive(s):
    """A finite number > 0 (learning rates, scales): nan and inf are refused, not trained with."""
    x = _number(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be > 0")
    return x


def _nonnegative(s):
    """A finite number >= 0 (0 usually switches the thing off)."""
    x = _number(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 0")
    return x


def _seed(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if not 0 <= n < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{s!r} must lie in [0, 2**63)")
    return n


def _int_list(s):
    """'1,2,2' -> (1, 2, 2): positive integers, comma-separated."""
    try:
        v = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    if not v or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: every entry must be a positive integer")
    return v


def _count(s):
    return 0 if s.strip() == "0" else _positive_int(s)


def preset_help(p, presets):
    """Name each preset's value in the --help of every flag it sets, '(preset: smoke 80, gmm 300, cifar10
    40000)', so that the help shows the values a run will use. Call after the last add_argument."""
    table = {name: {**values, **(DDIL_PRESETS.get(name, {}) if any(a.dest == "max_age" for a in p._actions) else {})}
             for name, values in presets.items()}
    for a in p._actions:
        vals = [f"{name} {_compact(v)}" for name, v in ((n, t.get(a.dest)) for n, t in table.items()) if v is not None]
        if vals and a.default is None and a.help:
            a.help = a.help.replace(" (preset)", "") + f" (preset: {', '.join(vals)})"
    return p


def add_common_args(p, student=True):
    """Flags every script shares (DESIGN §7). Defaults of None come from the --preset."""
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=["auto", "smoke", "cifar10", "gmm"], default="auto",
                   help="smoke: tiny UNet on the synthetic set, minutes on a CPU; cifar10: the single-GPU "
                        "configuration; gmm: the exact benchmark (--dataset gmm, gmm.py) sized for 2 CPU cores; "
                        "auto: cifar10 when CUDA is present, else smoke")
    g.add_argument("--dataset", choices=["cifar10", "synthetic", "gmm"], default=None,
                   help="training data: cifar10, synthetic (procedural shapes), gmm (the exact benchmark's Gaussian "
                        "mixture, gmm.py) (preset); ignored when --data-dir is given")
    g.add_argument("--data-dir", default=os.environ.get("DDIL_DATA_DIR"),
                   help="image-folder dataset train/<class>/* as a directory or .zip (e.g. "
                        "../shared/data/cifar10-jpeg-train.zip); env DDIL_DATA_DIR")
    if student:
        g.add_argument("--teacher", default="auto",
                       help="teacher checkpoint PATH, or auto: reuse (or train with teacher.py) runs/teacher-<preset>-s0")
    g.add_argument("--guidance", type=_nonnegative, default=None,
                   help="classifier-free guidance scale w of the teacher: 1 = none (the conditional model), 0 = the "
                        "unconditional model, between them weaker and above 1 stronger conditioning; w < 0 is refused "
                        "(preset)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of everything random in training")
    g.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto: cuda when available)")
    g.add_argument("--out", default=None, help="run directory (default runs/<method>-<preset>-<settings>-s<seed>)")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=_positive_int, default=None, help="training iterations (preset)")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="examples per iteration (preset)")
    g.add_argument("--lr", type=_positive, default=None, help="AdamW learning rate (preset)")
    g.add_argument("--ema", type=_fraction, default=None, help="EMA decay of the weights used for sampling (preset)")
    g.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="bf16 autocast (CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g = p.add_argument_group("logging, checkpoints and evaluation")
    g.add_argument("--log-every", type=_positive_int, default=None, help="iterations per log line (preset)")
    g.add_argument("--save-every", type=_positive_int, default=None, help="iterations per checkpoint (preset)")
    g.add_argument("--eval-every", type=_count, default=None, help="iterations per evaluation, 0 = only at the end (preset)")
    g.add_argument("--eval-samples", type=_count, default=None,
                   help="samples for the metrics (fid<N>_train ...); 0 = no metrics (preset)")
    g.add_argument("--reevaluate", action="store_true",
                   help="redo samples.png and metrics.json of a finished run (else a finished run does nothing)")
    return p


def add_ddil_args(p, critic=False):
    """The DDIL mixture and thresholding flags (DESIGN §4), identical in every method script."""
    g = p.add_argument_group("DDIL mixture (values are this project's choices: the paper gives none)")
    for name, sym in (("fwd", "β_frwd: forward-diffused data"), ("teacher", "β_teach_bckwrd: teacher backward rollouts"),
                      ("student", "β_student_bckwrd: the student's own backward rollouts")):
        g.add_argument(f"--beta-{name}", type=_weight, nargs="?", const=1.0, default=None, metavar="W",
                       help=f"prior weight of {sym}; a bare flag means 1; weights are normalised to sum to 1; "
                            "with no beta flag the method's own baseline source is used")
    g.add_argument("--prior-schedule", choices=["constant", "linear", "cosine", "step"], default=None,
                   help="dynamic schedule moving the priors from --prior-start to the beta weights over "
                        "--prior-warmup (default constant; linear with --ddil)")
    g.add_argument("--prior-start", type=_triple, default=[1.0, 0.0, 0.0], metavar="F,T,S",
                   help="start priors (fwd, teacher, student) of a dynamic schedule (early student rollouts are noise)")
    g.add_argument("--prior-warmup", type=_fraction, default=None,
                   help="fraction of training over which the schedule moves (default 0.3; PD: of each round)")
    g.add_argument("--expert-prob", type=_fraction, default=0.0,
                   help="DAgger mixture: probability that the teacher takes each step of a student backward rollout")
    g.add_argument("--buffer-size", type=_count, default=None,
                   help="replay buffer of backward states per source, 0 = always fresh (default 0; 4096 with --ddil)")
    g.add_argument("--buffer-refresh", type=_fraction, default=None,
                   help="fresh backward states per backward state served from the buffer, on average (default 0.25)")
    g.add_argument("--rollout-chunk", type=_positive_int, default=None,
                   help="whole trajectories per buffer refill, each giving a state at every grid time "
                        "(default 4 with --preset smoke, 256 with cifar10: large batches keep a GPU busy)")
    g.add_argument("--max-age", type=_count, default=None,
                   help="maximum age, in training iterations, of the student backward states served from the "
                        "replay buffer (DAgger trains on the current policy's states); older ones are dropped "
                        "and refills made small enough to keep the buffer filled; 0 = no bound "
                        "(preset: smoke 20, cifar10 100)")
    g.add_argument("--teacher-rollout-steps", type=_positive_int, default=32,
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
    g.add_argument("--threshold-percentile", type=_fraction, default=0.995,
                   help="percentile p of |x̂_0| for dynamic thresholding")
    return p


# Flags that do not change what is trained, so they do not name the run directory.
_NOT_SETTINGS = {"preset", "seed", "device", "out", "dry_run", "teacher", "data_dir", "dataset", "amp", "compile",
                 "log_every", "save_every", "eval_every", "eval_samples", "iters"}


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
    name = "-".join(a.dest if a.const is True else f"{a.dest}={_compact(getattr(args, a.dest))}" for a in settings)
    cuda = torch.cuda.is_available()
    args.device = check_device(args.device)
    if args.preset == "auto":
        args.preset, args.preset_reason = ("cifar10", "auto: CUDA present") if cuda else ("smoke", "auto: no CUDA")
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
    if hasattr(args, "ddil"):
        _resolve_ddil(args, default_source, sample_clip)
    if args.out is None:
        args.out = default_run_dir(method, args, name)
    return args


def default_run_dir(method, args, settings="", seed=None):
    """runs/<method>-<preset>[-<data>][-<settings>]-s<seed>; <data> only when not the preset's own."""
    data = os.path.splitext(os.path.basename(args.data_dir.rstrip("/")))[0] if args.data_dir else args.dataset
    data = "" if data == args.preset_dataset else data
    seed = args.seed if seed is None else seed
    return os.path.join("runs", "-".join(x for x in (method, args.preset, data, settings, f"s{seed}") if x))


def _compact(v):
    return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else (f"{v:g}" if isinstance(v, float) else str(v))


# Preset values of the DDIL flags that every method shares (each script holds its other preset values).
DDIL_PRESETS = {"smoke": dict(rollout_chunk=4, max_age=20), "cifar10": dict(rollout_chunk=256, max_age=100),
                "gmm": dict(rollout_chunk=16, max_age=20)}


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
