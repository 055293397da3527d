"""runs.py: what every script shares: one-line errors, flag types, the device, precision, seeds and the
learning-rate schedule.

A user's mistake (a flag, a path) ends a script with one line and an exit code, never a traceback: flags are
checked where argparse parses them (Parser, positive, non_negative, fraction, numbers, image_size; absolute saves a
path flag whole), paths before any work (check_writable), and every other problem is a RunError (or a
volumes.py DataError) that cli() prints.
Run folders and checkpoints are checkpoints.py's.
"""
import argparse
import math
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch


class RunError(Exception):
    """A problem with a run (its flags, a checkpoint, the training itself), said in one line."""


def cli(main):
    """Run a script's main(): a RunError or a data error ends with its one line and exit code 1."""
    from volumes import DataError
    try:
        main()
    except (RunError, DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the machine's, not the code's: a full disk, a folder without write permission
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before the training loop, or in a script without one
        sys.exit("interrupted")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad value ends with one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def positive(kind):
    """An argparse type: a finite number of this kind that is > 0."""
    def parse(text):
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {'a finite number ' * (kind is float)}> 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"  # argparse names it in "invalid ... value"
    return parse


def non_negative(kind):
    """An argparse type: a finite number of this kind that is >= 0."""
    def parse(text):
        value = kind(text)
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {'a finite number ' * (kind is float)}>= 0, got {text}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


def fraction(text):
    """An argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def numbers(text):
    """An argparse type: a comma-separated list of distinct non-negative integers."""
    parts = text.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated non-negative integers, got {text!r}")
    values = [int(part) for part in parts]
    if len(set(values)) < len(values):  # a grid would run its cells twice
        raise argparse.ArgumentTypeError(f"lists a number twice: {text!r}")
    return values


def image_size(text):
    """An argparse type: a slice side S, a positive multiple of 16 (the U-Net pools 4 times)."""
    value = int(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 16, got {text}")
    return value


def absolute(text):
    """An argparse type: a path made absolute, so that a config saved with it names the same file from
    any working directory."""
    return str(Path(text).expanduser().resolve())


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def default_sizes(device):
    """(image_size, width) of a run given neither: small on a CPU; on CUDA the paper's width and a slice
    large enough to keep the GPU busy (benchmark.py)."""
    return (256, 32) if device.type == "cuda" else (64, 16)


AMP_MODES = ("auto", "off", "bf16", "fp16")  # --amp of every script
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # --compile of pretrain.py and benchmark.py


def amp_dtype(device, amp="auto"):
    """--amp as a dtype, None for float32. auto: bf16 on a GPU that has it, fp16 on an older one, and
    float32 on the CPU."""
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def amp_context(device, amp="auto"):
    """torch.autocast for --amp."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, amp="auto"):
    """Loss scaling for fp16, whose small gradients would flush to zero: scale(loss).backward(), then
    step(optimizer) skips a step whose gradients overflowed and update() adapts the scale (this reads
    one value from the device per step). Under bf16 or float32 it passes everything through."""
    fp16 = amp_dtype(device, amp) == torch.float16
    if fp16:  # a skipped first step makes torch warn of the schedule; it counts steps taken or skipped, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step")
    return torch.amp.GradScaler(device.type, enabled=fp16)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def cosine_schedule(optimizer, total_steps, min_lr=0.0):
    """The learning rate decayed from lr along a half cosine, one step per batch, never below min_lr
    (the authors' finetuning floor)."""
    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(
        min_lr / lr, 0.5 * (1 + math.cos(math.pi * step / total_steps))))


def check_writable(path, flag, folder=True, suffix=None):
    """Refuse, before anything is computed or written, an output path that cannot be written: a
    folder (--out) or a file (--json) that exists as the other kind, or whose nearest existing folder
    cannot take a new file; and an existing file that is not one this flag writes (not ending in
    `suffix`, or a run's own config.json), which would be replaced."""
    target = Path(path).resolve()
    if target.exists() and target.is_dir() != folder:
        raise RunError(f"{flag} {path}: " + ("a file, not a folder" if folder else "a folder, not a file"))
    if target.is_file() and target.name == "config.json" and (target.parent / "checkpoint.pt").exists():
        raise RunError(f"{flag} {path}: the config of the run beside it; it would be replaced (name another file)")
    if target.is_file() and suffix and target.suffix.lower() != suffix:
        raise RunError(f"{flag} {path}: exists, and is not a {suffix} file; it would be replaced (remove it first, "
                       f"or name another file)")
    existing = target if target.is_dir() else target.parent  # the nearest folder that exists takes the new file
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RunError(f"{flag} {path}: cannot write in {existing} ({e.strerror})") from None
