"""data.py: volumes in, slices with normalized positions out.

  1. a dataset folder (or the name of the embedded synthetic dataset, generated on first use) is
     read once by volumes.py (layouts, canonical orientation, preprocessing);
  2. the result is kept in a cache of memory-mapped arrays (float16 images, uint8 labels: 3 * S * S
     bytes per slice), so one slice is one small read and the data never has to fit in memory;
  3. a torch Dataset serves slices with the paper's position p = (i + 1) / N of slice i in a
     volume of N slices (i counted from the patient's feet toward the head);
  4. patients are split into folds: train / validation / test never share a patient.

`python data.py make-synthetic OUT --style mri|chd` writes a synthetic dataset (synthetic.py; the
difficulty knobs of cohort.py as flags) and
`python data.py check DIR` summarizes a dataset and lists everything wrong with it.
"""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch

from volumes import DataError, find_cases, label_lookup, preprocess, read_case, read_header, LAYOUTS

REPO = Path(__file__).resolve().parent
CACHE_VERSION = 3  # bump when preprocessing changes: every cache is rebuilt
# Named synthetic datasets, generated into data/NAME on first use (and again when an entry changes):
# name -> (style, patients, seed, knobs); knobs: fields of cohort.Difficulty, defaults where absent. The
# knobs were calibrated on Random alone (results/README.md); the pools are pretraining patients, never tested.
MRI, CHD = {"variability": 1.8}, {"variability": 1.3, "anomalies": 2.0}
SYNTHETIC = {"synthetic": ("mri", 40, 0, MRI), "synthetic-pool": ("mri", 60, 2, MRI),
             "synthetic-chd": ("chd", 40, 1, CHD), "synthetic-chd-pool": ("chd", 60, 3, CHD)}


# ----------------------------------------------------------------------------------- 1. cache
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
    """A preprocessed dataset on disk: images.npy (T, S, S) float16, labels.npy (T, S, S) uint8
    (zeros for unlabeled volumes) and meta.json, for T slices in all. Arrays are memory-mapped
    on first use, never pickled: a DataLoader worker opens its own map."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.volumes = [Volume(**v) for v in self.meta["volumes"]]
        self.classes, self.image_size = self.meta["classes"], self.meta["image_size"]
        self._arrays = {}

    def array(self, name):
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}

    def patients(self, labeled=False):
        return sorted({v.patient for v in self.volumes if v.labeled or not labeled})


def resolve_data(data=None):
    """A data folder, or the name of a synthetic dataset (generated into data/NAME on first use)."""
    data = data or "synthetic"
    if data not in SYNTHETIC:
        return Path(data)
    from cohort import Difficulty
    from synthetic import is_current, write_synthetic
    style, patients, seed, knobs = SYNTHETIC[data]
    folder, difficulty = REPO / "data" / data, Difficulty(**knobs)
    if not is_current(folder, patients, style, seed, difficulty):
        print(f"generating synthetic dataset {data!r}: {patients} {style} patients, {difficulty} -> data/{data}")
        write_synthetic(folder, patients=patients, style=style, seed=seed, difficulty=difficulty)
    return folder


def same_data(a, b):
    """Whether two --data values name one dataset: a synthetic dataset's name, or a folder however spelled."""
    folder = lambda d: REPO / "data" / d if d in SYNTHETIC else Path(d)
    return folder(a).resolve() == folder(b).resolve()


READING = dict(layout="auto", slice_axis=2, spacing=None, intensity="clip-zscore")  # how a dataset is read, defaults
DATA_KEYS = ("data", "image_size", "layout", "slice_axis", "spacing", "intensity", "cine", "cache")


def settings(config):
    """The dataset settings of a script's config (vars(args) or a checkpoint's): open_dataset(**settings(c))."""
    return {k: config[k] for k in DATA_KEYS if config.get(k) is not None}


def open_dataset(data="synthetic", image_size=64, layout="auto", slice_axis=2, spacing=None,
                 intensity="clip-zscore", cine=False, cache=None):
    """The SliceCache of a dataset, built first when missing or stale.

    The cache is keyed by the preprocessing settings and checked against the size and
    modification time of every source file, so editing the data rebuilds it. Processes that open
    a missing cache at once build it once: the others wait for that build, then read it."""
    assert image_size >= 16 and image_size % 16 == 0, f"image_size must be a multiple of 16, got {image_size}"
    root = resolve_data(data)
    layout, cases, classes = find_cases(root, layout, cine)
    key = dict(version=CACHE_VERSION, data=str(root.resolve()), layout=layout, image_size=image_size,
               slice_axis=slice_axis, spacing=spacing, intensity=intensity, cine=cine)
    sources = sorted({p for case in cases for p in (case.image, case.label) if p is not None})
    sources += [root / "dataset.json"] if (root / "dataset.json").exists() else []
    try:
        stamps = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    except OSError as e:  # a broken symbolic link, a file removed meanwhile
        link = "; a broken symbolic link" if Path(e.filename).is_symlink() else ""
        raise DataError(f"{e.filename}: cannot read ({e.strerror}{link})") from None
    fingerprint = digest(stamps)
    cache_root = Path(cache or os.environ.get("PCL_CACHE") or REPO / "cache")
    folder = cache_root / f"{root.resolve().name}-{digest(key)[:12]}"
    found = _current(folder, fingerprint)
    if found is None:
        with _lock(folder):  # another process may be building it: wait, then look again
            found = _current(folder, fingerprint)
            if found is None:
                _build_cache(folder, cases, classes, key, fingerprint)
                found = SliceCache(folder)
    return found


def _current(folder, fingerprint):
    """The cache in folder when it was built from these sources, else None."""
    try:
        found = SliceCache(folder)
    except OSError:  # not built yet, or being replaced by a rebuild
        return None
    return found if found.meta["fingerprint"] == fingerprint else None


@contextlib.contextmanager
def _lock(folder):
    """Hold an exclusive lock on folder.lock next to the cache folder: one process at a time builds it."""
    import fcntl  # POSIX file locks
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DataError(f"cache folder {folder.parent} is not writable ({e.strerror}); set --cache or $PCL_CACHE") from None
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
    """An empty folder.tmpPID to build into, after removing those of builds whose process is gone."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for orphan in folder.parent.glob(f"{folder.name}.tmp*"):  # left by a killed build
            if not _alive(int(orphan.name.rsplit(".tmp", 1)[1] or 0)):
                shutil.rmtree(orphan, ignore_errors=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp
    except OSError as e:
        raise DataError(f"cache folder {folder.parent} is not writable ({e.strerror}); set --cache or $PCL_CACHE") from None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return pid > 0


def digest(obj):
    """A short stable name for a JSON-able object (settings, file lists)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _build_cache(folder, cases, classes, settings, fingerprint):
    """Preprocess every case into a temporary folder, then rename it into place: a crash
    never leaves a half-written cache that looks complete."""
    from tqdm import tqdm
    size, axis = settings["image_size"], settings["slice_axis"]
    lookup = label_lookup(settings["layout"], len(classes))
    counts = [read_header(c.image, c.frame)[axis] for c in cases]  # slices per volume, from headers only
    tmp = _fresh_build_folder(folder)
    try:
        shape = (sum(counts), size, size)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, shape)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint8, shape)
        volumes, start = [], 0
        for case, n in zip(tqdm(cases, desc=f"caching {len(cases)} volumes", leave=False, disable=None), counts):
            image, label, spacing = read_case(case, lookup, axis)
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
        meta = dict(settings, fingerprint=fingerprint, classes=classes,
                    volumes=[asdict(v) for v in volumes])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------- 2. dataset
class SliceDataset(torch.utils.data.Dataset):
    """The slices of some patients. A sample is a dict: image (1, S, S) float16, position
    p = (i + 1) / N as in the paper, slices N, patient (str), index (its row in this dataset) and
    label (S, S) uint8 when labeled. Volumes: the labeled ones (labeled=True), the cine frames of
    each patient that has them (cine=True: the authors' ACDC pretraining), else every non-cine one.

    `dataset[[i, j, ...]]` returns a whole batch from one memory-mapped read; make_loader uses it.
    Images and labels keep the cache's compact types (3 bytes per pixel, not 12): the training loops
    convert them on the device, after the copy (several times more slices per second at 512 px)."""

    def __init__(self, cache, patients=None, labeled=False, cine=False):
        wanted = set(cache.patients() if patients is None else patients)
        unknown = wanted - {v.patient for v in cache.volumes}
        if unknown:
            raise DataError(f"{cache.folder}: patients {sorted(unknown)[:5]} are not in the dataset")
        with_cine = {v.patient for v in cache.volumes if v.cine} if cine and not labeled else set()
        volumes = [v for v in cache.volumes if v.patient in wanted and v.cine == (v.patient in with_cine)]
        if labeled and not all(v.labeled for v in volumes):
            raise DataError(f"{cache.meta['data']}: volumes without labels: "
                            f"{[v.id for v in volumes if not v.labeled][:5]}")
        self.cache, self.labeled = cache, labeled
        self.rows = np.concatenate([np.arange(v.start, v.start + v.slices) for v in volumes])  # (n,)
        self.slices = np.concatenate([np.full(v.slices, v.slices) for v in volumes])  # (n,): N
        self.positions = np.concatenate([np.arange(1, v.slices + 1) / v.slices for v in volumes])  # float64: see losses.pcl_mask
        self.patients = np.array([v.patient for v in volumes for _ in range(v.slices)], object)  # (n,)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return {k: v[0] for k, v in self[[index]].items()}
        index = np.asarray(index)
        rows = self.rows[index]
        order = np.argsort(rows)  # read the file front to back, then restore the asked order
        images = np.empty((len(rows), 1) + self.cache.array("images").shape[1:], np.float16)
        images[order, 0] = self.cache.array("images")[rows[order]]  # (B, 1, S, S)
        batch = {"image": torch.from_numpy(images), "position": torch.from_numpy(self.positions[index]),  # (B,)
                 "slices": torch.from_numpy(self.slices[index]), "patient": self.patients[index].tolist(),
                 "index": torch.as_tensor(index)}
        if self.labeled:
            labels = np.empty((len(rows),) + self.cache.array("labels").shape[1:], np.uint8)
            labels[order] = self.cache.array("labels")[rows[order]]
            batch["label"] = torch.from_numpy(labels)  # (B, S, S)
        return batch


def make_loader(dataset, batch_size, rank=0, world=1, seed=0, drop_last=True, workers=0, pin_memory=False):
    """(loader, sampler): this process's share of every shuffled batch (call sampler.set_epoch each
    epoch), each fetched with one read (dataset[list of indices]); pin_memory (for CUDA) lets the
    copies to the GPU overlap the computation (non_blocking=True)."""
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=drop_last)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
    loader = torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=pin_memory)
    return loader, sampler


# --------------------------------------------------------------------------------- 3. splits
def split_patients(patients, folds=5, fold=0, seed=0, val=2):
    """Patient-level K-fold split: {"train", "val", "test"} lists of patient ids.

    A seeded permutation of the sorted patients is cut into `folds` chunks; chunk `fold` is the
    test set. The rest is shuffled again, with a generator of (seed, fold), so that every fold
    draws its own patients (as the authors' per-fold sampling): its first `val` patients validate
    (model selection never looks at the test fold) and the others train. Taking train[:M] gives
    the M labeled patients, so smaller M are subsets of larger ones."""
    patients = sorted(set(patients))
    if not 0 <= fold < folds <= len(patients):
        raise DataError(f"fold {fold} of {folds} folds is impossible with {len(patients)} patients")
    order = np.random.default_rng(seed).permutation(len(patients))
    chunks = np.array_split(order, folds)
    test = {int(i) for i in chunks[fold]}
    rest = [patients[i] for i in np.random.default_rng([seed, fold]).permutation(sorted(set(order) - test))]
    if len(rest) <= val:
        raise DataError(f"{len(rest)} patients outside the test fold cannot give {val} validation "
                        f"patients and at least one training patient")
    return {"train": rest[val:], "val": rest[:val], "test": [patients[i] for i in sorted(test)]}


# --------------------------------------------------------------------------- 4. command line
def image_size(text):
    """An argparse type: a slice side S, a positive multiple of 16 (the U-Net pools 4 times)."""
    value = int(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 16, got {text}")
    return value


def add_data_arguments(parser, cine=True):
    """The flags every script uses to name, read and preprocess a dataset (DATA_KEYS, with --image-size);
    --cine only where unlabeled frames are used (pretraining)."""
    parser.add_argument("--data", default=None, help="dataset folder, or a synthetic dataset name: "
                        f"{', '.join(SYNTHETIC)} (default: synthetic, generated on first use)")
    parser.add_argument("--layout", default=READING["layout"], choices=("auto",) + LAYOUTS)
    parser.add_argument("--slice-axis", type=int, default=READING["slice_axis"], choices=(0, 1, 2),
                        help="array axis of the stacking direction (default: the file's third)")
    from runs import positive
    parser.add_argument("--spacing", type=positive(float), default=READING["spacing"],
                        help="resample in-plane to this many mm per pixel and crop the centre (default: "
                             "the whole field of view resized to S x S)")
    parser.add_argument("--intensity", default=READING["intensity"], choices=("clip-zscore", "zscore"),
                        help="clip to the [1, 99] percentiles before z-scoring each volume, or not")
    if cine:
        parser.add_argument("--cine", action="store_true", help="ACDC: pretrain on every frame of the 4D cine files")
    parser.add_argument("--cache", default=None, help="cache folder (default: $PCL_CACHE or ./cache)")


def main(argv=None):
    from volumes import check
    from runs import Parser, RunError, check_writable, non_negative, positive
    parser = Parser(description="Make the synthetic dataset or check a dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-synthetic", help="write the synthetic dataset (nnU-Net layout)")
    make.add_argument("out")
    make.add_argument("--patients", type=positive(int), default=40)
    make.add_argument("--style", default="mri", choices=("mri", "chd"))
    make.add_argument("--seed", type=non_negative(int), default=0)
    for knob in ("variability", "contrast", "noise", "anomalies"):  # the fields of cohort.Difficulty
        make.add_argument(f"--{knob}", type=non_negative(float), default=1.0, help="difficulty knob (cohort.py), default 1")
    inspect = commands.add_parser("check", help="summarize a dataset and list its problems")
    inspect.add_argument("data")
    inspect.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
    inspect.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    try:
        if args.command == "make-synthetic":
            import time
            from cohort import Difficulty
            from synthetic import write_synthetic
            try:
                difficulty = Difficulty(args.variability, args.contrast, args.noise, args.anomalies)
            except ValueError as e:
                parser.error(str(e))
            check_writable(args.out, "make-synthetic")
            start = time.time()
            write_synthetic(args.out, patients=args.patients, style=args.style, seed=args.seed, difficulty=difficulty)
            print(f"wrote {args.patients} {args.style} patients ({difficulty}) to {args.out} "
                  f"in {time.time() - start:.1f} s")
            return
        lines, problems = check(Path(args.data), args.layout, args.slice_axis)
    except (DataError, FileExistsError, RunError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(lines))
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problem(s): " + ("NOT usable" if problems else "usable"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
