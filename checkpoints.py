"""checkpoints.py: a run folder and its checkpoints, written whole or not at all.

A run folder holds `config.json`, `log.csv` (one row per epoch) and `checkpoint.pt`, the latest
epoch with everything needed to resume. A checkpoint is a plain dict of tensors and Python values:

    {"kind": "pretrain" | "finetune", "config": {...every setting...}, "epoch": epochs done,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "rng": {...}, "digest": sha256, ...}

It is written by a background thread, to a temporary file then renamed (a crash never leaves half
a checkpoint), read with `torch.load(weights_only=True)` (which cannot run code hidden in a file),
and refused when the SHA-256 digest of its contents does not match the one written with it.
Scripts rebuild their model from "config" alone.
"""
import csv
import errno
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from runs import RunError


class Busy(RunError):
    """The run folder is being written by another process."""


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ----------------------------------------------------------------------------------- checkpoints
def _digest(state):
    """SHA-256 of every tensor (name, dtype, shape, bytes) and every other value of a checkpoint."""
    h = hashlib.sha256()

    def walk(name, value):
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{name}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                walk(f"{name}/{k}", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{name}={value!r}".encode())
    walk("", {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def write_atomically(path, write):
    """write(tmp) writes the file to path.tmp, which is flushed to the disk and then renamed to path:
    readers see the old file or the new one, never half of one, even after a power cut, and an
    interrupted write leaves nothing behind. Missing parent folders are made."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
        except RuntimeError as e:  # torch.save's way of saying the disk is full: "unexpected pos 55040 vs 54936"
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.EIO, f"torch.save failed with {free / 1e6:,.0f} MB free on its disk: "
                                     f"{str(e).splitlines()[0]}", str(tmp)) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the new file's bytes are on the disk before its name replaces the old one
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, state):
    """Write state with its digest, atomically."""
    write_atomically(path, lambda tmp: torch.save(dict(state, digest=_digest(state)), tmp))


def cpu_copy(state):
    """A copy of a checkpoint's state on the CPU, tensors included: what training changes next cannot reach it.
    Tensors are made contiguous here, in the training thread, so that the writer thread runs no parallel
    torch operator: one that did started a second OpenMP team, and 10 epochs of pretraining on 2 cores
    took 33-35 s instead of 30 s."""
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
    return state  # numbers and strings, immutable


def save_json(path, value):
    """Write value as JSON, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def load_checkpoint(path, kind=None):
    """Read a checkpoint of this project; anything else, or a corrupt one, is a one-line RunError."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        raise RunError(f"{path}: a run folder, not a checkpoint" + (f"; it holds {', '.join(found)}" if found else ""))
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, not a torch file, ...
        raise RunError(f"{path}: corrupt or truncated checkpoint (torch.load failed: {type(e).__name__})") from None
    if not isinstance(state, dict) or "kind" not in state or "config" not in state:
        raise RunError(f"{path}: not a checkpoint of this project (no 'kind' and 'config')")
    if state.get("digest") != _digest(state):
        raise RunError(f"{path}: corrupt checkpoint (its contents do not match the digest written with it)")
    if kind is not None and state["kind"] != kind:
        raise RunError(f"{path}: is a {state['kind']} checkpoint, a {kind} checkpoint is needed here")
    return state


# ------------------------------------------------------------------------------------ run folder
class Run:
    """The run folder of one training script, written by the main process only.

    start() restores checkpoint.pt into the model, optimizer, scheduler and scaler when --resume asks for
    it (refusing changed settings), writes config.json and opens log.csv; save() and log() follow
    each epoch; interruptible() turns Ctrl-C into one line that says how to continue, and returns only
    when the last checkpoint is on disk."""

    FREE = ("resume", "device", "workers", "stop_after", "compile", "out", "cache")  # may change on resume
    ADDED = {"keep_last": False}  # settings newer than the first runs: the value a run saved before them had

    def __init__(self, out, kind, config, fields, main_process=True):
        self.out, self.kind, self.config, self.fields = Path(out), kind, config, fields
        self.main_process, self.epoch = main_process, 0
        self.checkpoint = self.out / "checkpoint.pt"
        self.writer, self.pending = ThreadPoolExecutor(max_workers=1), None  # the checkpoint written in the background

    def start(self, resume_asked, net, optimizer, scheduler, scaler):
        """Returns the restored checkpoint (a dict), or None for a fresh run."""
        if self.main_process:  # one writer per folder: a second process started on it stops here
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.out / ".lock", "w")
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process ends
            except BlockingIOError:
                raise Busy(f"{self.out} is being written by another process; wait for it or use another --out") from None
            for leftover in [*self.out.glob("*.pt.tmp"), self.out / "log.csv.tmp", self.out / "config.json.tmp"]:
                leftover.unlink(missing_ok=True)  # what a killed save left behind
        state = None
        if self.checkpoint.exists():
            if not resume_asked:
                raise RunError(f"{self.out} already holds a run: pass --resume to continue it, or another --out")
            state = load_checkpoint(self.checkpoint, self.kind)
            saved = dict(self.ADDED, **state["config"])
            changed = [k for k in self.config if k not in self.FREE and saved.get(k) != self.config[k]]
            if changed:  # world_size too: the steps per epoch, and so the schedule, depend on it
                name = {"world_size": "processes", "bank_size": "the dataset's slices"}
                raise RunError("cannot resume with other settings (" + ", ".join(
                    f"{name.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} -> {self.config[k]!r}"
                    for k in changed[:3])
                    + f"); give the run's own values ({self.out / 'config.json'}) or use another --out")
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):  # fp16's loss scale
                scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.epoch = state["epoch"]
        if self.main_process:
            rows = self._logged() if state else []  # read whole before anything is rewritten
            save_json(self.out / "config.json", self.config)  # atomically, like the log: a kill keeps the old one
            print("config: " + " ".join(f"{k}={v}" for k, v in self.config.items()))
            if state:
                print(f"resuming {self.out} after epoch {self.epoch}")
            elif resume_asked:  # a mistyped --out would otherwise start over unnoticed
                print(f"--resume: no checkpoint in {self.out}, starting a new run")
            write_atomically(self.out / "log.csv", lambda tmp: self._write_log(tmp, rows))
        return state

    def _write_log(self, path, rows):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def _logged(self):
        """The rows of log.csv up to the checkpoint's epoch (later ones were trained after it, and are dropped)."""
        path = self.out / "log.csv"
        if not path.exists():
            print(f"note: {path} is missing; the resumed log starts at epoch {self.epoch + 1}")
            return []
        try:
            return [r for r in csv.DictReader(path.open()) if int(r["epoch"]) <= self.epoch]
        except (ValueError, KeyError, TypeError) as e:  # a hand edit, another program's file
            raise RunError(f"{path}: not a log of this project ({type(e).__name__}: {e}); mend it, or delete it "
                           f"to resume without the epochs before") from None

    def save(self, epoch, net, optimizer, scheduler, scaler, **extra):
        """Write checkpoint.pt without holding up training: the state is copied to the CPU here, then hashed
        and written by a background thread while the next epoch runs (at width 32 that is 40 MB)."""
        self.wait()  # one write at a time
        state = cpu_copy(dict(kind=self.kind, config=self.config, epoch=epoch, model=net.state_dict(),
                              optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              scaler=scaler.state_dict(), rng=rng_state(), **extra))
        self.pending = self.writer.submit(save_checkpoint, self.checkpoint, state)
        self.epoch = epoch

    def wait(self):
        """Return when the checkpoint being written is on disk; raise its error if the write failed."""
        if self.pending is not None:
            try:
                self.pending.result()  # a Ctrl-C here leaves it pending: interruptible() waits for it again
            except OSError as e:  # a full disk, say
                self.pending = None
                before = "the one before is intact" if self.checkpoint.exists() else "there is none before it"
                raise RunError(f"{self.checkpoint}: cannot be written ({e.strerror or e}); {before}") from None
            self.pending = None

    def resume_command(self):
        """How to continue: this command with --resume, under torchrun as it was launched; reproduce.py (a
        cell run inside it) resumes its cells when run again as it was."""
        script, argv = Path(sys.argv[0]).name, [a for a in sys.argv[1:] if a != "--resume"]
        command = " ".join([script, *map(shlex.quote, argv)])
        if script != f"{self.kind}.py":
            return f"continue with the same command: python {command}"
        world = self.config.get("world_size", 1)
        if world > 1:
            return f"continue with torchrun as before ({world} processes) and: {command} --resume"
        return f"continue with: python {command} --resume"

    def log(self, **row):
        """Append one epoch's row to log.csv and print it."""
        with (self.out / "log.csv").open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row[k] for k in self.fields})
        values = "  ".join(f"{k} {row[k]:.2e}" if k == "lr" else f"{k} {row[k]:.4f}" for k in self.fields[1:-1])
        print(f"epoch {row['epoch']:3d}/{self.config['epochs']}  {values}  {row['seconds']:.1f} s")

    @contextmanager
    def interruptible(self):
        """Around the training loop: Ctrl-C, or a SIGTERM (a cluster's time limit, torchrun stopping its other
        processes), lets the checkpoint being written end whole and says where the last one is; the folder
        is released."""
        main_thread = threading.current_thread() is threading.main_thread()  # signal handlers are set there only
        before = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            yield
            self.wait()
        except KeyboardInterrupt as e:
            self.wait()
            said = "interrupted" + (" (SIGTERM)" if isinstance(e, Terminated) else "")
            if not self.main_process:  # rank 0 says where the run stands
                raise RunError(said) from None
            if not self.checkpoint.exists():
                raise RunError(f"{said} before the first checkpoint of {self.out}: nothing to resume") from None
            raise RunError(f"{said}; {self.checkpoint} holds epoch {self.epoch}, {self.resume_command()}") from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
            if self.pending is not None:  # another error stopped the run: the last write still ends whole
                self.pending.exception()
            if getattr(self, "lock", None):
                self.lock.close()  # closing the file releases the lock


class Terminated(KeyboardInterrupt):
    """A SIGTERM, met like Ctrl-C inside a training loop."""


def _terminated(signum, frame):
    raise Terminated


def check_finite(value, epoch, out):
    """Stop before a non-finite epoch reaches a checkpoint: the last one stays as it was."""
    if not math.isfinite(value):
        kept = f"the checkpoint of epoch {epoch} in {out} is intact" if epoch else f"no checkpoint was written in {out}"
        raise RunError(f"the loss became {value} at epoch {epoch + 1}; {kept} (try a lower --lr)")
