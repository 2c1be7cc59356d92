"""Seed sweeps: one main.py training per seed, all in one folder, one after another, several at once, or as a
SLURM job array (submitit). Running the same command again skips the seeds that finished and resumes the ones
that stopped from their latest_checkpoint.pth.

    python sweep.py --seeds 0 1 2 -- --dataset mitstates --dataset_path ../data/mitstates --model tirg \\
        --loss soft_triplet --learning_rate_decay_frequency 50000 --weight_decay 5e-5
    python sweep.py --seeds 0 1 2 --launcher slurm --partition gpu --timeout 1440 -- --dataset ...
    python report.py logs/<NAME>                      # the sweep's results beside the published numbers

Layout: ``<--log_dir>/<NAME>/sweep.json`` (the main.py flags), and per seed ``seed<s>/console.log`` (everything the
run printed), ``seed<s>/done`` (written when main.py exits 0) and main.py's run folder
``seed<s>/<time>_<host>_seed<s>/``.
NAME defaults to ``<dataset>-<model>-<hash of the sorted main.py flags>``, so the same command finds its folder.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from typing import Callable, Sequence

from errors import OneLineParser, UserInputError, report_internal_error

try:
    import submitit  # optional: only --launcher slurm needs it
except ImportError:  # pragma: no cover (depends on the installation)
    submitit = None

PROG = "sweep.py"
HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_PY = os.path.join(HERE, "main.py")
SWEEP_JSON, CONSOLE, DONE = "sweep.json", "console.log", "done"
CHECKPOINT = "latest_checkpoint.pth"
LOCK = "run.lock"  # runlog.RunLock's file: '<host> <pid>' of the process training in a run folder
# main.py flags that sweep.py sets itself, and why
RESERVED = {"--seed": "sweep.py passes each of --seeds", "--log_dir": "sweep.py puts every run under its folder "
            "(use sweep.py's --log_dir)", "--resume": "sweep.py resumes stopped runs itself",
            "--comment": "sweep.py names each run folder by its seed"}
STOP_WAIT_S = 120  # how long a pre-empted job waits for main.py to save its checkpoint
_ITERATION = re.compile(r"^iteration (\d+)\b", re.M)  # main.py's summary table after an evaluation
_PROGRESS = re.compile(r"train: +\d+%\|[^|\r\n]*\| *(\d+)/\d+ \[")  # main.py's training bar '| it/num_iters ['


def get_args_parser() -> argparse.ArgumentParser:
    """sweep.py's own flags (main.py's come after ``--``)."""
    p = OneLineParser(prog=PROG, usage="%(prog)s --seeds S [S ...] [options] -- <main.py flags>",
                      description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="one run per seed")
    p.add_argument("--name", type=str, default="", help="the sweep's folder name ('' = <dataset>-<model>-<hash of "
                                                       "the main.py flags>)")
    p.add_argument("--log_dir", type=str, default="logs", help="parent of the sweep's folder")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local = on this machine; slurm = a SLURM job array through submitit")
    p.add_argument("--parallel", type=int, default=1, help="local: runs at once")
    g = p.add_argument_group("slurm")
    g.add_argument("--partition", type=str, default="", help="SLURM partition ('' = the cluster's default)")
    g.add_argument("--gpus_per_node", type=int, default=1, help="GPUs per node; several run main.py under torchrun")
    g.add_argument("--nodes", type=int, default=1, help="nodes per run")
    g.add_argument("--timeout", type=int, default=1440, help="minutes per job; a job that reaches it (or is "
                                                              "pre-empted) is requeued and resumes")
    g.add_argument("--wait", action="store_true", help="wait for the jobs and print how each ended")
    g.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm", help=argparse.SUPPRESS)
    return p


def flag_pairs(flags: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """main.py flags as ``(name, values)`` pairs: ``--a 1 --b=x y`` -> [('--a', ('1',)), ('--b', ('x', 'y'))]."""
    pairs: list[tuple[str, list[str]]] = []
    for token in flags:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            pairs.append((name, [value] if eq else []))
        elif not pairs:
            raise UserInputError(f"main.py flags start with a --flag, got {token!r} after '--'")
        else:
            pairs[-1][1].append(token)
    return [(name, tuple(values)) for name, values in pairs]


def check_main_flags(flags: Sequence[str]) -> None:
    """UserInputError for a main.py flag that sweep.py sets itself (or an abbreviation of one)."""
    for name, _ in flag_pairs(flags):
        for reserved, why in RESERVED.items():
            if name == reserved or (len(name) >= 5 and reserved.startswith(name)):
                raise UserInputError(f"main.py flag {name} after '--': {why}; drop it")


def sweep_name(flags: Sequence[str]) -> str:
    """``<dataset>-<model>-<8 hex>``: main.py's --dataset and --model (their defaults when not given) and a hash
    of the flags sorted by name, so that the same flags in another order name the same sweep."""
    pairs = flag_pairs(flags)
    values = {name: vals for name, vals in pairs}
    safe = lambda v: re.sub(r"[^A-Za-z0-9_.-]", "_", v) or "x"  # noqa: E731
    dataset = safe(" ".join(values.get("--dataset", ("synthetic",))))
    model = safe(" ".join(values.get("--model", ("composeAE",))))
    digest = hashlib.sha1(json.dumps(sorted(pairs)).encode()).hexdigest()[:8]
    return f"{dataset}-{model}-{digest}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Where a sweep's runs live and how each is started (picklable: a SLURM job carries it)."""

    folder: str  # absolute: <log_dir>/<name>
    flags: tuple[str, ...]  # main.py's, without --seed / --log_dir / --resume / --comment
    python: str = sys.executable
    main_py: str = MAIN_PY
    cwd: str = dataclasses.field(default_factory=os.getcwd)  # relative paths in the flags are the user's

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.folder, f"seed{seed}")

    def path(self, seed: int, name: str) -> str:
        return os.path.join(self.seed_dir(seed), name)

    def main_args(self, seed: int, resume: str = "") -> list[str]:
        """main.py's arguments for ``seed`` (``--resume`` a checkpoint when given)."""
        extra = ["--resume", resume] if resume else []
        return [*self.flags, "--seed", str(seed), "--log_dir", self.seed_dir(seed), "--comment", f"_seed{seed}",
                *extra]

    def command(self, seed: int, resume: str = "") -> list[str]:
        return [self.python, self.main_py, *self.main_args(seed, resume)]


@dataclasses.dataclass
class Plan:
    """What a seed needs: 'done' (skip), 'resume' (from ``checkpoint``) or 'new'."""

    state: str
    run_folder: str = ""
    checkpoint: str = ""
    iteration: int | None = None


def plan_seed(sweep: Sweep, seed: int) -> Plan:
    """'done' when the seed's done marker exists; else 'resume' from the newest latest_checkpoint.pth of its run
    folders; else 'new'."""
    try:
        with open(sweep.path(seed, DONE), encoding="utf-8") as f:
            done = json.load(f)
        return Plan("done", done.get("run_folder", ""), iteration=done.get("iteration"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):  # a torn marker: the run is resumed, which costs nothing
        pass
    seed_dir = sweep.seed_dir(seed)
    names = sorted(os.listdir(seed_dir)) if os.path.isdir(seed_dir) else []
    checkpoints = [p for p in (os.path.join(seed_dir, n, CHECKPOINT) for n in names) if os.path.isfile(p)]
    if checkpoints:
        newest = max(checkpoints, key=os.path.getmtime)
        return Plan("resume", os.path.dirname(newest), newest)
    return Plan("new")


def last_iteration(console_text: str) -> int | None:
    """The last training iteration main.py's console output shows (progress bar or summary table); None if none."""
    seen = [int(m) for m in _ITERATION.findall(console_text)] + [int(m) for m in _PROGRESS.findall(console_text)]
    return max(seen) if seen else None


def read_since_start(path: str) -> str:
    """The console log after its last start line (the current attempt's output); '' when there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.rfind(f"=== {PROG}"):] if f"=== {PROG}" in text else text


def run_folder_of(sweep: Sweep, seed: int) -> str:
    """The seed's run folder: the one with the newest metrics.json, else ''."""
    seed_dir = sweep.seed_dir(seed)
    found = [os.path.join(seed_dir, n) for n in os.listdir(seed_dir)
             if os.path.isfile(os.path.join(seed_dir, n, "metrics.json"))] if os.path.isdir(seed_dir) else []
    return max(found, key=lambda p: os.path.getmtime(os.path.join(p, "metrics.json"))) if found else ""


def write_done(sweep: Sweep, seed: int, iteration: int | None) -> str:
    """The seed's done marker (JSON: its run folder and last iteration); returns the run folder."""
    folder = run_folder_of(sweep, seed)
    record = {"seed": seed, "run_folder": folder, "iteration": iteration,
              "finished": datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname()}
    tmp = f"{sweep.path(seed, DONE)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, sweep.path(seed, DONE))
    return folder


def start_line(command: list[str]) -> str:
    return f"=== {PROG} {datetime.now().isoformat(timespec='seconds')}: {shlex.join(command)}\n"


def prepare_folder(sweep: Sweep, seeds: list[int]) -> None:
    """Creates the sweep folder and its sweep.json, or checks that an existing one holds the same main.py flags."""
    path = os.path.join(sweep.folder, SWEEP_JSON)
    try:
        os.makedirs(sweep.folder, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create the sweep folder {sweep.folder} ({exc.strerror or exc}); pass another "
                             f"--log_dir") from None
    record = {"flags": list(sweep.flags), "seeds": []}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{path} is unreadable ({type(exc).__name__}); delete it to start the sweep's "
                                 f"record anew") from None
        old = [str(f) for f in record.get("flags", [])] if isinstance(record, dict) else []
        if not isinstance(record, dict) or old != list(sweep.flags):
            raise UserInputError(f"{sweep.folder} holds a sweep of other main.py flags ({shlex.join(old)}); pass "
                                 f"another --name, or the same flags")
    record["seeds"] = sorted(set(record.get("seeds", [])) | set(seeds))
    record.update(main_py=sweep.main_py, python=sweep.python, cwd=sweep.cwd)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


class Console:
    """The sweep's progress lines on stdout, one call at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)


def describe(plan: Plan) -> str:
    """'new run' or 'resuming <checkpoint>'."""
    return {"new": "new run", "resume": f"resuming {plan.checkpoint}"}.get(plan.state, plan.state)


def run_local_seed(sweep: Sweep, seed: int, say: Callable[[str], None]) -> str:
    """Runs (or skips, or resumes) one seed on this machine; returns its end state ('done', 'skipped',
    'failed (exit N)')."""
    plan = plan_seed(sweep, seed)
    if plan.state == "done":
        say(f"seed {seed}: skipped (done), iteration {plan.iteration}, {plan.run_folder}")
        return "skipped"
    os.makedirs(sweep.seed_dir(seed), exist_ok=True)
    command = sweep.command(seed, plan.checkpoint)
    console = sweep.path(seed, CONSOLE)
    with open(console, "a", encoding="utf-8") as log:
        log.write(start_line(command))
        log.flush()
        say(f"seed {seed}: running ({describe(plan)}), output in {console}")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=sweep.cwd)
        try:
            rc = process.wait()
        except KeyboardInterrupt:  # main.py got the same Ctrl-C: it saves a checkpoint, then exits
            process.wait()
            raise
    iteration = last_iteration(read_since_start(console))
    if rc == 0:
        folder = write_done(sweep, seed, iteration)
        say(f"seed {seed}: done, iteration {iteration}, {folder}")
        return "done"
    say(f"seed {seed}: failed (exit {rc}), last iteration seen {iteration}; see {console}")
    return f"failed (exit {rc})"


def run_local(sweep: Sweep, seeds: list[int], parallel: int, say: Callable[[str], None]) -> dict[int, str]:
    """Every seed on this machine, ``parallel`` at a time; ``{seed: end state}``."""
    if parallel <= 1:
        return {seed: run_local_seed(sweep, seed, say) for seed in seeds}
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {seed: pool.submit(run_local_seed, sweep, seed, say) for seed in seeds}
        return {seed: future.result() for seed, future in futures.items()}


def stop_running_main(sweep: Sweep, seed: int, wait_s: float = STOP_WAIT_S) -> None:
    """Asks the main.py that trains ``seed`` on this host (its run folder's run.lock) to save and stop (SIGUSR1, as
    SLURM's --signal does) and waits up to ``wait_s`` for it to end."""
    plan = plan_seed(sweep, seed)
    folder = plan.run_folder or run_folder_of(sweep, seed)
    try:
        with open(os.path.join(folder, LOCK)) as f:
            host, pid = f.read().split()
        pid = int(pid)
    except (OSError, ValueError):
        return
    if host != socket.gethostname() or pid == os.getpid():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # ProcessLookupError once it has ended
            time.sleep(1)


_Checkpointable = submitit.helpers.Checkpointable if submitit is not None else object


class SeedJob(_Checkpointable):
    """The callable a SLURM job runs for one seed: main.py as a command (submitit's CommandFunction), its output
    appended to the seed's console.log, the done marker written after exit code 0. On pre-emption or timeout
    submitit calls ``checkpoint``, which has main.py save and requeues a call that resumes from that checkpoint."""

    def __init__(self, sweep: Sweep, gpus_per_node: int = 1, nodes: int = 1) -> None:
        self.sweep, self.gpus_per_node, self.nodes = sweep, gpus_per_node, nodes

    def launcher(self) -> tuple[list[str], int]:
        """``(prefix, node rank)``: torchrun on every node for several GPUs per run, else main.py alone."""
        if self.gpus_per_node * self.nodes <= 1:
            return [self.sweep.python, self.sweep.main_py], 0
        env = submitit.JobEnvironment()
        digits = re.sub(r"\D", "", str(env.job_id).split("_")[0]) or "0"
        return [self.sweep.python, "-m", "torch.distributed.run", "--nnodes", str(self.nodes), "--nproc_per_node",
                str(self.gpus_per_node), "--node_rank", str(env.node), "--master_addr", env.hostnames[0],
                "--master_port", str(20000 + int(digits) % 20000), self.sweep.main_py], env.node

    def __call__(self, seed: int, resume: str = "") -> dict:
        plan = plan_seed(self.sweep, seed)
        if plan.state == "done":
            return {"seed": seed, "state": "skipped", "iteration": plan.iteration, "run_folder": plan.run_folder}
        resume = resume if resume and os.path.isfile(resume) else plan.checkpoint
        prefix, node = self.launcher()
        command = prefix + self.sweep.main_args(seed, resume)
        os.makedirs(self.sweep.seed_dir(seed), exist_ok=True)
        console = self.sweep.path(seed, CONSOLE if node == 0 else f"console.node{node}.log")
        with open(console, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            log.write(start_line(command))
            log.flush()
            submitit.helpers.CommandFunction(command, verbose=True, cwd=self.sweep.cwd)()
        iteration = last_iteration(read_since_start(console))
        folder = write_done(self.sweep, seed, iteration) if node == 0 else ""
        return {"seed": seed, "state": "done", "iteration": iteration, "run_folder": folder}

    def checkpoint(self, seed: int, resume: str = ""):
        """The requeued call: main.py (if it runs here) saves and stops first, then the call resumes from the
        seed's newest latest_checkpoint.pth."""
        stop_running_main(self.sweep, seed)
        plan = plan_seed(self.sweep, seed)
        return submitit.helpers.DelayedSubmission(self, seed, resume=plan.checkpoint or resume)


@contextlib.contextmanager
def _importable_here():
    """PYTHONPATH holds this folder while jobs are submitted, so that a job's Python finds sweep.py."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = HERE + (os.pathsep + before if before else "")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def submit(sweep: Sweep, seeds: list[int], args: argparse.Namespace, say: Callable[[str], None]) -> dict[int, str]:
    """The seeds that are not done as one submitit job array; with --wait (or a local/debug --cluster) waits for
    them. ``{seed: state}``."""
    if submitit is None:
        raise UserInputError("--launcher slurm needs submitit: pip install submitit==1.5.4")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserInputError("--launcher slurm: sbatch is not on PATH; run sweep.py on a SLURM login node")
    states = {}
    todo = []
    for seed in seeds:
        plan = plan_seed(sweep, seed)
        if plan.state == "done":
            say(f"seed {seed}: skipped (done), iteration {plan.iteration}, {plan.run_folder}")
            states[seed] = "skipped"
        else:
            todo.append(seed)
    if not todo:
        return states
    executor = submitit.AutoExecutor(folder=os.path.join(sweep.folder, "submitit"), cluster=args.cluster)
    executor.update_parameters(name=os.path.basename(sweep.folder), timeout_min=args.timeout, nodes=args.nodes,
                               gpus_per_node=args.gpus_per_node, tasks_per_node=1,
                               **({"slurm_partition": args.partition} if args.partition else {}))
    with _importable_here():
        jobs = executor.map_array(SeedJob(sweep, args.gpus_per_node, args.nodes), todo)
    for seed, job in zip(todo, jobs):
        say(f"seed {seed}: submitted as job {job.job_id} ({describe(plan_seed(sweep, seed))}), output in "
            f"{sweep.path(seed, CONSOLE)}")
        states[seed] = "submitted"
    if args.wait or args.cluster != "slurm":
        for seed, job in zip(todo, jobs):
            try:
                result = job.result()
                say(f"seed {seed}: done, iteration {result['iteration']}, {result['run_folder']}")
                states[seed] = "done"
            except Exception as exc:  # noqa: BLE001 (a failed job: its line, the sweep goes on)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
                say(f"seed {seed}: failed (job {job.job_id}: {first}); see {sweep.path(seed, CONSOLE)}")
                states[seed] = "failed"
    return states


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(sweep.py's arguments, main.py's flags after the first '--')."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def resolve(args: argparse.Namespace, flags: list[str]) -> tuple[Sweep, list[int]]:
    """The sweep and its seeds from the parsed flags; UserInputError for bad input."""
    check_main_flags(flags)
    seeds = list(dict.fromkeys(args.seeds))
    if len(seeds) != len(args.seeds):
        raise UserInputError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice; give each once")
    if any(s < 0 for s in seeds):
        raise UserInputError(f"--seeds: seeds are 0 or more, got {min(seeds)}")
    if args.parallel < 1:
        raise UserInputError(f"--parallel must be 1 or more, got {args.parallel}")
    for name in ("gpus_per_node", "nodes", "timeout"):
        if getattr(args, name) < (0 if name == "gpus_per_node" else 1):
            raise UserInputError(f"--{name} {getattr(args, name)} is out of range")
    name = args.name or sweep_name(flags)
    if name in (".", "..") or any(sep and sep in name for sep in (os.sep, os.altsep, "\0")):
        raise UserInputError(f"--name {name!r}: a folder name, without '{os.sep}'")
    return Sweep(folder=os.path.abspath(os.path.join(args.log_dir, name)), flags=tuple(flags)), seeds


def main(argv: Sequence[str] | None = None) -> int:
    ours, flags = split_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = get_args_parser().parse_args(ours)
    except SystemExit as exc:
        return int(exc.code or 0)
    say = Console()
    try:
        sweep, seeds = resolve(args, flags)
        prepare_folder(sweep, seeds)
        say(f"sweep {sweep.folder}: seeds {' '.join(map(str, seeds))}")
        if args.launcher == "slurm":
            states = submit(sweep, seeds, args, say)
        else:
            states = run_local(sweep, seeds, args.parallel, say)
    except UserInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the runs saved what they had; run the same command again to resume",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 (the entry point's last resort: one line, traceback in a file)
        return report_internal_error(PROG, exc)
    failed = [s for s, state in states.items() if state.startswith("failed")]
    kinds = [state.split()[0] for state in states.values()]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("done", "skipped", "submitted", "failed") if k in kinds)
    say(f"sweep {sweep.folder}: {counts}; report: python report.py {sweep.folder}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
