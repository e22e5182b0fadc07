"""The two ablations the DDIL paper (arXiv 2410.11971) lacks, and its own three rows, one command each.

    python ablate.py --method dmd2 --study priors --seeds 0,1,2        # sampling priors β
    python ablate.py --method all --study threshold                     # where thresholding is applied
    python ablate.py --method all --study paper --preset smoke          # baseline / +DDIL / +Reflected+DDIL
    python ablate.py --method lcm --study paper2 --preset smoke         # the same rows at 2 student steps
    python ablate.py --method pd --study priors,threshold -- --iters 2000   # both grids, another budget

A run's identity is its resolved configuration (what its script's --dry-run prints, minus where it
writes and how often it logs) plus the teacher's own recorded configuration: two rows, or two
studies, whose runs resolve to the same settings share one run, and a run with other settings (a
different `-- --iters`, `--eval-samples`, teacher, data ...) is a different run, never a silent
reuse. Runs train in <runs>/<method>-<preset>-<hash>-s<seed>/ (checkpoints, not committed); when one
finishes, its small record (config.json, metrics.json, log.jsonl, ablate.json with the identity,
command, wall time and CPU time) is copied to <results>/records/<same name>/, and a grid counts a run as
done from its record alone, so a grid resumes on a fresh clone from committed records, and `--tables`
rewrites every table from the records alone (the teacher is the one they recorded). Outputs, per
study and method, in <results>/:

    <study>-<method>.md    table: mean ± std over seeds of every metric (one full metric key per column,
                           e.g. fid10k_train: rows evaluated at different sample counts are an error),
                           wall and CPU time per run, paired deltas to the study's reference row (per
                           seed, then averaged, 95 % t-interval over seeds, the paired t-test's p raw and
                           Holm-adjusted over the table; * where the adjusted p < 0.05), the
                           settings held fixed and varied across its rows (from the resolved configs),
                           the per-step drift and the out-of-range share of x̂_0 (in training and per
                           sampler step); the first benchmark (gmm) keeps its published form: raw
                           intervals, * where one excludes zero, no out-of-range section
    <study>-<method>.csv   the same numbers
    <study>-<method>.png   bar plots with std error bars
    shift-<method>.md/.png (study paper; shift-paper2-<method> for paper2) the covariate-shift
                           diagnostic of the paper's Sec. 3.2

Grids (DESIGN §1, §4):
    priors     fixed 100 % forward; 100 % student backward; 50/50 forward/student; the default DDIL
               mixture under each dynamic schedule (constant, linear, cosine, step); every row with
               --ddil's replay buffer, refresh and chunk
    threshold  with the default DDIL mixture: none; sampling only; teacher only; student only (its
               target / output and its sampler); teacher+student (DMD2: also critic only, the
               consistent teacher+critic pair, and all three)
    paper      baseline; (DMD2, not on gmm: the replay buffer alone, its own states only); --ddil;
               --ddil --reflected
    paper2     the paper study at 2 student steps (--steps 2; not on gmm)

The tables themselves are written by report.py, from the records alone.
"""

import argparse
import glob
import hashlib
import importlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

import cli
import common
import gmm
import runs
import scoring
import report
from runs import read_json, write_json

METHODS = ("pd", "lcm", "dmd2")
STUDIES = ("priors", "threshold", "paper", "paper2")
PRESETS = tuple(p for p in cli.PRESET_NAMES if p != "quick")     # quick is a first run, not a grid
RECORD_FILES = ("config.json", "metrics.json", "log.jsonl")          # + ablate.json, shift*.json
REPO = os.path.dirname(os.path.abspath(__file__))


# --- The grids ---

# Every row of the priors study shares --ddil's buffer, refresh and chunk settings, so that its rows
# differ only in the priors and their schedule; "fixed" rows use the constant schedule.
FIXED = ["--ddil", "--prior-schedule", "constant"]


# Presets whose grids and tables were published before the DMD2 buffer-only row, the 2-step paper study
# and the Holm-adjusted p-values: they keep that form (--study all is their three studies), so that their
# committed tables regenerate byte for byte.
FIRST_PUBLISHED = {"gmm"}


def grid(study, method, preset=None):
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
        rows = [("baseline", []), ("ddil", ["--ddil"]), ("reflected-ddil", ["--ddil", "--reflected"])]
        if method == "dmd2" and preset not in FIRST_PUBLISHED:
            # DMD2's baseline simulates its backward states fresh, while --ddil serves them from the replay
            # buffer: this row has the buffer and nothing else of DDIL (its own states only, constant priors),
            # so that +DDIL's effect separates from the buffer's.
            rows.insert(1, ("buffer", FIXED + ["--beta-fwd", "0", "--beta-teacher", "0", "--beta-student", "1"]))
        return rows
    if study == "paper2":           # the paper study at 2 student steps: where each step has the most to do
        return [(setting, flags + ["--steps", "2"]) for setting, flags in grid("paper", method, preset)]
    raise ValueError(study)


def reference(study, method):
    """The row every paired delta is taken against: the method's baseline, or no thresholding."""
    own = importlib.import_module(f"ddil_{method}").BASELINE_SOURCE       # the method's own input source
    return {"priors": "fwd100" if own == "fwd" else "student100",
            "threshold": "none", "paper": "baseline", "paper2": "baseline"}[study]


# --- Run identity ---

# Resolved settings that do not change a run's result (where it writes, how often it logs, shorthands
# already expanded into the settings they stand for).
NOT_RESULT = {"out", "dry_run", "device", "log_every", "save_every", "eval_every", "eval_at", "compile", "preset_reason",
              "reevaluate", "ddil", "reflected"}
def script_args(method, flags, preset, seed, extra):
    return [f"ddil_{method}.py", "--preset", preset, "--seed", str(seed), *flags, *extra]


def resolved_config(method, flags, preset, seed, extra):
    """The settings a run of the grid trains with: its own script's parse_args (what --dry-run prints),
    minus NOT_RESULT and the settings added later at their old behaviour (runs.ADDED_LATER)."""
    module = importlib.import_module(f"ddil_{method}")
    args = module.parse_args(script_args(method, flags, preset, seed, extra)[1:])
    return runs.without_added_later({k: v for k, v in vars(args).items() if k not in NOT_RESULT})


def teacher_identity(config):
    """What the teacher of a resolved config is: its checkpoint path and the settings it recorded (its
    resolved config and step), stable across machines, unlike the bytes of the file. With --teacher exact:
    the mixture's definition, and the identity of the UNet the student starts from under "init". None while
    the UNet checkpoint does not exist or has not finished."""
    path, finished = runs.teacher_checkpoint(argparse.Namespace(**{"init": "auto", **config}))
    if not finished:
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    cfg = {k: v for k, v in ckpt["config"].items() if k not in NOT_RESULT | {"versions"}}
    unet = {"path": path, "step": ckpt["step"], "config": cfg}
    if config["teacher"] == "exact":
        return {"path": "exact", "mixture": {"name": config["dataset"], **gmm.MIXTURES[config["dataset"]]}, "init": unet}
    return unet


def _without_teacher(settings):
    """A config or identity as a key that ignores which teacher it names."""
    plain = json.loads(json.dumps(settings, default=str))
    return json.dumps({k: v for k, v in plain.items() if k != "teacher"}, sort_keys=True)


def record_dirs(results, *files):
    """The run directories under <results>/records, in name order, that hold every one of `files`."""
    root = os.path.join(results, "records")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        rec = os.path.join(root, name)
        if all(os.path.isfile(os.path.join(rec, f)) for f in files):
            yield rec


def recorded_teachers(results):
    """{settings without the teacher: [the teacher identities recorded with them]} over <results>/records:
    what `--tables` reads instead of the teacher checkpoint."""
    index = {}
    for rec in record_dirs(results, "ablate.json"):
        identity = read_json(os.path.join(rec, "ablate.json"), "identity")["identity"]
        teachers = index.setdefault(_without_teacher(identity), [])
        if identity["teacher"] not in teachers:
            teachers.append(identity["teacher"])
    return index


class Run:
    """One training run of a grid: the settings (study, row name) it stands for, its script arguments,
    its identity and the directory name derived from it. teachers: `recorded_teachers` to take the
    teacher from the records (--tables) instead of reading its checkpoint."""

    def __init__(self, method, flags, preset, seed, extra, teachers=None):
        self.method, self.seed, self.preset = method, seed, preset
        self.argv = script_args(method, flags, preset, seed, extra)
        self.config = resolved_config(method, flags, preset, seed, extra)
        if teachers is None:
            self.teacher = teacher_identity(self.config)
        else:
            found = teachers.get(_without_teacher(self.config), [])
            if len(found) > 1:
                raise common.UserError(f"{method} seed {seed} {' '.join(flags)}: its records name {len(found)} "
                                       "different teachers; keep one grid's records per --results folder")
            self.teacher = found[0] if found else None
        self.identity = json.loads(json.dumps({**self.config, "teacher": self.teacher or self.config["teacher"]},
                                              sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:10]
        self.name = f"{method}-{preset}-{digest}-s{seed}"
        self.settings = []

    def record(self, results):
        return os.path.join(results, "records", self.name)


def plan(methods, studies, preset, seeds, extra, only=None, teachers=None, budgets=None):
    """The grid as runs, deduplicated by identity (rows shared between studies are one run), and
    {(study, method): [(setting, {seed: Run})]} for the tables. only: the row names to keep (None: all);
    teachers: see Run; budgets: iteration counts, one run of each row and seed per count (`--iters N` after
    extra), listed as one (setting, by_seed) entry per count: a learning curve of runs, not a table."""
    runs, tables = {}, {}
    for method in methods:
        for study in studies:
            rows = []
            for setting, flags in grid(study, method, preset):
                if only and setting not in only:
                    continue
                for budget in budgets or [None]:
                    by_seed = {}
                    for seed in seeds:
                        run = Run(method, flags, preset, seed, extra + (["--iters", str(budget)] if budget else []),
                                  teachers)
                        run = runs.setdefault(run.name, run)
                        run.settings.append(f"{study}:{setting}")
                        by_seed[seed] = run
                    rows.append((setting, by_seed))
            tables[(study, method)] = rows
    return list(runs.values()), tables


# --- Running ---

def recorded_seeds(results):
    """--seeds recorded: every seed with a record in <results>/records (run directories end in -s<seed>)."""
    seeds = sorted({int(m.group(1)) for rec in record_dirs(results) if (m := re.search(r"-s(\d+)$", rec))})
    if not seeds:
        raise common.UserError(f"--seeds recorded: no records in {os.path.join(results, 'records')}")
    return seeds


def recorded_rows(tables, results):
    """--seeds recorded: each table on the seeds its reference row has records of, with the rows recorded on
    all of them (every delta is paired by seed); a table with no other such row is left out. Returns the
    tables and, per table, a line naming the rows left out."""
    kept, notes = {}, {}
    for (study, method), rows in tables.items():
        done = {setting: {s for s, run in by_seed.items() if is_done(run, results)} for setting, by_seed in rows}
        seeds = sorted(done[reference(study, method)])
        full = [(setting, {s: by_seed[s] for s in seeds}) for setting, by_seed in rows if seeds and set(seeds) <= done[setting]]
        left = [f"{setting} ({len(done[setting])} of {len(seeds)} seeds)" if done[setting] else setting
                for setting, _ in rows if setting not in dict(full)]
        if len(full) < 2 or len(seeds) < 2:            # a paired test needs two seeds
            ref = reference(study, method)
            print(f"{study}-{method}: no table (" + (f"its reference row {ref} has records of {len(seeds)} seed(s)" if len(seeds) < 2
                  else f"no row besides the reference {ref} is recorded on the {len(seeds)} seeds it has") + ")")
            continue
        kept[(study, method)] = full
        notes[(study, method)] = f"Not recorded on these seeds yet: {', '.join(left)}." if left else ""
        print(f"{study}-{method}: rows {', '.join(s for s, _ in full)} on seeds {','.join(map(str, seeds))}"
              + (f"; {notes[(study, method)]}" if left else ""))
    return kept, notes


def is_done(run, results):
    """A run is done when its record holds metrics and an ablate.json with this identity; a record
    with another identity under the same name (a hash collision) is an error, never a reuse."""
    rec = run.record(results)
    if not (os.path.isfile(os.path.join(rec, "ablate.json")) and os.path.isfile(os.path.join(rec, "metrics.json"))):
        return False
    if read_json(os.path.join(rec, "ablate.json"), "identity")["identity"] != run.identity:
        raise common.UserError(f"{rec}: recorded with other settings than this grid asks for; move it away")
    return True


def started_from(config):
    """The UNet checkpoint a run's resolved config started from: its --init, or its UNet teacher (None with
    neither, e.g. the exact teacher without an init)."""
    path = config.get("init_path") or config.get("teacher_path")
    return path if path and path != "exact" else None


def recorded_inits(results):
    """{UNet checkpoint path: the init_sha values recorded by the runs of <results>/records that started from
    it} (records made before init_sha was kept name none)."""
    index = {}
    for rec in record_dirs(results, "ablate.json", "config.json"):
        path = started_from(read_json(os.path.join(rec, "config.json")))
        sha = read_json(os.path.join(rec, "ablate.json")).get("init_sha")
        if path and sha:
            index.setdefault(os.path.normpath(path), set()).add(sha)
    return index


def check_init(grid, results):
    """Refuse a grid whose runs would start from another UNet than its recorded runs did. Trained again on
    another machine, a UNet of the same settings has other weights, and a table would mix students of the
    two without a word; so a grid whose UNet is missing (--teacher auto would train it) or has another hash
    than its records stops here, naming a copy of the recorded one under <results> if there is one."""
    recorded = recorded_inits(results)
    for path, finished in sorted({_unet_of(run) for run in grid}):
        shas = recorded.get(os.path.normpath(path))
        have = runs.weights_sha(path) if shas and finished else None
        if not shas or have in shas:
            continue
        copies = [c for c in sorted(glob.glob(os.path.join(glob.escape(results), "**", "*.pt"), recursive=True))
                  if _weights_sha_or_none(c) in shas]
        if not copies:
            put = f"no copy of it is under {results}"
        elif os.path.basename(path) == "ckpt.pt":           # a teacher.py run directory: its files with it
            put = f"mkdir -p {shlex.quote(os.path.dirname(path) or '.')} && cp {shlex.quote(os.path.dirname(copies[0]))}/* " \
                  f"{shlex.quote(os.path.dirname(path) or '.')}/"
        else:
            put = f"cp {shlex.quote(copies[0])} {shlex.quote(path)}"
        now = (f"this one is UNet {have} (move it aside first)" if have else
               "there is no finished UNet there, and one trained here may well have other weights")
        raise common.UserError(f"{path}: the runs recorded in {results} started from UNet {', '.join(sorted(shas))} "
                               f"(sha256 of its EMA weights), but {now}: a table would mix students of two UNets; "
                               f"put that UNet there first ({put}), or give another --results")


def _unet_of(run):
    """(the UNet checkpoint a run starts from, whether it has finished), from its planned teacher identity
    when there is one (no second read of the checkpoint)."""
    if run.teacher is None:
        return runs.teacher_checkpoint(argparse.Namespace(**{"init": "auto", **run.config}))
    return (run.teacher["init"] if run.teacher["path"] == "exact" else run.teacher)["path"], True


def _weights_sha_or_none(path):
    """weights_sha of a checkpoint file, or None where it is not a readable UNet checkpoint."""
    try:
        return runs.weights_sha(path)
    except (common.UserError, KeyError, TypeError, AttributeError, RuntimeError, OSError, EOFError):
        return None


def train_teacher(run):
    """--teacher auto: train the grid's shared teacher once, before any run (a subprocess, as a user). When
    another ablate.py is training it already (its run directory is locked: exit 75), wait for that one."""
    import teacher
    args = argparse.Namespace(**run.config, device="auto", compile=False)
    path, _ = runs.teacher_checkpoint(args)
    argv = [sys.executable, os.path.join(REPO, "teacher.py"), *teacher.auto_argv(args, os.path.dirname(path))]
    print("teacher first (shared by every run): " + " ".join(argv[1:]), flush=True)
    while True:
        code = _run_passing_on_stop(argv)
        if code != 75:
            break
        print("the teacher is being trained by another process: waiting for it", flush=True)
        time.sleep(15)
    if code in STOP_CODES:
        raise common.Stopped("stopped while training the grid's teacher (its last checkpoint is kept); rerun the "
                             "same command to resume")
    if code != 0:
        raise common.UserError(f"teacher training failed (exit {code}): {' '.join(argv[1:])}")


def _run_passing_on_stop(argv):
    """subprocess.run(argv).returncode, except that Ctrl-C or SIGTERM to this process reaches the child as one
    SIGTERM (it saves its checkpoint and exits 130) and is waited for: neither is the child left running
    without this process, nor killed before it has saved (subprocess.run kills it on Ctrl-C)."""
    proc = subprocess.Popen(argv)

    def on_stop(signum, frame):
        if not getattr(on_stop, "sent", False):
            on_stop.sent = True
            print(f"\n{signal.Signals(signum).name}: waiting for the teacher to save its checkpoint ...", flush=True)
            proc.send_signal(signal.SIGTERM)

    with _on_stop_signals(on_stop):
        return proc.wait()


@contextmanager
def _on_stop_signals(handler):
    """Ctrl-C and SIGTERM call handler(signum, frame) inside the block (on the main thread only, where Python
    delivers signals); the previous handlers are back afterwards."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = ({s: signal.signal(s, handler) for s in handled}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class RunFailed(RuntimeError):
    """A run of a grid exited with an error status (`code`); the message ends with the run's last error line."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


STOP_CODES = (130, -signal.SIGTERM, -signal.SIGINT)    # a run that saved and stopped, or was stopped before its first step


class RunJob:
    """Train + evaluate one run of a grid as a subprocess (the user's own command) and write its record.
    Called in this process (local launcher) or in a submitit job (SLURM). Submitit calls `checkpoint` when
    the job is preempted or about to time out: the run gets SIGTERM, saves at the next step boundary and
    exits; the job is requeued and the run resumes from its ckpt.pt. Returns 'done', 'busy' (the run
    directory is in use by another worker: exit 75) or raises with the run's last error line.

    Attempts, wall time and the run's CPU time (user + system of its process, which a shared machine
    disturbs far less than the wall time; recorded only when every attempt's was counted) are counted in
    <run>/attempts.json, not in this object: a job that SLURM requeues (`scontrol requeue`, preemption)
    starts again from its submitted pickle."""

    stop = None                                         # (also what a job pickled before this attribute existed has)

    def __init__(self, run, runs_dir, results, env=None, log=None, stop_within=300, stop=None):
        self.run, self.runs_dir, self.results, self.env, self.log = run, runs_dir, results, env, log
        self.stop_within, self.stop, self._proc, self._counts = stop_within, stop, None, None

    def __call__(self):
        if is_done(self.run, self.results):             # finished by another worker meanwhile
            return "done"
        out = os.path.join(self.runs_dir, self.run.name)
        cmd = [sys.executable, os.path.join(REPO, self.run.argv[0]), *self.run.argv[1:], "--out", out]
        os.makedirs(out, exist_ok=True)
        count_path = os.path.join(out, "attempts.json")
        counts = read_json(count_path) if os.path.isfile(count_path) else dict(attempts=0, wall_s=0.0)
        counts = self._counts = {"cpu_s": 0.0, "cpu_attempts": 0, **counts}
        counts["attempts"] += 1
        write_json(count_path, counts)
        log = open(self.log, "a") if self.log else None
        t0 = time.time()
        try:
            env = {**os.environ, **(self.env or {})}
            if "SLURM_CPUS_PER_TASK" in env and not (self.env or {}).get("OMP_NUM_THREADS"):
                env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]      # the job's CPUs, not the node's
            self._proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT if log else None)
            if self.stop is not None and self.stop.is_set():     # the grid was stopped while this run started
                self.terminate()
            self._reap(0)
            code = self._proc.returncode
        finally:
            self._proc = None
            counts["wall_s"] += time.time() - t0
            write_json(count_path, counts)
            if log:
                log.close()
        if code == 75:
            return "busy"
        if code in (130, -signal.SIGTERM, -signal.SIGUSR2) and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # Stopped by SLURM (scontrol requeue, preemption, scancel): the run saved its checkpoint. The job is
            # being requeued or cancelled, and SLURM ends this process; returning now would write a 'failed'
            # result for a job that is not over.
            time.sleep(600)
        if code != 0:
            raise RunFailed(f"{self.run.name}: exit {code}: {last_error_line(self.log)}"
                            + (f"; full log {self.log}" if self.log else ""), code)
        if not os.path.isfile(os.path.join(out, "metrics.json")):
            raise RuntimeError(f"{out} wrote no metrics.json: ablations need --eval-samples > 0")
        cpu_s = counts["cpu_s"] if counts["cpu_attempts"] == counts["attempts"] else None   # None: not every attempt's
        save_record(self.run, out, self.results, dict(wall_s=counts["wall_s"], cpu_s=cpu_s, attempts=counts["attempts"]))
        return "done"

    def _reap(self, flags):
        """Collect the run's exited process with its own CPU time (os.wait4), added to the attempt counts.
        flags os.WNOHANG: do not block. True once the process is collected (here or before)."""
        try:
            pid, status, usage = os.wait4(self._proc.pid, flags)
        except ChildProcessError:                       # collected already (by the handler below)
            return True
        if pid == 0:
            return False
        self._proc.returncode = os.waitstatus_to_exitcode(status)
        self._counts["cpu_s"] += usage.ru_utime + usage.ru_stime
        self._counts["cpu_attempts"] += 1
        return True

    def terminate(self):
        """Ask the running run to stop: it saves a checkpoint at its next step boundary and exits 130, or, in
        its final evaluation, finishes it (the record is then written). A repeated request is ignored."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:                  # exited, not yet collected
                pass

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / timeout hook: stop the run at a step boundary, then requeue this job."""
        from submitit.helpers import DelayedSubmission
        proc = self._proc
        if proc is not None and proc.returncode is None and not self._reap(os.WNOHANG):
            # This handler interrupts __call__ inside os.wait4: reap the run here (with its CPU time), never
            # through Popen, whose poll would collect it and lose the CPU time.
            os.kill(proc.pid, signal.SIGTERM)            # the run saves its checkpoint and exits 130
            deadline = time.time() + self.stop_within       # then the job must still be requeued in time
            while time.time() < deadline and not self._reap(os.WNOHANG):
                time.sleep(0.1)
            if proc.returncode is None:
                proc.kill()                             # its CPU time is then not counted: the record says None
        return DelayedSubmission(self)

    def __getstate__(self):                             # pickled by submitit: no process handle
        return {**self.__dict__, "_proc": None, "_counts": None}


def last_error_line(log):
    """The line of a run's log that says why it failed: its one-line `error:` if any, else the last line."""
    if not log or not os.path.isfile(log):
        return "(no log)"
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "Traceback")) or ": error: " in line]
    if errors and errors[-1].startswith("Traceback"):
        return lines[-1][:300]
    return (errors or lines or ["(empty log)"])[-1][:300]


def run_state(run, runs_dir, results):
    """done (record), running (its run directory is locked by a live process), else what its submitit job
    says: queued, failed (finished without a record) or lost (no job, or one that is gone)."""
    if is_done(run, results):
        return "done"
    out = os.path.join(runs_dir, run.name)
    if runs.run_dir_in_use(out):
        return "running"
    return job_state(os.path.join(out, "submitit", "job.json"))


def job_state(job_file):
    """todo (never submitted), queued, running, failed (over) or lost, from a job.json and submitit."""
    if not os.path.isfile(job_file):
        return "todo"
    job = read_json(job_file, "cluster", "job_id")
    try:
        import submitit
        if job["cluster"] == "slurm":
            state = submitit.SlurmJob(os.path.dirname(job_file), job["job_id"]).state
        else:
            state = submitit.local.local.LocalJob(os.path.dirname(job_file), job["job_id"]).state
    except Exception:                                   # no sacct here, a purged job ...
        return "lost"
    if state in ("PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED"):
        return "queued"
    if state in ("RUNNING", "COMPLETING"):
        return "running"
    return "failed" if state in ("FINISHED", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                 "NODE_FAIL", "PREEMPTED", "INTERRUPTED") else "lost"


def launch_local(todo, args):
    """Up to --jobs runs at once, each a subprocess pinned to its own GPU (--gpus, CUDA_VISIBLE_DEVICES) or,
    on a CPU, to its share of the threads (--threads, OMP_NUM_THREADS): a thread pool hands out the runs.
    One line per finished run: done / running / left and the estimated time left."""
    import queue
    from concurrent.futures import ThreadPoolExecutor, as_completed
    gpus = queue.Queue()
    for g in args.gpus or [None] * args.jobs:
        gpus.put(g)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    quiet = args.jobs > 1                               # parallel runs log to <run>/stdout.log, not the console
    walls, failed, busy, stopped = [], [], [], []
    state, lock = dict(done=0, running=0), threading.Lock()
    stop, jobs = threading.Event(), set()               # a stop request; the RunJobs now running

    def one(run):
        gpu = gpus.get()
        if stop.is_set():                               # stopped: no new run starts
            gpus.put(gpu)
            return run, "stopped", 0.0
        with lock:
            state["running"] += 1
        env = {"OMP_NUM_THREADS": str(threads)} | ({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})
        log = os.path.join(args.runs, run.name, "stdout.log") if quiet else None
        job = RunJob(run, args.runs, args.results, env, log, stop=stop)
        t0 = time.time()
        try:
            with lock:
                jobs.add(job)
            if not quiet:
                print(f"running: {run.name} ({' '.join(run.settings)}): {' '.join(run.argv)}", flush=True)
            return run, job(), time.time() - t0
        finally:
            with lock:
                state["running"] -= 1
                jobs.discard(job)
            gpus.put(gpu)

    def on_stop(signum, frame):
        # Ctrl-C or SIGTERM (to this process or its whole group): start nothing more, ask the running runs to stop
        # (they save a checkpoint, or finish their final evaluation and are recorded) and wait for them, so that
        # no run is left behind without its record or its CPU time. (A second Ctrl-C in a terminal reaches the
        # runs too, and they stop at once without saving the step; this process still waits for them.)
        if stop.is_set():
            print(f"\n{signal.Signals(signum).name} again: still waiting for the running runs", flush=True)
            return
        stop.set()
        with lock:
            running = list(jobs)
        for job in running:
            job.terminate()
        print(f"\n{signal.Signals(signum).name}: no new run starts; waiting for the {len(running)} running run(s) "
              "to save a checkpoint or finish their final evaluation ...", flush=True)

    with _on_stop_signals(on_stop):
        # A run that exits with a stop status once the grid is stopped is stopped, not failed: decided here, on
        # the main thread, after the stop's signal handler has run (a signal to the whole process group can end
        # a run before its worker thread sees the stop).
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one, run) for run in todo]
            for future in as_completed(futures):
                try:
                    run, outcome, wall = future.result()
                except RuntimeError as e:
                    if stop.is_set() and getattr(e, "code", None) in STOP_CODES:
                        stopped.append(str(e))
                        continue
                    failed.append(str(e))
                    print(f"FAILED: {e}", flush=True)
                    continue
                if outcome == "stopped":
                    stopped.append(run.name)
                    continue
                if outcome == "done":
                    walls.append(wall)
                else:
                    busy.append(run.name)
                state["done"] += 1
                left = 0 if stop.is_set() else len(todo) - state["done"] - len(failed) - state["running"]
                eta = np.mean(walls) * (left + state["running"]) / args.jobs if walls else math.nan
                what = "finished" if outcome == "done" else "in use by another worker: left to it"
                print(f"[{state['done'] + len(failed)}/{len(todo)} done | {state['running']} running | {left} left | "
                      f"eta {runs.hms(eta) if math.isfinite(eta) else '?'}] {run.name} {what} ({wall / 60:.1f} min)",
                      flush=True)
    if stop.is_set():
        finished = len(todo) - len(failed) - len(busy) - len(stopped)
        raise common.Stopped(f"stopped: {finished} run(s) finished and recorded, {len(stopped)} stopped or not "
                             "started" + (f", {len(busy)} left to another worker" if busy else "")
                             + (f", {len(failed)} failed ({' | '.join(failed)})" if failed else "")
                             + "; rerun the same command to resume")
    if failed:
        raise common.UserError(f"{len(failed)} run(s) failed, the others are kept: " + " | ".join(failed))
    return busy


def executor_for(folder, args):
    import submitit
    params = dict(timeout_min=args.time, gpus_per_node=args.gpus_per_job, cpus_per_task=args.cpus_per_job,
                  name="ddil", slurm_partition=args.partition, slurm_account=args.account,
                  slurm_signal_delay_s=args.signal_delay)
    params.update(args.slurm)
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.requeues,
                                     local_max_num_timeout=args.requeues)
    try:
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    except (NameError, AssertionError, TypeError, ValueError) as e:
        raise common.UserError(f"--slurm: submitit does not take these parameters ({str(e).splitlines()[0][:200]})") from None
    return executor


def submit(executor, fn, what, args):
    """executor.submit, with sbatch's refusal (no GPUs on the partition, an unknown account ...) as one line
    naming the flags that set the request (sbatch's own stderr is folded into it). From inside a job (the
    grid's first job) the job's SLURM variables are hidden from sbatch (submitit's clean_env)."""
    import tempfile
    from contextlib import nullcontext
    from submitit.core.utils import FailedJobError
    from submitit.helpers import clean_env
    sys.stderr.flush()
    saved, captured = os.dup(2), tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    job = why = None
    try:
        with clean_env() if args.in_job else nullcontext():
            job = executor.submit(fn)
    except FailedJobError as e:
        why = next((line.strip() for line in str(e).splitlines() if "error" in line.lower()), str(e).strip()[:200])
    except FileNotFoundError as e:
        why = f"{e.filename or 'sbatch'} not found: no SLURM here (--cluster local runs the jobs on this machine)"
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
        captured.close()
    if why is not None:
        raise common.UserError(f"sbatch refused {what}: {why[:200]} (the request is set by --gpus-per-job (0 on a "
                               "partition without GPUs), --cpus-per-job, --partition, --account, --time and --slurm)")
    if text.strip():
        sys.stderr.write(text)
    return job


def job_of(run, runs_dir):
    """The submitit job of a run, from the job.json written at submission (None without one)."""
    import submitit
    folder = os.path.join(runs_dir, run.name, "submitit")
    path = os.path.join(folder, "job.json")
    if not os.path.isfile(path):
        return None
    job = read_json(path, "cluster", "job_id")
    cls = submitit.SlurmJob if job["cluster"] == "slurm" else submitit.local.local.LocalJob
    return cls(folder, job["job_id"])


def launch_submitit(todo, args):
    """One submitit job per run (SLURM, or --cluster local for processes on this machine); each job's
    stdout/stderr and pickles live in <runs>/<run>/submitit/, the run's own output in run.log there.
    Preempted or timed-out jobs requeue (RunJob). Returns [(run, job)]."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # unpickling
    jobs = []
    for run in todo:
        folder = os.path.join(args.runs, run.name, "submitit")
        executor = executor_for(folder, args)
        job = submit(executor, RunJob(run, args.runs, args.results, log=os.path.join(folder, "run.log"),
                                      stop_within=max(10, args.signal_delay - 20)), run.name, args)
        write_json(os.path.join(folder, "job.json"), dict(job_id=job.job_id, cluster=executor.cluster, time=time.time()))
        print(f"submitted {run.name} ({' '.join(run.settings)}): job {job.job_id}", flush=True)
        jobs.append((run, job))
    return jobs


def wait_jobs(jobs):
    """Block until every job is over; one line per job; a failed one is reported with its run's own error
    line (RunJob's message) and where its logs are."""
    failed = []
    for i, (run, job) in enumerate(jobs, 1):
        try:
            outcome = job.result()
        except Exception as e:                          # the job's own traceback is in its stderr file
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = next((line.split(": ", 1)[1] for line in reversed(lines)   # RunJob's RuntimeError / RunFailed
                        if re.match(r"(?:[\w.]+\.)?(?:RuntimeError|RunFailed): ", line)),
                       lines[-1] if lines else type(e).__name__)
            failed.append(f"{why} (submitit logs: {job.paths.folder})")
            outcome = "failed"
        print(f"[{i}/{len(jobs)}] {run.name}: {outcome}", flush=True)
    if failed:
        raise common.UserError(f"{len(failed)} job(s) failed: " + " | ".join(failed))


class PrepareJob:
    """The first job of a SLURM grid: on a compute node, train the shared teacher when there is none and
    make the shared caches (reference statistics, classifier, teacher reference samples), then submit the
    grid's runs from there (ablate.py with the same arguments). The submitting machine (a login node)
    trains nothing."""

    def __init__(self, argv):
        own, extra = (argv[:argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
        self.argv = [a for a in own if a != "--wait"] + ["--in-job"] + extra

    def __call__(self):
        main(self.argv)
        return "submitted"

    def checkpoint(self, *args, **kwargs):        # a time limit while the teacher trains: requeue, it resumes
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self)


def save_record(run, out, results, timing):
    """Copy the run's RECORD_FILES into its record, then ablate.json: its identity, command, settings, timing
    and init_sha, the hash of the UNet it started from (its --init, or its UNet teacher), read now from the
    checkpoint its config names (which nothing rewrites once it is finished)."""
    rec = run.record(results)
    config = read_json(os.path.join(out, "config.json")) if os.path.isfile(os.path.join(out, "config.json")) else {}
    init = started_from(config)
    timing = {**timing, "init_sha": runs.weights_sha(init) if init and os.path.isfile(init) else None}
    os.makedirs(rec, exist_ok=True)
    for f in RECORD_FILES:
        if os.path.isfile(os.path.join(out, f)):
            shutil.copyfile(os.path.join(out, f), os.path.join(rec, f + ".tmp"))
            os.replace(os.path.join(rec, f + ".tmp"), os.path.join(rec, f))
    write_json(os.path.join(rec, "ablate.json"),                    # last: it marks the record complete
               dict(identity=run.identity, cmd=run.argv, settings=run.settings, **timing))


# --- Covariate-shift diagnostic (paper Sec. 3.2, measured) ---

def shift_record(run, runs_dir, results, n, device, memo):
    """The run's covariate-shift curves, computed from its checkpoint once and kept in its record
    (shift<n>.json), so the diagnostic too regenerates from committed records. runs_dir None: records only."""
    path = os.path.join(run.record(results), f"shift{n}.json")
    if not os.path.isfile(path):
        out = runs_dir and os.path.join(runs_dir, run.name)
        if not out or not os.path.isfile(os.path.join(out, "ckpt.pt")):
            return None
        method = importlib.import_module(f"ddil_{read_json(os.path.join(out, 'config.json'))['method']}")
        gap_fwd, gap_own = scoring.covariate_shift(out, method.make_student, n, device=device, memo=memo)
        write_json(path, dict(forward=gap_fwd, own=gap_own, samples=n))
    return read_json(path)


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


def _key_value(s):
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{s!r}: give KEY=VALUE, e.g. slurm_qos=high")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0],
                      epilog="Arguments after `--` go to every run, e.g. `-- --iters 2000 --eval-samples 10000`.")
    p.add_argument("--method", type=_list(METHODS, "method"), required=True,
                   help="distiller(s): pd, lcm, dmd2, a comma-separated list, or all")
    p.add_argument("--study", required=True,
                   help="grid(s): priors, threshold, paper, paper2 (the paper study at 2 student steps; not on "
                        "the first-published preset gmm, whose 'all' is its three studies), a comma-separated list, "
                        "or all")
    p.add_argument("--preset", choices=("auto",) + PRESETS, default="auto",
                   help="preset of every run (auto: cifar10 with CUDA, else gmm2, the exact benchmark whose results are "
                        "committed in results/gmm2; smoke is for testing the CIFAR-10 code path)")
    p.add_argument("--seeds", default="0",
                   help="comma-separated training seeds, e.g. 0,1,2; with --tables also 'recorded': each table on "
                        "its reference row's recorded seeds, with the rows recorded on all of them, ending with the "
                        "rows it lacks (a grid in progress, or several methods and studies in one command)")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, metavar="ROW,...",
                   help="only these rows of the study (e.g. baseline,ddil); the tables then show only them")
    p.add_argument("--runs", default=os.path.join("runs", "ablate"),
                   help="where runs train (checkpoints; not committed)")
    p.add_argument("--results", default="ablations",
                   help="where tables, plots and the per-run records (records/<run>/) go")
    p.add_argument("--shift-samples", type=cli.count, default=None,
                   help="samples for the covariate-shift diagnostic (studies paper, paper2; 0 = skip) (smoke 32, gmm 200, "
                        "cifar10 1000)")
    p.add_argument("--device", default="auto", help="device for the shared caches and the diagnostic (runs pick their own)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state (done, running, ...) and exit")
    p.add_argument("--curves", action="store_true",
                   help="write learning curves (curves-<method>.md/.png) instead of tables: the metrics at every "
                        "evaluation in the runs' histories (train with -- --iters N --eval-at 100,200,...), and the "
                        "budget they imply: the first iteration count where one more doubling improves fd_px by "
                        "less than 5 %%, else the largest evaluated")
    p.add_argument("--budgets", type=cli.iterations, default=None, metavar="N,...",
                   help="with --curves: one run per iteration count (each trained with --iters N and evaluated at "
                        "its end), for a method whose learning rate anneals within the run, as PD's does in each "
                        "round, so that a mid-run evaluation does not stand for a shorter run; e.g. 300,600,1200")
    p.add_argument("--tables", action="store_true",
                   help="only write the tables from the records in --results (the teacher is the one they "
                        "recorded: nothing is trained, no checkpoint is read); an error if a run has no record")
    g = p.add_argument_group("launching the runs")
    g.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: subprocesses on this machine, --jobs at a time; slurm: one submitit job per run")
    g.add_argument("--jobs", type=cli.positive_int, default=1, help="local: runs at once")
    g.add_argument("--gpus", type=lambda s: [int(g) for g in s.split(",")], default=None, metavar="0,1,...",
                   help="local: the GPUs to spread the runs over, one run per GPU at a time (sets --jobs to their number)")
    g.add_argument("--threads", type=cli.positive_int, default=None,
                   help="local: CPU threads per run (OMP_NUM_THREADS; default: the cores divided by --jobs)")
    g.add_argument("--partition", default=None, help="slurm: partition")
    g.add_argument("--account", default=None, help="slurm: account")
    g.add_argument("--time", type=cli.positive_int, default=24 * 60, help="slurm: time limit of a job in minutes (it requeues "
                                                               "itself and resumes when it runs out)")
    g.add_argument("--gpus-per-job", type=cli.count, default=1, help="slurm: GPUs per job")
    g.add_argument("--cpus-per-job", type=cli.positive_int, default=8, help="slurm: CPUs per job")
    g.add_argument("--slurm", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other submitit executor parameter, repeatable, e.g. --slurm slurm_qos=high "
                        "--slurm slurm_constraint=a100 --slurm 'slurm_setup=[\"module load cuda\"]'")
    g.add_argument("--requeues", type=cli.count, default=10,
                   help="slurm: how many times a preempted or timed-out job is requeued")
    g.add_argument("--signal-delay", type=cli.positive_int, default=120,
                   help="slurm: seconds before the time limit at which a job saves and requeues")
    g.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="slurm: submit to SLURM; local: submitit's local executor (jobs as processes here, for tests)")
    g.add_argument("--wait", action="store_true",
                   help="slurm: block until every run of the grid is done or failed (also jobs queued by an earlier "
                        "call), then write the tables")
    g.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)   # set by PrepareJob on the cluster
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.recorded = args.seeds == "recorded"
    if args.recorded and not args.tables:
        p.error("argument --seeds: 'recorded' reads the seeds from the records: only with --tables")
    try:
        args.seeds = recorded_seeds(args.results) if args.recorded else [cli.seed_int(s) for s in args.seeds.split(",")]
    except argparse.ArgumentTypeError:
        p.error(f"argument --seeds: {args.seeds!r} is not a comma-separated list of seeds (integers >= 0)")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"argument --seeds: {','.join(map(str, args.seeds))} repeats a seed (each seed is one run per row)")
    if args.preset == "auto":       # on a cluster, the compute nodes decide: GPUs asked for means cifar10
        gpus = torch.cuda.is_available() or (args.launcher == "slurm" and args.gpus_per_job > 0)
        args.preset = "cifar10" if gpus else "gmm2"     # a CPU grid that can answer, not a smoke test
    try:                            # the first-published presets keep their three studies
        args.study = _list(STUDIES[:3] if args.preset in FIRST_PUBLISHED else STUDIES, "study")(args.study)
    except argparse.ArgumentTypeError as e:
        p.error(f"argument --study: {e}" + (f" (the first-published preset {args.preset} keeps its three studies)"
                                            if args.preset in FIRST_PUBLISHED else ""))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shift_samples is None:
        args.shift_samples = {"smoke": 32, "gmm": 200, "gmm2": 200}.get(args.preset, 1000)
    if args.gpus:
        args.jobs = len(args.gpus)
    args.slurm = dict(args.slurm)
    if any(a.split("=")[0] in ("--out", "--seed", "--preset") for a in extra):
        p.error("arguments after `--` may not set --out, --seed or --preset (ablate.py sets them)")
    if args.budgets is not None and not args.curves:
        p.error("argument --budgets: only with --curves (a run per budget makes a learning curve, not a table)")
    if args.budgets is not None and args.recorded:
        p.error("argument --budgets: give the seeds (e.g. --seeds 0), not 'recorded': each budget is its own run")
    if args.budgets is not None and (not args.budgets or any(a.split("=")[0] == "--iters" for a in extra)):
        p.error("argument --budgets: give iteration counts, e.g. 300,600,1200, and no --iters after `--` "
                "(each budget sets its runs' --iters)")
    if args.curves and len(args.study) > 1:
        p.error("argument --curves: give one --study (each method's curves are one file)")
    return args, extra


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parse_args(argv)
    teachers = recorded_teachers(args.results) if args.tables else None
    runs, tables = plan(args.method, args.study, args.preset, args.seeds, extra, args.only, teachers, args.budgets)
    if not runs:
        raise common.UserError(f"--only {','.join(args.only)}: no such row in the studies {','.join(args.study)}")
    # On a SLURM cluster the submitting machine (a login node) trains nothing: a first job does (PrepareJob).
    on_cluster = args.launcher == "slurm" and args.cluster == "slurm" and not args.in_job
    notes = {}
    if args.recorded:
        tables, notes = recorded_rows(tables, args.results)
        runs = [run for run in runs if is_done(run, args.results)]
        if not tables:
            raise common.UserError(f"--seeds recorded: no table of {','.join(args.method)} × {','.join(args.study)} "
                                   f"has records of its reference row in {args.results}")
    elif args.tables:
        missing = [run for run in runs if not is_done(run, args.results)]     # with no recorded teacher: no record
        if missing:
            raise common.UserError(f"--tables: {len(missing)} of {len(runs)} runs have no record in {args.results}, "
                                   f"e.g. {' '.join(missing[0].argv)}; run the grid without --tables")
    else:
        check_init(runs, args.results)
    if not args.tables and any(run.teacher is None for run in runs):
        if args.dry_run or on_cluster:
            print("the grid's teacher (--teacher auto) is not trained yet: it is trained first; run names below "
                  "will change once it exists")
        else:
            train_teacher(next(run for run in runs if run.teacher is None))
            runs, tables = plan(args.method, args.study, args.preset, args.seeds, extra, args.only, budgets=args.budgets)
    states = {run.name: run_state(run, args.runs, args.results) for run in runs}
    counts = {s: list(states.values()).count(s) for s in dict.fromkeys(states.values())}
    print(f"grid: {len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    if args.dry_run:
        for run in runs:
            print(f"{states[run.name]:8} {run.name}  {' '.join(run.settings)}  {' '.join(run.argv)}")
        return None
    todo = [run for run in runs if states[run.name] in ("todo", "failed", "lost")]     # --tables: none
    submitted = {}
    if todo and on_cluster:
        first = argparse.Namespace(name="_prepare")              # the grid's first job, tracked as a run is
        job = job_of(first, args.runs)
        state = job_state(os.path.join(args.runs, "_prepare", "submitit", "job.json"))
        if state in ("queued", "running"):
            print(f"the grid's first job {job.job_id} is {state}: it submits the runs when it has made what they "
                  "share", flush=True)
        else:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
            folder = os.path.join(args.runs, "_prepare", "submitit")
            own = argv[:argv.index("--")] if "--" in argv else argv
            job = submit(executor_for(folder, args), PrepareJob(own + ["--preset", args.preset] + argv[len(own):]),
                         "the grid's first job", args)
            write_json(os.path.join(folder, "job.json"), dict(job_id=job.job_id, cluster=args.cluster, time=time.time()))
            print(f"submitted job {job.job_id}: on a compute node it trains the teacher if there is none and makes "
                  f"the shared caches, then submits the {len(todo)} runs; rerun this command to see the grid's state",
                  flush=True)
        if not args.wait:
            return runs
        wait_jobs([(argparse.Namespace(name="first job (teacher, shared caches, submission)"), job)])
        runs, tables = plan(args.method, args.study, args.preset, args.seeds, extra, args.only, budgets=args.budgets)
    elif todo:
        shared = {}                                     # made once, before the fan-out: never raced
        for run in todo:
            cfg = {**run.config, "teacher_path": run.teacher and run.teacher["path"]}
            shared.setdefault(json.dumps({k: cfg.get(k) for k in ("dataset", "data_dir", "preset", "eval_samples",
                                                                   "teacher_path", "guidance", "amp")}), cfg)
        for cfg in shared.values():
            print(f"shared caches for {cfg['dataset']} (reference statistics, classifier, teacher reference samples)",
                  flush=True)
            scoring.prepare_shared(cfg, args.device)
        if args.launcher == "local":
            launch_local(todo, args)
        else:
            submitted = dict((run.name, job) for run, job in launch_submitit(todo, args))
    if args.launcher == "slurm" and args.wait:          # every job of the grid, also those queued before
        jobs = [(run, submitted.get(run.name) or job_of(run, args.runs)) for run in runs
                if not is_done(run, args.results)]
        wait_jobs([(run, job) for run, job in jobs if job is not None])
    unfinished = [run.name for run in runs if not is_done(run, args.results)]
    if unfinished:
        print(f"{len(unfinished)} of {len(runs)} runs not finished yet (queued, running elsewhere or failed): rerun "
              "this command to see their state, resubmit what failed and write the tables once all are done", flush=True)
        return runs
    for (study, method), rows in tables.items():
        if args.curves:
            report.write_curves(method, args.preset, rows, args.results, final_only=args.budgets is not None)
            continue
        results = {setting: {s: report.read_record(run, args.results) for s, run in by_seed.items()} for setting, by_seed in rows}
        ref = reference(study, method)
        report.check_complete(results, rows, study, method, args.results)
        summary, cols = report.summarise(results, ref)
        configs = [run.config for _, by_seed in rows for run in by_seed.values()]
        inits = {setting: {s: report.read_init_sha(run, args.results) for s, run in by_seed.items()}
                 for setting, by_seed in rows}
        seeds = list(rows[0][1]) if args.recorded else args.seeds     # --seeds recorded: the table's own
        report.write_outputs(summary, cols, study=study, method=method, preset=args.preset, ref=ref, seeds=seeds,
                             configs=configs, inits=inits, out_dir=args.results, adjusted=args.preset not in FIRST_PUBLISHED,
                             note=notes.get((study, method)))   # --seeds recorded: the rows a table lacks
        if study in ("paper", "paper2") and args.shift_samples:
            memo, runs_dir = {}, None if args.tables else args.runs
            report.write_shift(method, args.preset, rows, args.results, args.shift_samples,
                               name=f"shift-{method}" if study == "paper" else f"shift-{study}-{method}",
                               shift=lambda run: shift_record(run, runs_dir, args.results, args.shift_samples,
                                                              args.device, memo))
    return runs


if __name__ == "__main__":
    cli.run_main(main)
