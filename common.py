"""The maths every DDIL method shares, and nothing method-specific (DESIGN §3, §4).

DDIL: Garrepalli, Mahajan, Hayat, Porikli, "DDIL: Improved Diffusion Distillation with Imitation
Learning", arXiv 2410.11971. Top to bottom: the diffusion conventions (schedule, v-parameterisation,
DDIM, guidance, thresholding), the sampler loop that training rollouts and evaluation share, DAgger
rollouts, the prior schedules and the DDIL input sampler with its replay buffer, EMA. A method's loss
never lives here; run plumbing is in runs.py, the command line in cli.py. Imports no project module.

Range contract (stated once, used everywhere):
    images  float [B, 3, 32, 32] in [-1, 1] (uint8 [N, 3, 32, 32] while stored)
    labels  long  [B] in {0..9}; NULL_CLASS = 10 means "unconditional" (classifier-free guidance)
    time    float t in [0, 1], t = 1 is pure noise; alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2)
    network output v = alpha_t * eps - sigma_t * x_0  (v-prediction)
"""

import math

import torch


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


def forward_diffuse(x0, t, eps):
    """The forward process q(z_t | x_0) and the v-target it implies: z_t = alpha_t x_0 + sigma_t ε and
    v = alpha_t ε - sigma_t x_0. x0, eps: [B, 3, 32, 32]; t: float or [B]. Returns (z_t, v)."""
    alpha_t, sigma_t = (_bc(a.to(x0.device), x0) for a in alpha_sigma(t))
    return alpha_t * x0 + sigma_t * eps, alpha_t * eps - sigma_t * x0


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
    buffer_size > 0: a FIFO replay buffer per source (`ReplayBuffer`) of whole trajectories (`trajectory`: one state at
    every grid time, so every grid time is always served, high noise included), holding at most
    buffer_size // K of them. It takes in, on average, `refresh` fresh states per backward state
    served, rolled out `chunk` trajectories at a time: dozens of sequential teacher calls on a
    handful of states per iteration would leave a GPU idle. (This departs from "refresh a fraction of
    every batch" for speed.) DAgger trains on the current policy's states, so student states older
    than `max_age` iterations are dropped before serving (0 = no bound), and student refills are
    made small enough (at most rate * max_age / 2 trajectories, rate = the refresh credit per
    iteration) that at least two land within every age window. The buffers are in `state_dict()`."""

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
        parts = [(forward_diffuse(x0, t, torch.randn_like(x0))[0], t, y)]
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
        buf = self.buffers[name]
        if buf is None or buf.K != K:
            buf = self.buffers[name] = ReplayBuffer(max(1, self.buffer_size // K), K)
        rate = self.refresh * m / K                                     # trajectories earned per draw
        buf.credit += rate
        chunk = min(self.chunk, buf.capacity)
        if name == "student" and self.max_age:
            buf.drop_older_than(self.it, self.max_age)
            chunk = max(1, min(chunk, int(rate * self.max_age / 2)))     # >= 2 refills per age window
        new = chunk * int(buf.credit // chunk)                          # the credit, in whole chunks
        short = math.ceil(m / K) - buf.n                                # too few states to serve m
        if short > 0:
            new = max(new, short, chunk)
        if new:
            new = min(new, buf.capacity)
            _, y = self.data.batch(new)
            noise = torch.randn(new, 3, 32, 32, device=y.device)
            z = trajectory(student_fn, teacher_fn, noise, y, times, expert_prob, renoise, teacher_steps)
            buf.push(z.transpose(0, 1), y, self.it)                     # [new, K, 3, 32, 32]
            buf.credit = max(0.0, buf.credit - new)
        z, k, y, born = buf.draw(m)
        t = torch.as_tensor(times[:K], dtype=torch.float32, device=y.device)[k]
        return z, t, y, self.it - born

    def state_dict(self):
        """The draw count and the buffers' live trajectories, oldest first (a half-empty buffer costs
        half the bytes)."""
        return {"it": self.it, "buffers": {name: None if b is None else b.state_dict()
                                           for name, b in self.buffers.items()}}

    def load_state_dict(self, state):
        self.reset()
        self.it = state["it"]
        for name, b in state["buffers"].items():
            if b is not None:
                self.buffers[name] = ReplayBuffer.from_state(b, max(1, self.buffer_size // b["K"]))


class ReplayBuffer:
    """A FIFO ring of at most `capacity` whole backward trajectories of one source, each K states (one
    per grid time) with its label and the iteration it was made at (`born`). States are stored in
    float16 (they are N(0, 1)-scale: half precision is 5e-4 relative). `credit` counts the trajectories
    the buffer has earned towards its next refill (DDILSampler decides when to refill)."""

    def __init__(self, capacity, K):
        self.capacity, self.K = capacity, K
        self.z = self.y = self.born = None                              # [C, K, 3, 32, 32], [C], [C]
        self.ptr, self.n, self.credit = 0, 0, 0.0

    def live(self):
        """Indices of the live trajectories in the ring, oldest first."""
        if self.y is None:
            return torch.zeros(0, dtype=torch.long)
        return (self.ptr - self.n + torch.arange(self.n, device=self.y.device)) % self.capacity

    def push(self, z, y, it):
        """Append trajectories z [B, K, ...] (B <= capacity) made at iteration it; the oldest are overwritten."""
        if self.z is None:
            self.z = z.new_zeros(self.capacity, *z.shape[1:], dtype=torch.float16)
            self.y, self.born = y.new_zeros(self.capacity), y.new_zeros(self.capacity, dtype=torch.long)
        idx = (self.ptr + torch.arange(len(z), device=z.device)) % self.capacity
        self.z[idx], self.y[idx], self.born[idx] = z.half(), y, it
        self.ptr = (self.ptr + len(z)) % self.capacity
        self.n = min(self.capacity, self.n + len(z))

    def drop_older_than(self, it, max_age):
        """Forget the trajectories more than max_age iterations old (the oldest are first in the ring)."""
        if self.n:
            self.n -= int((it - self.born[self.live()] > max_age).sum())

    def draw(self, m):
        """m states, uniform over the live (trajectory, grid time) pairs: z [m, 3, 32, 32] (fp32), the grid
        index k [m], the label y [m] and the birth iteration [m]."""
        live = self.live()
        i = live[torch.randint(self.n, (m,), device=live.device)]       # trajectory
        k = torch.randint(self.K, (m,), device=live.device)             # grid time
        return self.z[i, k].float(), k, self.y[i], self.born[i]

    def state_dict(self):
        """The live trajectories, oldest first, and the ring's counters."""
        live = None if self.z is None else self.live()
        state = {key: None if live is None else getattr(self, key)[live.to(getattr(self, key).device)]
                 for key in ("z", "y", "born")}
        return {**state, "K": self.K, "ptr": self.ptr, "n": self.n, "credit": self.credit}

    @classmethod
    def from_state(cls, state, capacity):
        buf = cls(capacity, state["K"])
        buf.credit = state["credit"]
        if state["z"] is not None:
            buf.push(state["z"], state["y"], 0)
            buf.born[:state["n"]] = state["born"]
        return buf


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


# --- EMA of the weights ---

@torch.no_grad()
def ema_update(ema, net, decay, step):
    """ema <- lerp(ema, net, 1 - d) with d = min(decay, (1 + step) / (10 + step)) (a warm-up that
    keeps short runs from averaging in the initialisation)."""
    d = min(decay, (1 + step) / (10 + step))
    e, p = list(ema.parameters()), list(net.parameters())
    torch._foreach_lerp_(e, p, 1 - d)
    for b_e, b_p in zip(ema.buffers(), net.buffers()):
        b_e.copy_(b_p)
