"""runs.py: what every training script shares about a run folder.

A run folder holds `checkpoint.pt` (the latest epoch: everything needed to resume), `log.csv`
(one row per epoch) and `config.json`. A checkpoint is a plain dict of tensors and Python values,
written to a temporary file and renamed (a crash never leaves half a checkpoint), and read with
`torch.load(weights_only=True)`, which cannot run code hidden in a file:

    {"kind": "pretrain" | "finetune", "config": {...the script's flags...}, "epoch": epochs done,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "rng": {...}, ...}

Every script rebuilds its model from "config" alone.
"""
import csv
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch


class RunError(Exception):
    """A problem with a run (its flags, a checkpoint, the training itself), said in one line."""


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a mix


def load_checkpoint(path, kind=None):
    """Read a checkpoint of this project, refusing anything else with a one-line RunError."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, not a torch file, ...
        first_line = (str(e).strip().splitlines() or [""])[0][:150]
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict) or "kind" not in state or "config" not in state:
        raise RunError(f"{path}: not a checkpoint of this project (no 'kind' and 'config')")
    if kind is not None and state["kind"] != kind:
        raise RunError(f"{path}: is a {state['kind']} checkpoint, a {kind} checkpoint is needed here")
    return state


def cosine_schedule(optimizer, total_steps):
    """The learning rate decayed from its start to 0 along a half cosine, one step per batch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def resume(out, kind, config, resume_asked, net, optimizer, scheduler):
    """Restore a run folder's checkpoint into net, optimizer, scheduler and the random-number
    state when --resume asks for it; return the checkpoint (None for a fresh run)."""
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return None
    if not resume_asked:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    state = load_checkpoint(path, kind)
    check_resumable(state["config"], config)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    print(f"resuming {out} after epoch {state['epoch']}")
    return state


def check_finite(loss, epoch, out):
    """Stop before a non-finite loss reaches the weights: the last checkpoint stays as it was."""
    if not torch.isfinite(loss):
        raise RunError(f"the loss became {loss.item()} at epoch {epoch + 1}; the checkpoint of epoch "
                       f"{epoch} in {out} is intact (try a lower --lr)")


def check_resumable(saved, config, free=("resume", "device", "workers", "stop_after", "world_size", "compile")):
    """A resumed run must continue the same experiment: refuse changed flags."""
    changed = [k for k in config if k not in free and saved.get(k) != config[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {config[k]!r}" for k in changed[:3])
        raise RunError(f"cannot resume with other settings ({diffs}); drop them or use another --out")


class CSVLog:
    """One row per epoch; on resume, rows after the checkpoint's epoch are dropped."""

    def __init__(self, path, fields, keep_epochs=0):
        self.path, self.fields = Path(path), fields
        rows = []
        if keep_epochs and self.path.exists():
            rows = [r for r in csv.DictReader(self.path.open()) if int(r["epoch"]) <= keep_epochs]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row):
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row[k] for k in self.fields})


def write_config(folder, config):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
