"""Run plumbing shared by cql_pretrain.py, off2on_finetune.py, upq_finetune.py and make_dataset.py: what any RL script
needs and the UPQ paper does not describe (flag checks, folders and locks, the checkpoint file, logs, wandb, signals,
progress, video, CUDA graphs, the dataset readers). Every detail of the algorithms stays inline in each script, as
CleanRL's sac_continuous_action.py imports its replay buffer from cleanrl_utils."""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import gymnasium as gym
import numpy as np
import torch

FLAG_RANGES = {  # the allowed values of a numeric flag, as its one-sentence refusal states them
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1, "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 2^32)": lambda v: 0 <= v < 2**32,  # seeds: seed + k, + 10,000, + env steps all stay far below 2^63
}
CHECKPOINT = "checkpoint.pt"  # the one file a save writes into --save-dir
PENDING = ".pending"  # a fresh run's logs carry this suffix until its first checkpoint (RunLogs.commit)


def fail(message: str) -> NoReturn:
    """Stop with one clear sentence on stderr and exit code 1."""
    raise SystemExit(f"error: {message}")


@contextlib.contextmanager
def errors_in_one_sentence(memory_flags: str = "--batch-size or --num-agents"):
    """Around a script's main(): out of memory, and Ctrl-C no stop handler takes (exit code 130), in one sentence."""
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); what was saved is whole, and the same command continues", file=sys.stderr)
        raise SystemExit(130) from None
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError (CUDA) and the CPU allocator's RuntimeError
        if not isinstance(error, MemoryError) and not re.search("out of memory|can't allocate memory", str(error)):
            raise
        size = re.search(r"allocate ([\d.]+ (?:bytes|[KMGT]iB))", str(error))
        fail(f"out of memory{f' (it tried to allocate {size[1]})' if size else ''}: pass a smaller {memory_flags}")


def check_flags(args, ranges: dict[str, str]) -> None:
    """Refuse, in one sentence naming the flag, a numeric flag outside its range (NaN and inf included)."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(math.isfinite(v) and FLAG_RANGES[allowed](v) for v in values):
            shown = " ".join(map(str, values)) or "(nothing)"
            each = " each, at least one value" if isinstance(value, tuple) else ""
            fail(f"--{name.replace('_', '-')} must be {allowed}{each}, not {shown}")


@dataclass
class Common:
    """Resuming, the device, videos and Weights & Biases (the same flags in every training script)"""

    resume: bool = False
    """continue the run saved in --save-dir (the same numbers as an uninterrupted run, on the same kind of device)"""
    overwrite: bool = False
    """start anew although --save-dir holds a run (replaced at this run's first save) or --run-dir holds logs"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available (the envs step on the CPU)"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic (CleanRL); CPU runs are deterministic either way"""
    capture_video: bool = False
    """record the episodes of the last evaluation to <run-dir>/videos/ with gymnasium's RecordVideo (CleanRL);
    MuJoCo renders offscreen through MUJOCO_GL (egl unless set)"""
    video_every: int = 0
    """with --capture-video, also record every this many evaluations (0: only the last)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works); --resume continues the same wandb run"""
    wandb_project_name: str = "upq"
    """wandb project (CleanRL)"""
    wandb_entity: str | None = None
    """wandb team or user (CleanRL)"""


def check_finite(values: dict[str, float], losses: tuple[str, ...], where: str, save_dir: Path) -> None:
    """Stop in one sentence when one of the `losses` in `values` is NaN or inf; the last checkpoint stays as it was."""
    if not all(math.isfinite(values[name]) for name in losses):
        shown = ", ".join(f"{name} {values[name]}" for name in losses)
        fail(f"a loss became non-finite {where} ({shown}); {save_dir / CHECKPOINT} was left as it was")


def pick_device(common: Common) -> torch.device:
    """--device auto: cuda when torch sees one, else cpu; --torch-deterministic sets cudnn's flag (CleanRL)."""
    name, torch.backends.cudnn.deterministic = common.device, common.torch_deterministic
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def tensors_in(state, name: str = ""):
    """(dotted name, tensor) for every tensor in nested dicts and lists, in a fixed order."""
    items = sorted(state.items(), key=lambda item: str(item[0])) if isinstance(state, dict) else \
        enumerate(state) if isinstance(state, (list, tuple)) else ()
    if isinstance(state, torch.Tensor):
        yield name, state
    for key, value in items:
        yield from tensors_in(value, f"{name}.{key}".lstrip("."))


def digest(state: dict) -> str:
    """sha256 of every tensor's bytes and of everything else's JSON text: a flipped byte changes it."""
    sha = hashlib.sha256(json.dumps(state, sort_keys=True, default=lambda t: [str(t.dtype), t.shape]).encode())
    for _, tensor in tensors_in(state):
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor in `state` that holds NaN or inf, or None."""
    return next((name for name, t in tensors_in(state) if t.is_floating_point() and not t.isfinite().all()), None)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` (and its digest) as one file, whole or not at all: a temporary file in the same folder, flushed
    to disk, renamed over the previous one. Weights with NaN or inf and a failed write (a full disk) stop the run in
    one sentence; the previous file stays as it was."""
    if name := non_finite(state):
        fail(f"{name} holds NaN or inf values: the run diverged and was not saved ({path} is as it was)")
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            torch.save({**state, "sha256": digest(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        temporary.unlink(missing_ok=True)
        needed = sum(t.nbytes for _, t in tensors_in(state)) / 1e6
        folder = next(folder for folder in path.absolute().parents if folder.is_dir())  # (path's own may not exist)
        fail(f"cannot write {path} ({getattr(error, 'strerror', None) or 'write failed'}; it needs about "
             f"{needed:,.1f} MB, {shutil.disk_usage(folder).free / 1e6:,.1f} MB are free there); the previous "
             f"checkpoint, if any, is unchanged")


def load_checkpoint(path: Path, formats: tuple[str, ...], older: tuple[str, ...] = (), flag: str = "",
                    advice: str = "") -> dict:
    """A checkpoint this project wrote, its digest verified, or one clear sentence on why it cannot be used (naming
    `flag`, the flag that gave the path, when given; `advice` ends the sentence for a file of another format). A file
    without meta and digest that holds the keys `older` (written by an older version) is taken as it is."""
    if path.is_dir() and (path / "manifest.json").exists() and not (path / CHECKPOINT).exists():
        fail(f"{path} holds checkpoints of the older per-agent layout: convert a CQL set with python "
             f"results/convert_set.py {path} <new folder>; a fine-tuned one continues with the code of commit 53ee51c")
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        fail(f"{flag or 'checkpoint'} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- truncated zip, pickle error, ...: all mean "corrupted"
        fail(f"checkpoint {path} is corrupted or not a checkpoint ({type(error).__name__})")
    if older and isinstance(state, dict) and not {"meta", "sha256"} & state.keys() and set(older) <= state.keys():
        return state
    if not isinstance(state, dict) or not isinstance(state.get("meta"), dict) or \
            state["meta"].get("format") not in formats:
        found = state["meta"].get("format") if isinstance(state, dict) and isinstance(state.get("meta"), dict) else None
        fail(f"{flag} {path} is not a {' or '.join(formats)} checkpoint".lstrip() + (f" (it is a {found} one)"
                                                                                     if found else "") + advice)
    try:
        intact = state.pop("sha256", None) == digest(state)
    except (TypeError, ValueError):  # a flipped byte in the pickle can turn a key or a value into another type
        intact = False
    if not intact:
        fail(f"checkpoint {path} is corrupted: its contents do not match the digest saved with them")
    if name := non_finite(state):  # a digest of NaN weights matches too: refused here as at save
        fail(f"checkpoint {path} holds NaN or inf values in {name}: its run diverged; use an earlier checkpoint")
    return state


def restore_optimizers(optimizers: dict, states: dict, device: torch.device) -> None:
    """--resume: the saved Adam moments and step counts, with this run's device settings (fused, capturable on cuda)."""
    for name, opt in optimizers.items():
        opt.load_state_dict(states[name])
        for group in opt.param_groups:
            group.update(foreach=None, fused=True, capturable=device.type == "cuda")


def restore_generators(generators: list, states: list) -> None:
    """--resume: the saved random streams (a CPU and a CUDA generator's states differ in size)."""
    for generator, state in zip(generators, states):
        if state.numel() != generator.get_state().numel():
            fail("the run was saved on another kind of device: resume on that --device")
        generator.set_state(state)


def hold_lock(path: Path, what: str, advice: str):
    """Hold an OS lock (flock) on the file `path`, this process's pid inside, while the process lives; the OS drops it
    when the process ends, however it ends. If another process holds it: "<what> is in use by another run (process
    PID): <advice>". Returns the open file, to keep."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        fail(f"{what} is in use by another run (process {handle.read().strip() or '?'}): {advice}")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def lock_folder(folder: Path, flag: str):
    """Create `folder` and hold the lock of its .lock file: a second run on the folder is refused, naming the holder's
    pid. The folders it made are removed at exit if they hold nothing else."""
    try:
        created = [path for path in (folder, *folder.parents) if not path.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        handle = hold_lock(folder / ".lock", f"{flag} {folder}", f"wait for it to end or choose another {flag}")
    except OSError as error:
        fail(f"{flag} {folder} is not a writable folder ({error.strerror or error})")
    if created:
        atexit.register(remove_if_unused, folder, created)
    return handle


def remove_if_unused(folder: Path, created: list[Path]) -> None:
    if folder.is_dir() and os.listdir(folder) == [".lock"]:
        (folder / ".lock").unlink()
        for path in created:  # the folder, then the parents made for it
            if not any(path.iterdir()):
                path.rmdir()


def prepare_folders(args, default_save_dir: str, run_name: str, formats: tuple[str, ...]):
    """--save-dir and --run-dir (default runs/<run_name>__<unix time>), locked for this run and checked before anything
    is loaded: a fresh run refuses a checkpoint or an eval.csv already there unless --overwrite (the checkpoint is
    replaced at the first save); --resume loads the checkpoint and defaults the run dir to the saved run's. Returns
    (save dir, run dir, the saved state or None, the locks to keep)."""
    run, common = args.run, args.common
    check_flags(common, {"video_every": ">= 0"})
    if not re.fullmatch(r"[\w.+=,@-]{1,100}", run.exp_name, re.ASCII) or run.exp_name in (".", ".."):
        fail(f"--exp-name {run.exp_name!r} must be a plain name: 1 to 100 letters, digits and ._+=,@- (no path "
             f"separator, not . or ..)")
    if common.resume and common.overwrite:
        fail("--resume and --overwrite exclude each other")
    save_dir = Path(run.save_dir or default_save_dir)
    locks = [lock_folder(save_dir, "--save-dir")]
    exists = (save_dir / CHECKPOINT).exists() or (save_dir / "manifest.json").exists()
    if common.resume and not exists:
        fail(f"--resume: {save_dir} holds no checkpoint to continue")
    if exists and not common.resume and not common.overwrite:
        fail(f"{save_dir} already holds a checkpoint: pass --resume to continue it, --overwrite to replace it, "
             f"or another --save-dir")
    saved = load_checkpoint(save_dir, formats) if common.resume else None
    if saved and not run.run_dir and saved["meta"].get("save_dir", str(save_dir.resolve())) != str(save_dir.resolve()):
        fail(f"--resume: {save_dir} holds a copy of the run saved in {saved['meta']['save_dir']}, whose logs are in "
             f"{saved['meta']['run_dir']}: pass --run-dir (that folder to continue them there, or a new one)")
    run_dir = Path(run.run_dir or (saved["meta"]["run_dir"] if saved else f"runs/{run_name}__{int(time.time())}"))
    if run_dir.resolve() != save_dir.resolve():
        locks.append(lock_folder(run_dir, "--run-dir"))
    if saved:
        check_run_dir_holds(run_dir, saved["meta"]["run_id"], save_dir)
    if not common.resume and (run_dir / "eval.csv").exists() and not common.overwrite:
        fail(f"{run_dir / 'eval.csv'} already exists: pass --resume to continue that run, --overwrite to start it "
             f"anew, or another --run-dir")
    return save_dir, run_dir, saved, locks


def run_id_in(config: Path) -> str | None:
    """The run id a config.json (or config.json.pending) names, if it can be read."""
    try:
        return json.loads(config.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def check_run_dir_holds(run_dir: Path, run_id: str, save_dir: Path) -> None:
    """--resume: the run dir holds the logs of the checkpoint's run (its config.json carries the run id; or they are
    still pending there, from a kill between the run's first save and their commit), or no logs."""
    held = run_id_in(run_dir / "config.json")
    if run_id_in(run_dir / f"config.json{PENDING}") != run_id and held != run_id and (
            (run_dir / "config.json").exists() or (run_dir / "eval.csv").exists()):
        fail(f"--resume: {run_dir} holds the logs of {f'run {held}' if held else 'another run'}, not of run {run_id} "
             f"saved in {save_dir}: pass the --run-dir of that run, or a new folder")


class CsvLog:
    """A per-run CSV log with a `step` column, flushed every row: `rows` (the kept rows of a resumed run) first."""

    def __init__(self, path: Path, header: list[str], rows: list[list[str]]):
        self.path = path
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        os.replace(temporary, path)
        self.file = open(path, "a", newline="")

    def write(self, row: list) -> None:
        try:
            csv.writer(self.file).writerow(row)
            self.file.flush()
        except OSError as error:
            fail(f"cannot write {self.path} ({error.strerror}); the last checkpoint is unchanged")


class Tee:
    """The console, also written to the run's train.log; each still gets everything if the other cannot."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        for stream in (self.log, self.stream):  # either may fail (a full disk, a closed pipe): the other goes on
            with contextlib.suppress(OSError, ValueError):
                stream.write(text)
                stream.flush()
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def settle(path: Path) -> None:
    """A pending log (<name>.pending) renamed into place as <name>."""
    os.replace(path, path.with_name(path.name[: -len(PENDING)]))


class RunLogs(dict):
    """The run's CsvLogs by name. A fresh run writes every log as <name>.pending until its first checkpoint is saved
    (commit renames them into place): until then the folder's earlier logs stay as they were, and a run that dies
    before its first save leaves nothing that blocks its re-run."""

    def commit(self) -> None:
        for path in self.pending:
            settle(path)
        self.pending = []

    def discard(self) -> None:  # at exit: the logs of a run that ends (refused, failed) before its first save
        for path in self.pending:
            path.unlink(missing_ok=True)


def open_run_logs(run_dir: Path, columns: dict[str, list[str]], resume_step: int | None, meta: dict) -> RunLogs:
    """<run-dir>/train.log (the console, appended on resume), config.json (each resume's own appended), and one
    CsvLog per entry of columns; a resumed run's rows past resume_step (written after its checkpoint) are cut, so
    every step has one row. Everything is checked before anything is written; a resumed run whose logs are still
    pending there (a kill between its first save and their commit) reads them and takes them into place."""
    config = {**meta, "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "commit": source_commit(),
              "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    suffix, kept = ("" if resume_step is not None else PENDING), {name: [] for name in columns}
    adopt = resume_step is not None and run_id_in(run_dir / f"config.json{PENDING}") == meta["run_id"]

    def current(name: str) -> Path:  # a resumed run's log: still pending (adopt), or in place
        return run_dir / f"{name}{PENDING}" if adopt and (run_dir / f"{name}{PENDING}").exists() else run_dir / name

    try:
        for name, header in columns.items():
            if resume_step is not None and current(f"{name}.csv").exists():
                with open(current(f"{name}.csv"), newline="") as f:
                    rows = list(csv.reader(f))
                if rows and rows[0] != header:
                    fail(f"{current(f'{name}.csv')} has the columns {rows[0]}, not {header}: it is not this run's log")
                kept[name] = [row for row in rows[1:] if len(row) == len(header) and int(row[0]) <= resume_step]
        if resume_step is not None and current("config.json").exists():
            previous = json.loads(current("config.json").read_text())
            config = {**previous, "resumed": [*previous.get("resumed", []), {**config, "at_step": resume_step}]}
        if adopt:  # everything checked: the pending logs take their place, config.json last
            for path in sorted(run_dir.glob(f"*{PENDING}"), key=lambda path: path.name.startswith("config")):
                settle(path)
        console = open(run_dir / f"train.log{suffix}", "a" if resume_step is not None else "w")
        (run_dir / "config.json.tmp").write_text(json.dumps(config, indent=1) + "\n")
        os.replace(run_dir / "config.json.tmp", run_dir / f"config.json{suffix}")
        logs = RunLogs({name: CsvLog(run_dir / f"{name}.csv{suffix}", header, kept[name])
                        for name, header in columns.items()})
    except (OSError, ValueError) as error:
        fail(f"cannot write the logs in {run_dir} ({getattr(error, 'strerror', None) or error})")
    names = ["train.log", *(f"{name}.csv" for name in columns), "config.json"]  # config.json last: it names the run
    logs.pending = [run_dir / f"{name}{PENDING}" for name in names] if suffix else []
    atexit.register(logs.discard)
    sys.stdout, sys.stderr = Tee(sys.stdout, console), Tee(sys.stderr, console)
    return logs


def new_run_id() -> str:
    """The id a run keeps across resumes: in its checkpoint, its config.json and its wandb run."""
    return uuid.uuid4().hex[:16]


def run_meta(args, data, run_dir: Path, save_dir: Path, saved: dict | None, **fields) -> dict:
    """What the checkpoint and config.json record of the run: a fresh run's new id, folders, data, flags and `fields`
    (format, algorithm, version, the networks); a resumed run's as saved, with this command's folders and flags."""
    now = dict(run_dir=str(run_dir), save_dir=str(save_dir.resolve()), data_sha256=data.sha256, args=flat_args(args))
    if saved is not None:  # (its flags and data checked: check_resumed)
        return {**saved["meta"], **now}
    return dict(**fields, run_id=new_run_id(), dataset_id=data.dataset_id, gym_env_id=data.gym_env_id,
                obs_dim=data.observations.shape[1], act_dim=data.actions.shape[1], offline_size=len(data.rewards),
                **now)


def log_score(r, step: int, score: tuple[float, float], line_end: str = "") -> None:
    """An evaluation at env step `step`, (mean return, normalised score): a row of r.logs["eval"], a line, r.wandb
    (r: a script's run, as its start_run makes it)."""
    r.logs["eval"].write([step, f"{score[0]:.3f}", f"{score[1]:.3f}"])
    print(f"env steps {step:,}: return {score[0]:.1f} normalized {score[1]:.1f}{line_end}", flush=True)
    if r.wandb:
        r.wandb.log({"eval/return": score[0], "eval/normalized_score": score[1]}, step=step)


def log_metrics(r, row: list, values: dict[str, float]) -> None:
    """A row of r.logs["metrics"] (its first column the step), and `values` to r.wandb as train/<name>."""
    r.logs["metrics"].write(row)
    if r.wandb:
        r.wandb.log({f"train/{key}": value for key, value in values.items()}, step=int(row[0]))


def finish_run(r, summary: str) -> None:
    """The run's last line: what it did (summary), and where its evaluations are."""
    if r.wandb:
        r.wandb.finish()
    print(f"{summary}; evaluations in {r.run_dir / 'eval.csv'}", flush=True)


def source_commit() -> str | None:
    """The git commit of this script's folder, if it is a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def flat_args(args) -> dict:
    """Every flag's value, the algorithm's and the run's, as plain JSON types."""
    values = {**dataclasses.asdict(args.algorithm), **dataclasses.asdict(args.run),
              **dataclasses.asdict(args.common)}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def check_resumed(args, saved: dict | None, data: OfflineData) -> None:
    """--resume (saved: the checkpoint): every flag that shapes the run's numbers (the algorithm's but --total-steps
    and --num-agents, and the data, env, seed and evaluation episodes) is the saved run's, and so are the offline
    transitions (checkpoints before 0.4.0 hold no digest of them); the first that differs is refused."""
    if saved is None:
        return
    now, saved_args = flat_args(args), saved["meta"]["args"]
    for key in ["env", "gym_env", "seed", "eval_episodes", *(f.name for f in dataclasses.fields(args.algorithm))]:
        if key not in ("total_steps", "num_agents") and key in saved_args and now[key] != saved_args[key]:
            fail(f"--resume: the saved run has --{key.replace('_', '-')} {saved_args[key]}, this command {now[key]}; "
                 f"a resumed run keeps every flag that shapes its numbers (--total-steps may grow)")
    if saved["meta"].get("data_sha256", data.sha256) != data.sha256:
        fail(f"--resume: the saved run trained on other offline data than --env {data.dataset_id} holds now (the "
             f"dataset was made again or changed); resume on the data it trained on, or start a new run")


def start_wandb(common: Common, meta: dict):
    """--track: Weights & Biases, with the run's id (a resumed run continues the same wandb run); else None."""
    if not common.track:
        return None
    import wandb

    try:
        wandb.init(project=common.wandb_project_name, entity=common.wandb_entity, config=meta["args"],
                   id=meta["run_id"], name=Path(meta["run_dir"]).name, resume="allow", dir=meta["run_dir"])
    except (wandb.errors.Error, OSError) as error:  # no login (UsageError), an unwritable <run-dir>/wandb, ...
        fail(f"--track: wandb could not start ({getattr(error, 'strerror', None) or str(error).rstrip('.')}): run "
             f"`wandb login`, or set WANDB_MODE=offline to keep the run in {meta['run_dir']}/wandb and sync it later")
    return wandb


def catch_stop_signals() -> dict:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP. Until stop["armed"] is set (loading, the first evaluation) they end the
    run at once, nothing saved and nothing left that blocks its re-run; after it they set stop["signal"], and the
    loop finishes its update, saves and exits 128 + the signal's number (exit_stopped)."""
    stop = {"signal": None, "armed": False}

    def request_stop(signum, frame):
        if not stop["armed"]:
            print(f"{signal.Signals(signum).name} before training started: nothing was saved", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop["signal"] = signum

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    return stop


def exit_stopped(stop: dict, where: str, save_dir: Path) -> NoReturn:
    name = signal.Signals(stop["signal"]).name
    print(f"{name} at {where}: saved the run to {save_dir / CHECKPOINT}; continue with the same command and --resume "
          f"(in place of --overwrite, if it had it)", flush=True)
    raise SystemExit(128 + stop["signal"])


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress(done: int, total: int, done_at_start: int, started: float, unit: str) -> str:
    """'12,000/200,000 steps (6%), 4m10s elapsed, 48.0 steps/s, ETA 1h05m': this session's speed."""
    elapsed = time.perf_counter() - started
    speed = (done - done_at_start) / max(elapsed, 1e-9)
    eta = duration((total - done) / speed) if speed > 0 else "?"
    return (f"{done:,}/{total:,} {unit} ({100 * done / max(total, 1):.0f}%), {duration(elapsed)} elapsed, "
            f"{speed:.1f} {unit}/s, ETA {eta}")


def check_video(common: Common, env_id: str = "InvertedPendulum-v5") -> None:
    """--capture-video: MuJoCo must render offscreen here (MUJOCO_GL, egl unless set) and moviepy, which gymnasium's
    RecordVideo writes with, must be installed; else one sentence on what to install."""
    if not common.capture_video:
        return
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import moviepy  # noqa: F401
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as error:  # noqa: BLE001 -- every OpenGL failure gets the same advice
        fail(f"--capture-video needs moviepy (pip install moviepy) and offscreen MuJoCo rendering, which failed with "
             f"MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({type(error).__name__}): install EGL (apt-get install "
             f"libegl1) and set MUJOCO_GL=egl, or OSMesa (apt-get install libosmesa6) and set MUJOCO_GL=osmesa")


def video_folder(common: Common, run_dir: Path, evaluation: int, step: int, last: bool) -> Path | None:
    """Where --capture-video records evaluation number `evaluation` (0 = the first), at `step`: the last one, and
    every --video-every-th; None when it is not recorded."""
    every = common.video_every
    recorded = common.capture_video and (last or (every and evaluation % every == 0))
    return run_dir / "videos" / f"step_{step}" if recorded else None


def gym_make(env_id: str, **kwargs) -> gym.Env:
    """gym.make, or one sentence: an unknown env id, or the OpenGL backend that MUJOCO_GL names failing to load, which
    MuJoCo loads for every env, rendering or not."""
    try:
        import mujoco  # noqa: F401
    except Exception as error:  # noqa: BLE001 -- AttributeError (no libOSMesa), RuntimeError (unknown name), ...
        fail(f"MuJoCo cannot load the OpenGL backend MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({type(error).__name__}):"
             f" unset it or use MUJOCO_GL=egl, or install OSMesa (apt-get install libosmesa6) for osmesa")
    try:
        return gym.make(env_id, **kwargs)
    except (gym.error.Error, ImportError) as error:  # ImportError: v2/v3 envs that need mujoco-py
        fail(f"unknown or unavailable environment id {env_id!r} ({error})")


def lockstep_returns(env_id: str, seeds: list[int], act, video_dir: Path | None = None) -> np.ndarray:
    """Undiscounted returns [E] of one episode of env_id per seed, all stepped together: one call of
    act(observations [E, obs]) -> actions [E, A] per step; with video_dir, gymnasium's RecordVideo records each."""
    envs = [gym.make(env_id, render_mode="rgb_array" if video_dir else None) for _ in seeds]
    if video_dir is not None:
        with warnings.catch_warnings():  # the envs of one evaluation share their folder on purpose
            warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
            envs = [gym.wrappers.RecordVideo(env, str(video_dir), name_prefix=f"episode{e}", disable_logger=True,
                                             episode_trigger=lambda episode: True) for e, env in enumerate(envs)]
    obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
    returns, running = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while running.any():
        actions = act(obs)
        for e in np.flatnonzero(running):
            obs[e], reward, terminated, truncated, _ = envs[e].step(actions[e])
            returns[e] += reward
            running[e] = not (terminated or truncated)
    for env in envs:
        env.close()
    return returns


def cuda_graphed(step, generators=()):
    """Record one call of step() as a CUDA graph; returns a function that replays it and returns step()'s outputs.
    Every state the step changes must change in place; `generators` other than the device's default one are
    registered, so a graphed run draws the same numbers as an eager one."""
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        outputs = step()
    return lambda: graph.replay() or outputs


CUDA_GRAPH_WARMUP = 3  # eager updates before an update step is recorded as a CUDA graph


def train_epoch(update, num_updates: int, cuda_graph: bool, stop: dict, report) -> tuple[dict, int]:
    """num_updates calls of update() -> dict of scalar tensors, recorded as a CUDA graph after CUDA_GRAPH_WARMUP eager
    ones if cuda_graph, fewer if a stop signal comes. Returns each metric's mean over the updates done (the only
    host-device sync) and their number; report(done) runs about once a minute."""
    sums, last_line, done = 0, time.perf_counter(), 0
    while done < num_updates and not stop["signal"]:
        if done == CUDA_GRAPH_WARMUP and cuda_graph:
            update = cuda_graphed(update)
        metrics = update()
        sums, done = sums + torch.stack(list(metrics.values())), done + 1
        if time.perf_counter() - last_line > 60:  # a progress line at least every minute on a slow machine
            last_line = time.perf_counter()
            report(done)
    return (dict(zip(metrics, (sums / done).tolist())) if done else {}), done


# Offline data: D4RL names, Minari ids, D4RL-layout .hdf5 files ---------------------------------------------------
D4RL_REF_SCORES = {  # D4RL's reference returns (random, expert) per body
    "hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
D4RL_GYM_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
D4RL_NAME = re.compile(r"^(hopper|halfcheetah|walker2d)-(random|medium|medium-replay|medium-expert|expert)-v2$")
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


@dataclass
class OfflineData:
    observations: np.ndarray  # [M, obs_dim] float32
    actions: np.ndarray  # [M, act_dim]
    rewards: np.ndarray  # [M]
    next_observations: np.ndarray  # [M, obs_dim]
    terminals: np.ndarray  # [M], 1.0 only for true termination (time-limit truncations bootstrap)
    dataset_id: str
    gym_env_id: str
    ref_min_score: float | None
    ref_max_score: float | None
    ref_source: str
    sha256: str  # of the transitions as loaded: a resume on other data is refused (check_resumed)


def body_of(name: str) -> str | None:
    """'hopper' for hopper-medium-v2, Hopper-v5, local/hopper/medium-v0, .../hopper_medium-v2.hdf5."""
    return next((body for body in ("halfcheetah", "walker2d", "hopper") if body in name.lower()), None)


def read_d4rl_hdf5(path: Path) -> dict[str, np.ndarray]:
    """Transitions of a D4RL-layout file; timeouts bootstrap, terminals do not. Without next_observations the next
    row is the next state, so each episode's last row is dropped (d4rl.qlearning_dataset)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if missing := [key for key in ("observations", "actions", "rewards", "terminals") if key not in f]:
                fail(f"{path} is not a D4RL-layout file: it lacks {', '.join(missing)}")
            data = {key: f[key] for key in (*TRANSITION_KEYS, "timeouts") if key in f}
            if bad := [key for key, value in data.items() if not isinstance(value, h5py.Dataset) or value.ndim == 0]:
                fail(f"{path}: {', '.join(bad)} must be arrays, one row per transition, not a group or a single value")
            data = {key: value[()] for key, value in data.items()}
    except OSError as error:
        fail(f"cannot read {path} as HDF5 ({error})")
    rows = {key: len(value) for key, value in data.items()}
    if len(set(rows.values())) > 1:
        fail(f"{path}: its arrays have different numbers of rows ({rows}); every array needs one per transition")
    keep = np.ones(rows["rewards"], dtype=bool)
    if "next_observations" not in data:
        keep = ~data.get("timeouts", np.zeros(len(keep))).reshape(-1).astype(bool)
        keep[-1:] = False
        data["next_observations"] = np.concatenate([data["observations"][1:], data["observations"][-1:]])
    return {key: data[key][keep] for key in TRANSITION_KEYS}


def fetch_d4rl(name: str) -> Path:
    """The D4RL v2 file from D4RL's cache folder (D4RL_DATASET_DIR), downloaded there when absent and reachable."""
    body, level = D4RL_NAME.match(name).groups()
    folder = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()
    path = folder / f"{body}_{level.replace('-', '_')}-v2.hdf5"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            print(f"downloading {D4RL_URL + path.name} to {path}", flush=True)
            urllib.request.urlretrieve(D4RL_URL + path.name, path.with_suffix(".part"))
            os.replace(path.with_suffix(".part"), path)
        except OSError as error:
            fail(f"D4RL dataset {name} is not at {path} and could not be downloaded ({error}); fetch "
                 f"{D4RL_URL + path.name} into {folder}, or use a Minari dataset (mujoco/{body}/...-v0), or make one "
                 f"offline: python make_dataset.py --env {D4RL_GYM_ENVS[body]} --kind {level}")
    return path


def read_minari(dataset_id: str):
    """Transitions of a Minari dataset (downloaded when absent and reachable; local/ ids are made on this machine by
    make_dataset.py), its env id and its reference returns."""
    import minari

    kind = re.sub(r"-v\d+$", "", dataset_id.rsplit("/", 1)[-1])
    kind = kind if kind in ("random", "medium", "medium-replay", "expert", "medium-expert") else "medium"
    advice = (f"make one offline with python make_dataset.py --env "
              f"{D4RL_GYM_ENVS.get(body_of(dataset_id), '<MuJoCo env id>')} --kind {kind}")
    path = minari.storage.get_dataset_path(dataset_id)
    if not path.exists() and path.with_name(f".{path.name}.old").exists():  # make_dataset.py killed mid-replace
        fail(f"Minari dataset {dataset_id} is at {path.with_name(f'.{path.name}.old')}, where an interrupted "
             f"make_dataset.py left it: run make_dataset.py again, or move it back to {path}")
    if dataset_id.startswith("local/") and not path.exists():
        fail(f"Minari dataset {dataset_id} is not in {minari.storage.get_dataset_path()} (MINARI_DATASETS_PATH); "
             f"local/ datasets are made on this machine: {advice}")
    if path.exists() and not dataset_id.startswith("local/"):  # a remote id, shadowed by what is on this machine
        print(f"Minari dataset {dataset_id}: read from this machine's copy at {path}, not from Minari's server")
    try:
        dataset = minari.load_dataset(dataset_id, download=not path.exists())
        episodes = list(dataset.iterate_episodes())
    except Exception as error:  # noqa: BLE001 -- a failed download or an unreadable dataset: the same advice
        fail(f"Minari dataset {dataset_id} at {path} is incomplete (an interrupted write): {advice} --overwrite"
             if path.exists() else f"Minari dataset {dataset_id} is not in {minari.storage.get_dataset_path()} and "
             f"could not be downloaded ({type(error).__name__}); {advice}")
    if not episodes:
        fail(f"Minari dataset {dataset_id} at {path} holds no episodes (an interrupted write?): {advice} --overwrite")
    data = {"observations": np.concatenate([e.observations[:-1] for e in episodes]),
            "actions": np.concatenate([e.actions for e in episodes]),
            "rewards": np.concatenate([e.rewards for e in episodes]),
            "next_observations": np.concatenate([e.observations[1:] for e in episodes]),
            "terminals": np.concatenate([e.terminations for e in episodes])}
    metadata = dataset.storage.metadata
    env_id = dataset.env_spec.id if dataset.env_spec is not None else None
    return data, env_id, metadata.get("ref_min_score"), metadata.get("ref_max_score")


def load_offline_data(name: str, gym_env: str | None = None) -> OfflineData:
    """Resolve --env into checked float32 transitions, the gymnasium env to evaluate on and the score references."""
    ref_min = ref_max = env_id = None
    if D4RL_NAME.match(name):
        data, env_id = read_d4rl_hdf5(fetch_d4rl(name)), D4RL_GYM_ENVS[body_of(name)]
    elif name.endswith((".hdf5", ".h5")):
        if not Path(name).is_file():
            fail(f"dataset file {name} does not exist")
        data, env_id = read_d4rl_hdf5(Path(name)), D4RL_GYM_ENVS.get(body_of(Path(name).name))
    elif "/" in name and not Path(name).exists():
        data, env_id, ref_min, ref_max = read_minari(name)
    else:
        fail(f"unknown dataset {name!r}: expected a D4RL name such as hopper-medium-v2, a Minari id such as "
             f"local/hopper/medium-v0, or a path to a .hdf5 file (Minari datasets are named by id, not folder)")
    env_id = gym_env or env_id
    if env_id is None:
        fail(f"cannot tell the environment of dataset {name}: pass --gym-env (e.g. Hopper-v5)")
    env = gym_make(env_id)
    shapes = {"observations": env.observation_space.shape, "actions": env.action_space.shape, "rewards": (),
              "next_observations": env.observation_space.shape, "terminals": ()}
    low, high = env.action_space.low, env.action_space.high
    env.close()
    try:
        data = {key: np.asarray(data[key], dtype=np.float32) for key in TRANSITION_KEYS}  # checked after the cast
    except (TypeError, ValueError) as error:
        fail(f"dataset {name} holds values that are not numbers ({error})")
    if len(data["rewards"]) == 0:
        fail(f"dataset {name} holds no transitions")
    for key, shape in shapes.items():
        if shape == () and data[key].shape[1:] == (1,):  # rewards and terminals may come as [M, 1]
            data[key] = data[key][:, 0]
        if data[key].shape != (len(data["rewards"]), *shape):
            fail(f"dataset {name}: {key} has shape {data[key].shape}, but {env_id} needs "
                 f"{(len(data['rewards']), *shape)}, one row per transition")
        bad = ~np.isfinite(data[key].reshape(len(data[key]), -1)).all(1)
        if bad.any():
            fail(f"dataset {name}: {key} has {bad.sum():,} rows with NaN or inf values as float32 (the first is row "
                 f"{np.flatnonzero(bad)[0]:,})")
    if len(bad := np.flatnonzero(~np.isin(data["terminals"], (0.0, 1.0)))):
        fail(f"dataset {name}: terminals must be 0 or 1 (true termination), but {len(bad):,} are not (row "
             f"{bad[0]:,} holds {data['terminals'][bad[0]]:g})")
    outside = ((data["actions"] < low - 1e-4) | (data["actions"] > high + 1e-4)).any(1)
    if outside.any():  # the env would have clipped them: the data would not say what the env did
        fail(f"dataset {name}: {outside.sum():,} actions lie outside {env_id}'s action space [{low.min():g}, "
             f"{high.max():g}] (the first in row {np.flatnonzero(outside)[0]:,})")
    if ref_min is None and body_of(env_id) in D4RL_REF_SCORES:
        ref_min, ref_max = D4RL_REF_SCORES[body_of(env_id)]
    ref_source = "none (normalised score is NaN)" if ref_min is None else f"{ref_min:.3f} / {ref_max:.3f}"
    sha = hashlib.sha256()
    for key in TRANSITION_KEYS:
        sha.update(np.ascontiguousarray(data[key]))
    return OfflineData(**data, dataset_id=name, gym_env_id=env_id, ref_min_score=ref_min, ref_max_score=ref_max,
                       ref_source=ref_source, sha256=sha.hexdigest())


# Fine-tuning pre-trained agents (off2on_finetune.py, upq_finetune.py) ---------------------------------------------
def load_pretrained(checkpoints: str | None, default: str, formats: tuple[str, ...],
                    num_agents: int | None) -> tuple[dict, str]:
    """cql_pretrain.py's agents named by --checkpoints (a folder or its checkpoint.pt; `default` when not given), and
    that name."""
    source = Path(checkpoints or default)
    if not checkpoints and not source.exists():
        fail(f"no checkpoints at {source}: pre-train with python cql_pretrain.py --env <dataset> or pass --checkpoints")
    pretrained = load_checkpoint(source, formats, flag="--checkpoints" if checkpoints else "",
                                 advice=": pass the --save-dir of cql_pretrain.py (a fine-tuned run continues from "
                                        "its own --save-dir with --resume)")
    if num_agents is not None and num_agents > pretrained["meta"]["num_agents"]:
        fail(f"--num-agents must lie between 1 and the {pretrained['meta']['num_agents']} agents of {source}, "
             f"not {num_agents}")
    return pretrained, str(source)


def check_fit(start: dict, saved: dict | None, data: OfflineData, num_agents: int | None, total_steps: int) -> str:
    """The agents `start` were made for this env; a resumed run (saved) keeps its agents, schedule and replay.
    Returns a note for the first log line when the agents were trained on other data than `data`."""
    meta, obs_dim, act_dim = start["meta"], data.observations.shape[1], data.actions.shape[1]
    if (meta["gym_env_id"], meta["obs_dim"], meta["act_dim"]) != (data.gym_env_id, obs_dim, act_dim):
        fail(f"the agents were trained for {meta['gym_env_id']} (obs {meta['obs_dim']}, actions {meta['act_dim']}) "
             f"but --env {data.dataset_id} is {data.gym_env_id} (obs {obs_dim}, actions {act_dim})")
    if saved is not None:
        if num_agents not in (None, meta["num_agents"]):
            fail(f"--resume: the saved run fine-tunes {meta['num_agents']} agents, not --num-agents {num_agents}")
        if meta["offline_size"] != len(data.rewards):
            fail(f"--resume: the saved run replays {meta['offline_size']:,} offline transitions, --env "
                 f"{data.dataset_id} holds {len(data.rewards):,}")
        if total_steps < meta["env_steps"]:
            fail(f"--resume: the saved run is at env step {meta['env_steps']:,}, past --total-steps {total_steps:,}")
    elif meta["dataset_id"] != data.dataset_id:
        return f"note: the agents were trained on other data ({meta['dataset_id']}) than the offline data here; "
    elif meta.get("data_sha256", data.sha256) != data.sha256:
        return f"note: the agents were trained on another version of {data.dataset_id} (its transitions differ); "
    return ""
