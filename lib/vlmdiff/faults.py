"""The workflow under faults: jobs and Snakemake killed at seeded moments, then resumed; a
second run on the same folder; and what two runs wrote, compared table by table.

Snakemake runs a workflow script as `python <workdir>/.snakemake/scripts/tmpXXXX.<script>.py`,
so a job's kind is its script's name, read from the process table.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from vlmdiff.logs import Log

LONG_JOB_KINDS = ("train_lm", "pretrain_vision", "train_vlm_stage1", "train_vlm_stage2",
                  "cache_activations", "train_base_sae", "adapt_sae", "attribution", "autointerp")
"""The workflow's long job kinds, by script: training, caching, SAEs, attribution, auto-interp."""
SNAKEMAKE_KILL_DURING = ("feature_stats", "lexical_filter", "ablation", "splice_eval")
"""Job kinds during one of which Snakemake itself is killed."""
RESUMING_JOBS = (("cache_activations", "vlm_train_shard"), ("adapt_sae", ""), ("autointerp", ""))
"""Job kinds (and a pattern of their log path) that resume, killed once they have state."""
_SCRIPT = re.compile(r"\.snakemake/scripts/tmp[^./]+\.(\w+)\.py$")
_POLL_S = 0.05
LOCKED = "cannot be locked"
INCOMPLETE = "--rerun-incomplete"
# what a killed job resumes from, found from its rule's log name under logs/: a cache shard's
# partial store, an SAE's training state, auto-interp's answered features
_OWN_STATE = (
    (re.compile(r"cache/(\w+?)_(\w+)_shard(\d+)\.log$"),
     "cache/{0}/{1}/shard{2}.zarr.partial/layer_0/c/*/0"),
    (re.compile(r"sae/(\w+?)_layer_(\d+)\.log$"), "sae/{0}/layer_{1}.checkpoint/train_state.pt"),
    (re.compile(r"report/autointerp\.log$"), "autointerp/cache/*/*.json"),
)
TABLE_SUFFIXES = (".csv", ".parquet", ".nc", ".json", ".tsv")
# what a run records of itself rather than of its results, left out of comparisons between
# runs: its speed (samples_per_s, seconds, attribution_s), and whether auto-interp answers came
# from its cache and what asking cost (a resumed run asks only the features still to do)
TIMING = re.compile(r"(_s|seconds)$|^(cached|prompt_tokens|completion_tokens|calls)$")
RUN_RECORDS = ("logs", "benchmarks")  # per-run records (times, log lines), not results


@dataclass
class Workflow:
    """One Snakemake invocation's settings: which workflow, on which folder and config."""

    snakefile: Path
    workdir: Path
    configfile: Path
    cores: int = 2
    extra: Sequence[str] = ()

    def command(self, *args: str) -> list[str]:
        # targets first: --configfile takes every word after it
        return [sys.executable, "-m", "snakemake", *args, "--cores", str(self.cores),
                "-s", str(self.snakefile), "--directory", str(self.workdir),
                *self.extra, "--configfile", str(self.configfile)]

    def run(self, *args: str, preexec: Callable[[], None] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True,
                              preexec_fn=preexec, timeout=timeout)

    def start(self, *args: str, output: Path) -> subprocess.Popen:
        """Snakemake in a session of its own (so that it and its jobs can be killed as one),
        its output to `output`."""
        with open(output, "w") as fh:
            return subprocess.Popen(self.command(*args), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)


def running_jobs(root: psutil.Process) -> dict[int, tuple[str, psutil.Process]]:
    """The workflow-script processes under `root`, by pid: `(script name, process)`."""
    jobs = {}
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return jobs
    for proc in children:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        # the Python process itself, not the shell that Snakemake starts it from
        if not cmd or not Path(cmd[0]).name.startswith("python"):
            continue
        match = next((m for c in cmd[1:] if (m := _SCRIPT.search(c))), None)
        if match:
            jobs[proc.pid] = (match.group(1), proc)
    return jobs


def job_log(proc: psutil.Process, workdir: Path) -> str | None:
    """The rule's log file a job process holds open (relative to `workdir`), if any."""
    try:
        files = proc.open_files()
    except psutil.Error:
        return None
    for f in files:
        path = Path(f.path)
        if path.suffix == ".log" and "logs" in path.parts:
            try:
                return str(path.relative_to(workdir))
            except ValueError:
                return str(path)
    return None


def cpu_seconds(proc: psutil.Process) -> float | None:
    """User and system CPU time a process has used so far (None once it is gone)."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def watch_durations(wf: Workflow, output: Path, log: Log = print) -> dict[str, list[float]]:
    """Run the workflow to the end uninterrupted; the CPU seconds each job used, by script.

    Kill moments are drawn in CPU time rather than wall time because a job's CPU time barely
    moves with the load on the machine, so a moment drawn below a job's reference CPU time
    falls inside the job however busy the cores are."""
    proc = wf.start(output=output)
    root = psutil.Process(proc.pid)
    used: dict[int, tuple[str, float]] = {}
    durations: dict[str, list[float]] = {}
    while proc.poll() is None:
        jobs = running_jobs(root)
        for pid, (script, job) in jobs.items():
            cpu = cpu_seconds(job)
            if cpu is not None:
                used[pid] = (script, cpu)
        for pid in [p for p in used if p not in jobs]:
            script, cpu = used.pop(pid)
            durations.setdefault(script, []).append(cpu)
        time.sleep(_POLL_S)
    for script, cpu in used.values():
        durations.setdefault(script, []).append(cpu)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {output}")
    log(f"uninterrupted run: {sum(map(len, durations.values()))} jobs timed")
    return durations


@dataclass
class Kill:
    """One planned SIGKILL: of a job of kind `target`, or of Snakemake and all its jobs
    (`target` "snakemake") while a job of kind `during` runs."""

    target: str
    during: str
    fraction: float
    """Moment of the kill as a fraction of the CPU time the kind took uninterrupted."""
    on_state: bool = False
    """Kill as soon as the job has written state it can resume from (`own_state`) instead."""
    job_match: str = ""
    """Only a job whose rule log path matches this pattern."""
    cpu_s: float = 0.0
    """CPU seconds the job had used when it was killed (at least its moment)."""
    wall_s: float = 0.0
    """Seconds from the job's first sight to its kill."""
    killed: bool = False
    job_log: str | None = None
    resumable: list[str] = field(default_factory=list)
    """What the killed job would resume from, on disk right after the kill (`own_state`)."""
    resumed: bool | None = None
    """Whether the killed job's log in the re-run says it resumed (None: nothing to resume)."""
    reruns: list[str] = field(default_factory=list)
    """What the next runs needed besides a plain re-run ("unlock", "rerun-incomplete")."""


def plan_kills(kinds: Sequence[str], snakemake_during: Sequence[str], seed: int,
               resuming: Sequence[tuple[str, str]] = (), lo: float = 0.1,
               hi: float = 0.6) -> list[Kill]:
    """A kill of one job of each kind in `kinds`, and one of Snakemake itself during a kind
    drawn from `snakemake_during`, each at a moment drawn from `[lo, hi]` of its duration; and
    for each `(kind, log pattern)` of `resuming`, a kill of such a job once it has written
    state to resume from. `hi` stays well below 1 so that a job running faster than in the
    reference run is still alive at its moment."""
    rng = random.Random(seed)
    kills = [Kill(kind, kind, rng.uniform(lo, hi)) for kind in kinds]
    kills += [Kill(kind, kind, 0.0, on_state=True, job_match=match) for kind, match in resuming]
    kills.append(Kill("snakemake", rng.choice(list(snakemake_during)), rng.uniform(lo, hi)))
    return kills


@dataclass
class Campaign:
    """What `kill_and_resume` did: the kills, the runs it took, and the lock refusal seen."""

    kills: list[Kill]
    runs: int = 0
    second_run_refused: str | None = None
    """The second Snakemake's message when started on the folder while the first ran."""

    def summary(self) -> dict[str, Any]:
        done = [k for k in self.kills if k.killed]
        return {
            "kills_planned": len(self.kills),
            "kills_made": len(done),
            "resumed_from_checkpoint": sum(bool(k.resumed) for k in done),
            "runs": self.runs,
            "second_run_refused": self.second_run_refused is not None,
            "kills": [asdict(k) for k in self.kills],
        }


def own_state(job_log: str | None, results: Path) -> list[str]:
    """The files a job whose rule logs to `job_log` would resume from, as they are now."""
    for pattern, state in _OWN_STATE:
        match = pattern.search(job_log or "")
        if match:
            found = results.glob(state.format(*match.groups()))
            return sorted(str(p.relative_to(results)) for p in found)
    return []


def kill_and_resume(wf: Workflow, results: Path, kills: Sequence[Kill],
                    durations: Mapping[str, Sequence[float]], logs: Path, *,
                    try_second_run: bool = True, max_runs: int = 40,
                    log: Log = print) -> Campaign:
    """Run the workflow until it finishes, SIGKILLing each planned job kind (and Snakemake
    once) on its first appearance, then re-running as a user would: `--unlock` when Snakemake
    says the folder is locked, `--rerun-incomplete` when it asks for it.

    A kill of a job that ends before its moment moves on to the next job of its kind; one whose
    kind never runs again is left `killed=False`. `durations` are an uninterrupted run's job
    CPU times by script (`watch_durations`); `results` is the run's results folder.
    """
    campaign = Campaign(list(kills))
    flags: list[str] = []
    logs.mkdir(parents=True, exist_ok=True)
    while campaign.runs < max_runs:
        campaign.runs += 1
        out = logs / f"run{campaign.runs:02d}.txt"
        proc = wf.start(*flags, output=out)
        pending = [k for k in campaign.kills if not k.killed]
        fired = _watch_and_kill(proc, wf, results, pending, durations, campaign, try_second_run,
                                logs)
        try_second_run = try_second_run and campaign.second_run_refused is None
        proc.wait()
        text = out.read_text()
        if fired is not None:
            log(f"run {campaign.runs}: killed {fired.target} during {fired.during} after "
                f"{fired.cpu_s:.1f} CPU s ({fired.wall_s:.1f} s); {len(fired.resumable)} "
                "resumable paths")
        if proc.returncode == 0 and fired is None:
            break
        if LOCKED in text:
            _note(campaign, "unlock")
            unlock = wf.run("--unlock")
            if unlock.returncode != 0:
                raise RuntimeError(f"--unlock failed: {unlock.stderr[-2000:]}")
        if INCOMPLETE in text and INCOMPLETE not in flags:
            _note(campaign, "rerun-incomplete")
            flags.append(INCOMPLETE)
        if fired is None and proc.returncode != 0 and LOCKED not in text and INCOMPLETE not in text:
            raise RuntimeError(f"run {campaign.runs} failed with no kill; see {out}")
    else:
        raise RuntimeError(f"the workflow did not finish within {max_runs} runs")
    for kill in campaign.kills:
        if kill.killed and kill.job_log and kill.resumable:
            log_path = wf.workdir / kill.job_log
            kill.resumed = log_path.is_file() and "resum" in log_path.read_text()
    return campaign


def _note(campaign: Campaign, what: str) -> None:
    last = next((k for k in reversed(campaign.kills) if k.killed), None)
    if last is not None:
        last.reruns.append(what)


@dataclass
class _Armed:
    kill: Kill
    job: psutil.Process
    seen: float
    log: str | None
    state: set[str]
    moment: float = 0.0  # CPU seconds


def _watch_and_kill(proc: subprocess.Popen, wf: Workflow, results: Path, pending: list[Kill],
                    durations: Mapping[str, Sequence[float]], campaign: Campaign,
                    try_second_run: bool, logs: Path) -> Kill | None:
    """Poll `proc`'s jobs; SIGKILL the first pending kill's target at its moment."""
    root = psutil.Process(proc.pid)
    armed: dict[int, _Armed] = {}
    seen: dict[int, float] = {}
    second: subprocess.Popen | None = None  # a second run on the same folder, once
    second_out = logs / "second_run.txt"
    locks = wf.workdir / ".snakemake" / "locks"
    while proc.poll() is None:
        now = time.monotonic()
        jobs = running_jobs(root)
        if try_second_run and second is None and locks.is_dir() and any(locks.iterdir()):
            second = wf.start(output=second_out)
        for pid, (script, job) in jobs.items():
            if pid not in armed:
                first = seen.setdefault(pid, now)
                if (a := _arm(script, job, first, pending, armed, durations, wf, results)):
                    armed[pid] = a
        if second is not None and second.poll() is None:
            # no kill while the second run is deciding: had the first run just ended, the
            # second would take the folder over
            time.sleep(_POLL_S)
            continue
        for pid, a in list(armed.items()):
            if pid not in jobs:  # ended before its moment: wait for the next job of the kind
                del armed[pid]
                continue
            cpu = cpu_seconds(a.job)
            if cpu is None:
                continue
            if a.kill.on_state:
                if not set(own_state(a.log, results)) - a.state:
                    continue
            elif cpu < a.moment:
                continue
            a.kill.job_log = a.log or job_log(a.job, wf.workdir)
            if a.kill.target == "snakemake":
                _kill_tree(root)
            else:
                a.job.send_signal(signal.SIGKILL)
            a.kill.killed, a.kill.cpu_s, a.kill.wall_s = True, cpu, now - a.seen
            a.kill.resumable = own_state(a.kill.job_log, results)
            _second_run_outcome(second, second_out, campaign)
            return a.kill
        time.sleep(_POLL_S)
    _second_run_outcome(second, second_out, campaign)
    return None


def _second_run_outcome(second: subprocess.Popen | None, output: Path,
                        campaign: Campaign) -> None:
    if second is None:
        return
    second.wait()
    text = output.read_text()
    if second.returncode != 0 and LOCKED in text:
        campaign.second_run_refused = _locked_line(text)


def _arm(script: str, job: psutil.Process, first: float, pending: list[Kill],
         armed: Mapping[int, _Armed], durations: Mapping[str, Sequence[float]], wf: Workflow,
         results: Path) -> _Armed | None:
    """The pending kill that wants this job, if any; kills that need the job's log (to match
    it, or to watch its state) wait until the job has opened it."""
    taken = [a.kill for a in armed.values()]
    free = [k for k in pending if k.during == script and all(k is not t for t in taken)]
    log_name = job_log(job, wf.workdir) if any(k.job_match or k.on_state for k in free) else None
    for kill in free:
        needs_log = kill.job_match or kill.on_state
        if needs_log and (log_name is None or not re.search(kill.job_match, log_name)):
            continue
        moment = kill.fraction * min(durations.get(script, [1.0]))
        state = set(own_state(log_name, results)) if kill.on_state else set()
        return _Armed(kill, job, first, log_name, state, moment)
    return None


def _kill_tree(root: psutil.Process) -> None:
    """SIGKILL a process and everything under it, as a scheduler ending an allocation does."""
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    with contextlib.suppress(OSError):  # anything started meanwhile in its session
        os.killpg(root.pid, signal.SIGKILL)


def _locked_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if LOCKED in line), text[-500:])


# --------------------------------------------------------------------------- comparing runs


def result_files(results: Path) -> dict[str, Path]:
    """Every file a run wrote under `results`, by relative path, but its logs and timings."""
    return {
        str(p.relative_to(results)): p
        for p in sorted(results.rglob("*"))
        if p.is_file() and p.relative_to(results).parts[0] not in RUN_RECORDS
        and not p.name.startswith(".snakemake")
    }


def _untimed(obj: Any) -> Any:
    """`obj` (parsed JSON) without the keys that hold a run's own timings."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not TIMING.search(str(k))}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _same_table(a: Path, b: Path) -> bool:
    """Whether two tables hold the same values, timing columns and attributes aside."""
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix in (".parquet", ".csv", ".tsv"):
        def read(p: Path) -> pd.DataFrame:
            if p.suffix == ".parquet":
                return pd.read_parquet(p)
            return pd.read_csv(p, sep="\t" if p.suffix == ".tsv" else ",")

        ta, tb = read(a), read(b)
        untimed = [c for c in ta.columns if not TIMING.search(str(c))]
        return list(ta.columns) == list(tb.columns) and ta[untimed].equals(tb[untimed])
    if a.suffix == ".json":
        return _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text()))
    if a.suffix == ".nc":
        import xarray as xr

        with xr.open_dataset(a) as da, xr.open_dataset(b) as db:
            for d in (da, db):
                d.attrs = _untimed(d.attrs)
            return bool(da.identical(db))
    return False


def compare_runs(a: Path, b: Path) -> dict[str, list[str]]:
    """Two runs' results folders compared file by file: `tables` that differ in content
    (`TABLE_SUFFIXES`, read and compared as values, `TIMING` columns and keys aside), other
    files that differ byte for byte (`other`), and files only one run has (`missing`)."""
    fa, fb = result_files(a), result_files(b)
    diff: dict[str, list[str]] = {"tables": [], "other": [], "missing": []}
    diff["missing"] = sorted(fa.keys() ^ fb.keys())
    for name in sorted(fa.keys() & fb.keys()):
        pa, pb = fa[name], fb[name]
        if pa.suffix in TABLE_SUFFIXES:
            if not _same_table(pa, pb):
                diff["tables"].append(name)
        elif pa.read_bytes() != pb.read_bytes():
            diff["other"].append(name)
    return diff
