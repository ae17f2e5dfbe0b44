"""Benchmark cuda-toggle-all on the fake GPU: its own overhead, and its parallel protocol against the seed's.

    python -m benchmarks.bench_toggle [--repetitions 3] [--workers 2 8] [--json-out bench.json]

Self-contained: a private fake GPU in a temporary folder, the fake libcuda built with gcc, fake vLLM trees
(tests/fakes/fake_tree.py) whose checkpoint and restore take --transfer-s seconds per worker. Every process it
starts is killed at the end, also on Ctrl-C or SIGTERM. What is measured is the protocol and the tool's own
cost (process discovery, safety checks, state reads, verify), not GPU copy speed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from loguru import logger

from benchmarks.seed_protocol import seed_cuda_pids, seed_toggle_all
from entrypoint.base.config import DEFAULT_MATCH, Config, load_config
from entrypoint.base.errors import ToolError
from entrypoint.cuda.cli_backend import CliBackend
from entrypoint.suspend.api import RESUME, SUSPEND, move_to
from entrypoint.suspend.safety import REQUIRED_SERVER_ENV

REPO = Path(__file__).resolve().parent.parent
FAKES_DIR = REPO / "tests" / "fakes"
sys.path.insert(0, str(FAKES_DIR))
import fakegpu  # noqa: E402

# A correctly configured TP=2 vLLM, as the fake trees are started (the safety checks refuse otherwise).
SAFE_ENV = dict(REQUIRED_SERVER_ENV)
SAFE_ARGS = "--tensor-parallel-size 2 --disable-custom-all-reduce"
VLLM_TITLE = DEFAULT_MATCH[0]

GPU_TOTAL_MIB, GPU_BASELINE_MIB = 81559, 4  # an idle H100 80GB, as the tests' fake GPU
PR_SET_PDEATHSIG = 1

OURS_METHODS = {"cli": "ours-cli", "driver": "ours-driver"}
SEED_METHOD = "seed-cli"
DIRECTIONS = {SUSPEND: "suspend", RESUME: "resume"}
# The backend's own work in a transition (ToggleResult.phases); everything else the tool does is overhead.
BACKEND_PHASES = ("lock", "checkpoint", "restore", "unlock")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the benchmark (possibly deferred by the tool until its phase finished)."""


@dataclass
class FakeTree:
    process: subprocess.Popen
    tag: str  # in the root's command line: CUDA_TOGGLE_MATCH finds this tree and no other
    root: int
    dispatcher: int
    workers: list[int]

    @property
    def ours_pids(self) -> list[int]:
        """What cuda-toggle-all moves: every CUDA process but the dispatcher, which it freezes instead."""
        return sorted([self.root, *self.workers])

    def family(self) -> list[psutil.Process]:
        members = []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            members = [root, *root.children(recursive=True)]
        return members


class FakeMachine:
    """A fake GPU machine in a temporary folder; the environment variables the fakes read are set in
    os.environ (the fake binaries and the fake libcuda are child processes of this one) and put back on exit."""

    def __init__(self, gpu_count: int, transfer_s: float, mib_per_worker: int):
        self.gpu_count = gpu_count
        self.transfer_s = transfer_s
        self.mib_per_worker = mib_per_worker
        self.trees: list[FakeTree] = []
        self.saved_environ: dict[str, str] | None = None

    def __enter__(self) -> FakeMachine:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-toggle-"))
        self.state_dir = self.folder / "fake-gpu"
        fakegpu.write_gpus(
            self.state_dir,
            [(i, f"GPU-{uuid.UUID(int=i + 1)}", GPU_TOTAL_MIB, GPU_BASELINE_MIB) for i in range(self.gpu_count)],
        )
        # checkpoint and restore of a worker take mib/speed seconds in the fakes
        (self.state_dir / "speed_mib_per_s").write_text(f"{self.mib_per_worker / self.transfer_s}\n")
        self.libcuda = self.folder / "libcuda.so.1"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(self.libcuda), str(FAKES_DIR / "fake_libcuda.c")], check=True
        )
        self.saved_environ = dict(os.environ)
        os.environ["FAKE_CUDA_STATE_DIR"] = str(self.state_dir)
        os.environ["FAKE_CUDA_CHECKPOINT"] = str(FAKES_DIR / "cuda-checkpoint")
        # The fakes start with `#!/usr/bin/env python3`: this interpreter's folder first makes that a plain
        # interpreter start (~50 ms, near the real binary's 40 ms per call) rather than, say, a pyenv shim's.
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(FAKES_DIR), os.environ["PATH"]])
        return self

    def __exit__(self, *exc: object) -> None:
        # a second Ctrl-C must not cut the cleanup short and leave fake processes behind
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.kill_everything()
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.saved_environ is not None:
            os.environ.clear()
            os.environ.update(self.saved_environ)
        shutil.rmtree(self.folder, ignore_errors=True)

    def config(self, tree: FakeTree) -> Config:
        """The tool's defaults (verify sleeps, lock timeouts...), pointed at the fakes and at this tree only."""
        return load_config(
            {
                "CUDA_TOGGLE_RUN_DIR": str(self.folder / "run"),
                "CUDA_TOGGLE_MATCH": tree.tag,
                "CUDA_TOGGLE_SUPERVISOR_URL": f"unix://{self.folder}/no-supervisord.sock",
                "CUDA_TOGGLE_GPU_QUERY": "nvidia-smi",
                "CUDA_TOGGLE_NVIDIA_SMI": str(FAKES_DIR / "nvidia-smi"),
                "CUDA_CHECKPOINT_BIN": str(FAKES_DIR / "cuda-checkpoint"),
                "CUDA_TOGGLE_LIBCUDA": str(self.libcuda),
            }
        )

    def start_tree(self, workers: int, ready_timeout_s: float = 60.0) -> FakeTree:
        tag = f"bench-toggle-{uuid.uuid4().hex[:12]}"
        environ = {**os.environ, **SAFE_ENV}
        # Own session: a Ctrl-C in the terminal reaches only the benchmark, which then stops the tree in
        # order. PDEATHSIG: if the benchmark is killed outright, the tree dies with it.
        process = subprocess.Popen(
            [
                sys.executable,
                str(FAKES_DIR / "fake_tree.py"),
                "--workers",
                str(workers),
                "--mib",
                str(self.mib_per_worker),
                "--root-title",
                f"{VLLM_TITLE} --tag {tag}",
                "--args",
                SAFE_ARGS,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=environ,
            start_new_session=True,
            preexec_fn=lambda: ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL),
        )
        tree = FakeTree(process, tag, process.pid, 0, [])
        self.trees.append(tree)
        ready, _, _ = select.select([process.stdout], [], [], ready_timeout_s)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fake_tree.py with {workers} workers did not report its PIDs in {ready_timeout_s} s")
        pids = json.loads(line)
        tree.root, tree.dispatcher, tree.workers = pids["root"], pids["dispatcher"], pids["workers"]
        return tree

    def stop_tree(self, tree: FakeTree) -> None:
        family = tree.family()
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGCONT)  # a frozen dispatcher would not die of SIGTERM
                member.kill()
        psutil.wait_procs(family, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            tree.process.wait(timeout=10)
        if tree.process.stdout:
            tree.process.stdout.close()
        self.trees.remove(tree)

    def kill_everything(self) -> None:
        """Every tree, then anything else that carries this machine's FAKE_CUDA_STATE_DIR in its environment:
        all of those were started by this benchmark (fake binaries left hanging by an interrupted call)."""
        for tree in list(self.trees):
            self.stop_tree(tree)
        ours = str(self.state_dir)
        leftovers = []
        for process in psutil.process_iter():
            if process.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if process.environ().get("FAKE_CUDA_STATE_DIR") == ours:
                    process.kill()
                    leftovers.append(process)
        psutil.wait_procs(leftovers, timeout=10)

    def states(self, pids: list[int]) -> dict[int, str | None]:
        return {pid: fakegpu.read_state(pid, self.state_dir) for pid in pids}

    def wait_until_none_stopped(self, tree: FakeTree, timeout_s: float = 5.0) -> None:
        """The seed asks every process of the tree for its state, and that hangs on a stopped one: the tool's
        resume must have continued the dispatcher first."""
        deadline = time.monotonic() + timeout_s
        while any(fakegpu.process_status(p.pid) in ("T", "t") for p in tree.family()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"a process of the tree {tree.root} is still stopped {timeout_s} s after resume")
            time.sleep(0.01)


def run_ours(machine: FakeMachine, tree: FakeTree, backend: str, target: str) -> dict:
    """One move_to() call (the library behind `cuda-toggle-all checkpointed|running`)."""
    began = time.monotonic()
    try:
        result = move_to(target, machine.config(tree), backend_name=backend)
    except ToolError as error:
        # move_to() defers SIGINT/SIGTERM until its phase is finished or rolled back; a rolled-back suspend
        # says so only in its message
        if "interrupted by" in str(error) or (error.result is not None and error.result.interrupted):
            raise Interrupted(str(error))
        raise
    wall = time.monotonic() - began
    if result.interrupted:
        raise Interrupted(result.interrupted)
    backend_ops = sum(seconds for phase, seconds in result.phases.items() if phase in BACKEND_PHASES)
    return {
        "wall_s": wall,
        "tool_seconds": result.seconds,
        "backend_ops_s": backend_ops,
        "overhead_s": wall - backend_ops,
        "verify_s": result.phases.get("verify", 0.0),
        "phases": dict(result.phases),
        "lock_rounds": result.lock_rounds,
    }


def run_seed(machine: FakeMachine, tree: FakeTree, target: str, verify_sleep_s: float) -> dict:
    """The seed's script: find the CUDA PIDs of the tree (timed apart), then toggle them one by one and verify."""
    backend = CliBackend(machine.config(tree))
    machine.wait_until_none_stopped(tree)
    began = time.monotonic()
    pids = seed_cuda_pids(backend, tree.root)
    discovery = time.monotonic() - began
    expected = sorted([tree.root, tree.dispatcher, *tree.workers])
    if pids != expected:
        raise RuntimeError(f"the seed's discovery found {pids}, expected {expected}")
    outcome = seed_toggle_all(backend, pids, target, verify_sleep_s=verify_sleep_s)
    if not outcome["converged"] or outcome["errors"]:
        raise RuntimeError(f"the seed's {DIRECTIONS[target]} did not converge: {outcome}")
    return {
        "wall_s": outcome["seconds"],
        "discovery_s": discovery,
        "toggle_s": outcome["toggle_seconds"],
        "verify_s": outcome["verify_seconds"],
        "verify_reads": outcome["verify_reads"],
        "pids": len(pids),
    }


def check_states(machine: FakeMachine, pids: list[int], target: str, method: str) -> None:
    states = machine.states(pids)
    if any(state != target for state in states.values()):
        raise RuntimeError(f"after {method} {DIRECTIONS[target]}, not every PID is {target}: {states}")


def rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def measure(
    machine: FakeMachine, workers: int, repetitions: int, backends: list[str], verify_sleep_s: float, quiet: bool
) -> dict[str, dict[str, list[dict]]]:
    """samples[method][direction]: each repetition does a suspend+resume cycle with every method, in an order
    rotated from one repetition to the next, so that a slow drift of the machine weighs on all of them."""
    methods = [OURS_METHODS[b] for b in backends] + [SEED_METHOD]
    samples: dict[str, dict[str, list[dict]]] = {m: {d: [] for d in DIRECTIONS.values()} for m in methods}
    tree = machine.start_tree(workers)
    try:
        for repetition in range(repetitions):
            for method in rotated(methods, repetition):
                for target in (SUSPEND, RESUME):
                    if method == SEED_METHOD:
                        sample = run_seed(machine, tree, target, verify_sleep_s)
                        check_states(machine, [tree.dispatcher, *tree.ours_pids], target, method)
                    else:
                        backend = method.removeprefix("ours-")
                        sample = run_ours(machine, tree, backend, target)
                        check_states(machine, tree.ours_pids, target, method)
                    samples[method][DIRECTIONS[target]].append(sample)
                    if not quiet:
                        print(
                            f"  {workers} workers, run {repetition + 1}/{repetitions}: {method:<11} "
                            f"{DIRECTIONS[target]:<7} {sample['wall_s']:6.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        machine.stop_tree(tree)
    return samples


def median(samples: list[dict], key: str) -> float:
    return statistics.median(sample[key] for sample in samples)


def summarize(all_samples: dict[int, dict], backends: list[str], transfer_s: float) -> tuple[list[dict], list[dict]]:
    overhead, comparison = [], []
    for backend in backends:
        for workers, samples in all_samples.items():
            for direction, runs in samples[OURS_METHODS[backend]].items():
                overhead.append(
                    {
                        "backend": backend,
                        "workers": workers,
                        "direction": direction,
                        "runs": len(runs),
                        "wall_s": median(runs, "wall_s"),
                        "backend_ops_s": median(runs, "backend_ops_s"),
                        "overhead_s": median(runs, "overhead_s"),
                        "verify_s": median(runs, "verify_s"),
                        "beyond_transfer_s": statistics.median(run["wall_s"] - transfer_s for run in runs),
                        "wall_samples_s": [run["wall_s"] for run in runs],
                    }
                )
    for workers, samples in all_samples.items():
        for direction in DIRECTIONS.values():
            ours, seed = samples[OURS_METHODS["cli"]][direction], samples[SEED_METHOD][direction]
            ours_s, seed_s = median(ours, "wall_s"), median(seed, "wall_s")
            seed_discovery_s = median(seed, "discovery_s")
            comparison.append(
                {
                    "workers": workers,
                    "direction": direction,
                    "runs": len(ours),
                    "ours_s": ours_s,
                    "seed_s": seed_s,
                    "ratio": seed_s / ours_s,
                    "seed_discovery_s": seed_discovery_s,
                    "ratio_with_seed_discovery": (seed_s + seed_discovery_s) / ours_s,
                    "seed_pids": seed[0]["pids"],
                    "ours_samples_s": [run["wall_s"] for run in ours],
                    "seed_samples_s": [run["wall_s"] for run in seed],
                }
            )
    return overhead, comparison


def render(report: dict) -> str:
    meta = report["meta"]
    load = meta["load_average_1_5_15_min"]
    lines = [
        f"{meta['date']}, {meta['machine']}, Python {meta['python']}; 1-minute load average "
        f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after.",
        "",
        f"Tool overhead: move_to() with the tool's defaults, medians of {meta['repetitions']} runs; the fake "
        f"checkpoint/restore of a worker takes {meta['transfer_s']:g} s, all workers in parallel.",
        "backend ops = lock+checkpoint (suspend) or restore+unlock (resume) phases; overhead = total - backend ops.",
        "",
        "| backend | workers | direction | total s | backend ops s | overhead s | of which verify s "
        "| total - transfer s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["overhead"]:
        lines.append(
            f"| {row['backend']} | {row['workers']} | {row['direction']} | {row['wall_s']:.2f} | "
            f"{row['backend_ops_s']:.2f} | {row['overhead_s']:.2f} | {row['verify_s']:.2f} | "
            f"{row['beyond_transfer_s']:.2f} |"
        )
    lines += [
        "",
        f"Parallel protocol (move_to(), cli backend) against the seed's sequential toggle (cli backend, "
        f"{meta['seed_verify_sleep_s']:g} s verify sleeps), same tree, alternating, medians of "
        f"{meta['repetitions']} runs. The seed's time leaves out its PID discovery (shown apart); ours includes it.",
        "",
        "| workers | seed PIDs | direction | ours s | seed s | seed / ours | seed discovery s "
        "| (seed + discovery) / ours |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["comparison"]:
        lines.append(
            f"| {row['workers']} | {row['seed_pids']} | {row['direction']} | {row['ours_s']:.2f} | "
            f"{row['seed_s']:.2f} | {row['ratio']:.2f} | {row['seed_discovery_s']:.2f} | "
            f"{row['ratio_with_seed_discovery']:.2f} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup in `finally` blocks runs either way."""

    def raise_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_toggle",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m benchmarks.bench_toggle --repetitions 1 --workers 2 --json-out /tmp/bench.json",
    )
    parser.add_argument("--repetitions", type=int, default=3, help="suspend+resume cycles per method (default 3)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2, 8], help="worker counts, one fake tree each (default 2 8)"
    )
    parser.add_argument(
        "--transfer-s", type=float, default=1.0, help="fake checkpoint/restore time of one worker (default 1.0)"
    )
    parser.add_argument(
        "--mib", type=int, default=256, help="fake GPU memory per worker; only the RAM check sees it (default 256)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=sorted(OURS_METHODS),
        default=["cli", "driver"],
        help="backends whose overhead is measured (default cli driver); cli is always run, the comparison uses it",
    )
    parser.add_argument(
        "--seed-verify-sleep-s", type=float, default=0.2, help="the seed's CUDA_TOGGLE_VERIFY_SLEEP_S (default 0.2)"
    )
    parser.add_argument("--json-out", type=Path, help="write the report (summaries and every sample) here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.repetitions < 1 or any(w < 1 for w in args.workers) or args.transfer_s <= 0 or args.mib < 1:
        parser.error("--repetitions, --workers and --mib must be >= 1, --transfer-s > 0")
    args.backends = ["cli", *(b for b in args.backends if b != "cli")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss.SSS} {level: <7} {message}")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()  # these are CPU-bound timings: a busy machine shows here
    all_samples: dict[int, dict] = {}
    try:
        with sigterm_as_interrupt(), FakeMachine(max(args.workers), args.transfer_s, args.mib) as machine:
            fake_gpu_dir = str(machine.state_dir)
            if not args.quiet:
                print(f"fake GPU: {fake_gpu_dir}", file=sys.stderr, flush=True)
            for workers in args.workers:
                all_samples[workers] = measure(
                    machine, workers, args.repetitions, args.backends, args.seed_verify_sleep_s, args.quiet
                )
    except (KeyboardInterrupt, Interrupted) as why:
        print(f"interrupted ({why}): every process the benchmark started was stopped", file=sys.stderr)
        return 130
    except ToolError as error:
        # e.g. a Ctrl-C from the terminal also hit the fake cuda-checkpoint calls of a transition, which then
        # failed and was rolled back: cleanup has run, the message says what happened
        print(f"cuda-toggle-all failed: {error}", file=sys.stderr)
        return 1
    overhead, comparison = summarize(all_samples, args.backends, args.transfer_s)
    report = {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, fake GPU (tests/fakes)",
            "python": platform.python_version(),
            "repetitions": args.repetitions,
            "workers": args.workers,
            "backends": args.backends,
            "transfer_s": args.transfer_s,
            "mib_per_worker": args.mib,
            "seed_verify_sleep_s": args.seed_verify_sleep_s,
            "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
            "fake_gpu_dir": fake_gpu_dir,  # removed at the end; every process that had it in its env was stopped
        },
        "overhead": overhead,
        "comparison": comparison,
        "samples": {str(w): s for w, s in all_samples.items()},
    }
    print(render(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
