"""data.py: volumes in, slices with normalized positions out.

  1. a dataset folder (or the name of the embedded synthetic dataset, generated on first use) is
     found by layouts.py and read once by volumes.py (canonical orientation, preprocessing);
  2. the result is kept in a cache of memory-mapped arrays (cache.py: float16 images, uint8 labels,
     3 * S * S bytes per slice), so one slice is one small read and the data never has to fit in memory;
  3. a torch Dataset serves slices with the paper's position p = (i + 1) / N of slice i in a
     volume of N slices (i counted from the patient's feet toward the head; for a sagittal or coronal
     dataset, toward the patient's right or front: volumes.dataset_direction);
  4. patients are split into folds: train / validation / test never share a patient;
  5. `python data.py check DIR` reads a dataset as training would, summarizes it and lists everything
     wrong with it; `python data.py make-synthetic OUT --style mri|chd` writes a synthetic dataset
     (synthetic.py; the difficulty knobs of cohort.py as flags).
"""
import os
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from cache import open_cache
from layouts import LAYOUTS, find_cases, label_lookup, nnunet_problems
from runs import absolute, positive
from volumes import (ASTRAY, BODY_AXES, DataError, axis_doubt, body_axis, dataset_direction, misalignment, preprocess,
                     read_case, read_header, slice_direction)

REPO = Path(__file__).resolve().parent
# Named synthetic datasets, generated into data/NAME on first use (and again when an entry changes):
# name -> (style, patients, seed, knobs); knobs: fields of cohort.Difficulty, defaults where absent. The
# knobs were calibrated on Random alone (results/README.md); the pools are pretraining patients, never tested.
MRI, CHD = {"variability": 1.8}, {"variability": 1.3, "anomalies": 2.0}
SYNTHETIC = {"synthetic": ("mri", 40, 0, MRI), "synthetic-pool": ("mri", 60, 2, MRI),
             "synthetic-chd": ("chd", 40, 1, CHD), "synthetic-chd-pool": ("chd", 60, 3, CHD)}


# --------------------------------------------------------------------------------- 1. datasets
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
    # every time: on a current dataset it only removes what killed writers left beside it
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
    """The SliceCache of a dataset (cache.py), built first when missing or stale: the cache folder is
    --cache, else $PCL_CACHE, else the repository's cache/."""
    assert image_size >= 16 and image_size % 16 == 0, f"image_size must be a multiple of 16, got {image_size}"
    root = resolve_data(data)
    layout, cases, classes = find_cases(root, layout, cine)
    reading = dict(layout=layout, image_size=image_size, slice_axis=slice_axis, spacing=spacing,
                   intensity=intensity, cine=cine)
    return open_cache(Path(cache or os.environ.get("PCL_CACHE") or REPO / "cache"), root, cases, classes, reading)


# -------------------------------------------------------------------------------- 2. slices
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
        volumes = [v for v in cache.volumes if v.patient in wanted and
                   (v.labeled if labeled else v.cine == (v.patient in with_cine))]
        unlabeled = wanted - {v.patient for v in volumes} if labeled else set()  # patients with no labeled volume
        if unlabeled:
            raise DataError(f"{cache.meta['data']}: patients without labels: {sorted(unlabeled)[:5]}")
        self.cache, self.labeled = cache, labeled
        self.rows = np.concatenate([np.arange(v.start, v.start + v.slices) for v in volumes])  # (n,)
        self.slices = np.concatenate([np.full(v.slices, v.slices) for v in volumes])  # (n,): N
        self.positions = np.concatenate([np.arange(1, v.slices + 1) / v.slices for v in volumes])  # (n,) float64: see pcl_mask
        self.patients = np.array([v.patient for v in volumes for _ in range(v.slices)], object)  # (n,)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return {k: v[0] for k, v in self[[index]].items()}
        index = np.asarray(index)
        rows = self.rows[index]
        order = np.argsort(rows)  # (B,): read the file front to back, then restore the asked order
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


# ------------------------------------------------------------------------- 4. check a dataset
def check(root, layout="auto", slice_axis=2, intensity="clip-zscore"):
    """Read every case exactly as training would. Returns (summary lines, problems); the
    dataset is usable when problems is empty."""
    layout, cases, classes = find_cases(root, layout)
    lookup = label_lookup(layout, len(classes))
    problems = nnunet_problems(Path(root), cases) if layout == "nnunet" else []
    if len(classes) < 2:  # unlabeled data can pretrain; finetuning needs a class to segment
        problems.append(f"{root}: no class but {classes[0] if classes else 'none'} in its dataset.json: nothing to finetune on")
    readable = []  # (case, the unit direction (3,) of its stored slices)
    for case in cases:
        try:
            readable.append((case, slice_direction(read_header(case.image, case.frame)[1], slice_axis, case.image)))
        except DataError as e:
            problems.append(str(e))
    along = dataset_direction([d for _, d in readable]) if readable else None  # (3,) as the cache orders them
    slices, spacings, angles = [], [], []
    shapes, codes, dtypes = Counter(), Counter(), Counter()
    voxels = np.zeros(len(classes), np.int64)
    for case, direction in readable:
        try:
            image, label, spacing = read_case(case, lookup, slice_axis, along)
            header = nib.load(str(case.image))
            preprocess(image, None, spacing, 16, intensity=intensity)  # catches constant images
        except DataError as e:
            named = any(str(path) in str(e) for path in (case.image, case.label) if path)  # the file at fault
            problems.append(str(e) if named else f"{case.image}: {e}")
            continue
        slices.append(image.shape[2])
        spacings.append(spacing)
        problems += [doubt] if (doubt := axis_doubt(spacing, header.affine, slice_axis, case.image)) else []
        shapes[header.shape] += 1
        codes["".join(nib.aff2axcodes(header.affine))] += 1
        angles.append(misalignment(direction, along))
        if angles[-1] > ASTRAY:  # a position would mean a place along another axis
            problems.append(f"{case.image}: its slices run {BODY_AXES[body_axis(direction)]}, "
                            f"{angles[-1]:.0f} degrees from the dataset's direction: positions would not "
                            f"compare across volumes")
        dtypes[str(header.get_data_dtype())] += 1
        if label is not None:
            voxels += np.bincount(label.ravel(), minlength=len(classes))
    labeled = sum(c.label is not None for c in cases)
    lines = [f"dataset      {root}  (layout {layout}; classes {', '.join(classes)})",
             f"volumes      {len(cases)} ({labeled} labeled) of {len({c.patient for c in cases})} patients"]
    if slices:
        spacings = np.array(spacings)  # (volumes, 3)
        lines += [f"slices       per volume min {min(slices)}, median {int(np.median(slices))}, "
                  f"max {max(slices)}; {sum(slices)} in all (slice axis {slice_axis})",
                  f"shapes       {_top(shapes)}",
                  f"spacing mm   in-plane {spacings[:, :2].min():.2f}..{spacings[:, :2].max():.2f}, "
                  f"slice {spacings[:, 2].min():.2f}..{spacings[:, 2].max():.2f}",
                  f"orientation  {_top(codes)} (as stored; read in one canonical order)",
                  f"slices run   {BODY_AXES[body_axis(along)]}, along ({', '.join(f'{v:.2f}' for v in along)}) "
                  f"in RAS+; volumes {min(angles):.0f} to {max(angles):.0f} degrees from it",
                  f"dtypes       {_top(dtypes)}"]
    if voxels.sum():
        lines.append("label voxels " + ", ".join(f"{name} {n} ({100 * n / voxels.sum():.1f}%)"
                                                for name, n in zip(classes, voxels)))
    return lines, problems


def _top(counter, k=4):
    items = [f"{key} x{n}" for key, n in counter.most_common(k)]
    return ", ".join(items) + (f", ... ({len(counter)} distinct)" if len(counter) > k else "")


# --------------------------------------------------------------------------- 5. command line
def dataset_name(text):
    """An argparse type for --data: a synthetic dataset's name as given, else its folder made absolute
    (saved relative, `finetune.py` and `evaluate.py` run from another directory took it for another dataset)."""
    return text if text in SYNTHETIC else absolute(text)


def add_data_arguments(parser, cine=True, default="synthetic, generated on first use"):
    """The flags every script uses to name, read and preprocess a dataset (DATA_KEYS, with --image-size);
    --cine only where unlabeled frames are used (pretraining); `default` says what no --data means."""
    parser.add_argument("--data", type=dataset_name, default=None, help="dataset folder, or a synthetic dataset "
                        f"name: {', '.join(SYNTHETIC)} (default: {default})")
    parser.add_argument("--layout", default=READING["layout"], choices=("auto",) + LAYOUTS)
    parser.add_argument("--slice-axis", type=int, default=READING["slice_axis"], choices=(0, 1, 2),
                        help="array axis of the stacking direction (default: the file's third)")
    parser.add_argument("--spacing", type=positive(float), default=READING["spacing"],
                        help="resample in-plane to this many mm per pixel and crop the centre (default: "
                             "the whole field of view resized to S x S)")
    parser.add_argument("--intensity", default=READING["intensity"], choices=("clip-zscore", "zscore"),
                        help="clip to the [1, 99] percentiles before z-scoring each volume, or not")
    if cine:
        parser.add_argument("--cine", action="store_true", help="ACDC: pretrain on every frame of the 4D cine files")
    parser.add_argument("--cache", type=absolute, default=None,
                        help="cache folder (default: $PCL_CACHE, else the repository's cache/)")


def main(argv=None):
    from runs import Parser, RunError, check_writable, non_negative
    parser = Parser(description="Make the synthetic dataset or check a dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-synthetic", help="write a synthetic dataset (nnU-Net layout); the named "
                               "'synthetic' is --variability 1.8, the others data.SYNTHETIC")
    make.add_argument("out")
    make.add_argument("--patients", type=positive(int), default=40)
    make.add_argument("--style", default="mri", choices=("mri", "chd"))
    make.add_argument("--seed", type=non_negative(int), default=0)
    for knob in ("variability", "contrast", "noise", "anomalies"):  # the fields of cohort.Difficulty
        make.add_argument(f"--{knob}", type=non_negative(float), default=1.0, help="difficulty knob (cohort.py), default 1")
    inspect = commands.add_parser("check", help="summarize a dataset and list its problems")
    inspect.add_argument("data", type=absolute)  # as the scripts read it (a link resolved)
    inspect.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
    inspect.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2))
    inspect.add_argument("--intensity", default=READING["intensity"], choices=("clip-zscore", "zscore"))
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
        lines, problems = check(Path(args.data), args.layout, args.slice_axis, args.intensity)
    except (DataError, FileExistsError, RunError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(lines + [f"problem: {problem}" for problem in problems]))
    print(f"{len(problems)} problem(s): " + ("NOT usable" if problems else "usable"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
