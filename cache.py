"""cache.py: a dataset preprocessed once, kept on disk as memory-mapped arrays.

A cache folder holds images.npy (T, S, S) float16, labels.npy (T, S, S) uint8 (zeros for unlabeled
volumes) and meta.json (the settings, the classes and where each volume's N slices start), for T
slices in all: 3 * S * S bytes per slice, so one slice is one small read and the data never has to
fit in memory. The folder is named by the preprocessing settings (other settings get a folder of
their own) and checked against the size and modification time of every source file: editing the
data rebuilds it. A build writes a temporary folder and renames it into place, under a file lock: a
crash never leaves a half-written cache that looks complete, and processes that open a missing cache
at once build it once.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np

from layouts import label_lookup, nnunet_problems
from volumes import (ASTRAY, DataError, axis_doubt, dataset_direction, misalignment, preprocess, read_case,
                     read_header, slice_direction)

CACHE_VERSION = 5  # bump when preprocessing changes: every cache is rebuilt (5: along the dataset's direction)


@dataclass
class Volume:
    id: str
    patient: str
    start: int             # first row of this volume in the cache's slice arrays
    slices: int            # N
    spacing: list          # (in-plane mm per pixel after resampling, slice mm)
    labeled: bool
    cine: bool = False     # one time frame of a 4D cine file (pretraining only)


class SliceCache:
    """A cache folder, read: its volumes, classes and image size, and its arrays, memory-mapped on
    first use and never pickled (a DataLoader worker opens its own map)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.volumes = [Volume(**v) for v in self.meta["volumes"]]
        self.classes, self.image_size = self.meta["classes"], self.meta["image_size"]
        self._arrays = {}

    def array(self, name):
        """images (T, S, S) float16 or labels (T, S, S) uint8, memory-mapped. A worker maps them by the
        folder's name: if another run has rebuilt the folder since (its dataset changed), the arrays would no
        longer match these volumes, so that is an error."""
        if name not in self._arrays:
            try:
                array = np.load(self.folder / f"{name}.npy", mmap_mode="r")
                rebuilt = json.loads((self.folder / "meta.json").read_text())["fingerprint"] != self.meta["fingerprint"]
            except (OSError, ValueError, KeyError):
                rebuilt = True
            if rebuilt:  # and the array is not kept: every later call says so too
                raise DataError(f"{self.folder}: rebuilt or removed by another run since this one opened it (its "
                                f"dataset changed); start this run again (--resume continues a training run)")
            self._arrays[name] = array
        return self._arrays[name]

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}

    def patients(self, labeled=False):
        return sorted({v.patient for v in self.volumes if v.labeled or not labeled})


def digest(obj):
    """A short stable name for a JSON-able object (settings, file lists)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def open_cache(cache_root, root, cases, classes, settings):
    """The SliceCache of the dataset in root (its cases and classes from layouts.find_cases) read with
    settings (layout, image_size, slice_axis, spacing, intensity, cine), built first when missing or stale."""
    settings = dict(settings, version=CACHE_VERSION, data=str(root.resolve()))
    sources = sorted({p for case in cases for p in (case.image, case.label) if p is not None})
    sources += [root / "dataset.json"] if (root / "dataset.json").exists() else []
    try:
        stamps = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    except OSError as e:  # a broken symbolic link, a file removed meanwhile
        link = "; a broken symbolic link" if Path(e.filename).is_symlink() else ""
        raise DataError(f"{e.filename}: cannot read ({e.strerror}{link})") from None
    fingerprint = digest(stamps)
    folder = Path(cache_root) / f"{root.resolve().name}-{digest(settings)[:12]}"
    found = _current(folder, fingerprint)
    if found is None:
        with _lock(folder):  # another process may be building it: wait, then look again
            found = _current(folder, fingerprint)
            if found is None:
                build(folder, cases, classes, settings, fingerprint)
                found = SliceCache(folder)
                found.array("images"), found.array("labels")  # mapped now, before anything can rebuild it
                _note_older_versions(folder, settings["data"])
                astray, doubts = found.meta["astray"], found.meta["doubts"]
                if astray:
                    print(f"note: {len(astray)} volume(s) of {root} have their slices more than {ASTRAY} degrees "
                          f"from the dataset's direction ({astray[0]}, ...): their positions do not mean the same "
                          f"places; python data.py check {root}")
                if doubts:
                    print(f"note: {len(doubts)} volume(s) of {root} are read across their stacking axis, maybe: "
                          f"{doubts[0]}")
                for problem in nnunet_problems(root, cases) if settings["layout"] == "nnunet" else []:
                    print(f"note: {problem}")
    return found


def _note_older_versions(folder, data):
    """Say where caches of this dataset built by another CACHE_VERSION lie: this code never reads them."""
    older = []
    for other in folder.parent.glob(folder.name[:-12] + "?" * 12):  # NAME-<12 hex digits>: the same dataset name
        try:
            meta = json.loads((other / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("data") == data and meta.get("version") != CACHE_VERSION:
            older.append(other)
    if older:
        size = sum(f.stat().st_size for other in older for f in other.iterdir())
        print(f"note: {len(older)} cache folder(s) of {data} made by another version, {size / 1e9:.2f} GB, are no "
              f"longer read and can be deleted: {', '.join(str(o) for o in older[:3])}")


def build(folder, cases, classes, settings, fingerprint):
    """Preprocess every case (volumes.py) into a temporary folder, then rename it into place."""
    from tqdm import tqdm
    size, axis = settings["image_size"], settings["slice_axis"]
    lookup = label_lookup(settings["layout"], len(classes))
    headers = [read_header(c.image, c.frame) for c in cases]  # (shape, affine) of each volume, headers only
    counts = [shape[axis] for shape, _ in headers]  # slices per volume
    directions = [slice_direction(affine, axis, c.image) for c, (_, affine) in zip(cases, headers)]  # (3,) each
    along = dataset_direction(directions)  # (3,) every volume's slices are ordered along it
    tmp = _fresh_build_folder(folder)
    try:
        shape = (sum(counts), size, size)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, shape)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint8, shape)
        _reserve(tmp / "images.npy", tmp / "labels.npy")
        volumes, start, doubts = [], 0, []
        for case, n, (_, affine) in zip(tqdm(cases, desc=f"caching {len(cases)} volumes", leave=False, disable=None),
                                        counts, headers):
            image, label, spacing = read_case(case, lookup, axis, along)
            doubts += [doubt] if (doubt := axis_doubt(spacing, affine, axis, case.image)) else []
            try:
                x, y = preprocess(image, label, spacing, size, settings["spacing"], settings["intensity"])
            except DataError as e:
                raise DataError(f"{case.image}: {e}") from None
            images[start:start + n] = x
            if y is not None:
                labels[start:start + n] = y
            mm = settings["spacing"] or max(image.shape[0] * spacing[0], image.shape[1] * spacing[1]) / size
            volumes.append(Volume(case.id, case.patient, start, n, [mm, float(spacing[2])], y is not None,
                                  case.frame is not None))
            start += n
        images.flush(), labels.flush()
        del images, labels
        astray = [str(c.image) for c, d in zip(cases, directions) if misalignment(d, along) > ASTRAY]
        meta = dict(settings, fingerprint=fingerprint, classes=classes, direction=along.tolist(), astray=astray,
                    doubts=doubts, volumes=[asdict(v) for v in volumes])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reserve(*paths):
    """Allocate the disk blocks of these (sparse) files now: writing a memory map past the free space
    kills the process with SIGBUS and not a word, where this is one line."""
    needed = sum(p.stat().st_size for p in paths)
    for path in paths:
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DataError(f"{path.parent.parent}: no room for a cache of {needed / 1e6:,.0f} MB "
                                    f"({e.strerror}); free some, or pass --cache DIR") from None
                # else: a file system that cannot allocate ahead (EOPNOTSUPP): write as before


def _current(folder, fingerprint):
    """The cache in folder when it was built from these sources and is whole, else None (it is rebuilt)."""
    try:
        found = SliceCache(folder)
        shape = (sum(v.slices for v in found.volumes), found.image_size, found.image_size)  # (T, S, S)
        whole = all(found.array(name).shape == shape for name in ("images", "labels"))
        current = found.meta["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # not built yet, or damaged since: a file
        return None                                                # truncated, removed or edited
    return found if whole and current else None


@contextlib.contextmanager
def _lock(folder):
    """Hold an exclusive lock on folder.lock next to the cache folder: one process at a time builds it."""
    import fcntl  # POSIX file locks
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _unwritable(folder, e) from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed, or when its process dies
        except BlockingIOError:
            print(f"waiting for another process to build the cache {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network mounts)
            print(f"note: cannot lock {folder}.lock ({e.strerror}); building the cache unlocked")
        yield
    finally:
        os.close(lock)


def _fresh_build_folder(folder):
    """An empty folder.tmpPID to build into, after removing those of builds whose process is gone, of this
    cache or any other in its folder (a killed build holds the whole cache's disk space, reserved up front)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for orphan in folder.parent.glob("*.tmp*"):  # left by a killed build
            pid = orphan.name.rsplit(".tmp", 1)[1]
            if (pid.isdigit() or not pid) and not _alive(int(pid or 0)):
                shutil.rmtree(orphan, ignore_errors=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp
    except OSError as e:
        raise _unwritable(folder, e) from None


def _unwritable(folder, e):
    why = "a file, not a folder" if folder.parent.is_file() else f"not writable ({e.strerror})"
    return DataError(f"cache folder {folder.parent}: {why}; set --cache or $PCL_CACHE")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return pid > 0
