"""Synthetic cardiac datasets: stand-ins for ACDC-like cine MRI ("mri") and CHD-like cardiac CT ("chd").

A patient is drawn by cohort.py (what differs between patients, and by how much: see its tables), painted
in 3D by anatomy.py (one anatomy for every style), then imaged here. The style chooses the imaging plane
(in anatomy.paint), the label set and the intensity model:

    mri  cine bSSFP short-axis stack along the canonical LV axis, apex to base (the patient's heart is tilted
         away from it), 10-20 thick slices; ACDC labels RV 1, MYO 2, LV 3 (papillary muscles in LV); bright
         blood and fat, grey muscle, dark lungs, smooth multiplicative bias field, Rician noise
    chd  axial contrast CT in HU, 20-36 slices from below the apex to above the aortic arch; CHD labels LV 1,
         RV 2, LA 3, RA 4, MYO 5 (the LV myocardium), AO 6 (the whole aorta), PA 7 (trunk and branches); venae
         cavae, pulmonary veins and the RV wall are background; left and right heart blood enhance differently
         (bolus timing); Gaussian noise

make_patient() returns one volume in the orientation of its scan (anatomy.paint). chd: axes toward the patient's
Right, Anterior and head. mri: axis 2 runs along the canonical LV long axis from apex to base (toward the right,
back and head, 50 deg off the head axis), axes 0 and 1 toward Right and Anterior (and up) as near as the short-axis
plane allows. In-plane, both styles are turned by the patient's rotation. The saved affines call the three axes
R, A, S, so an mri stack reads as an axial one with its apex at the feet.

write_synthetic() saves a dataset in the nnU-Net layout, each volume with randomly flipped storage axes,
atomically: concurrent writers of one dataset are safe. `python synthetic.py --figure docs/synthetic.png` draws
the README figure.
"""
import json
import os
import pathlib
import secrets
import shutil
import time

import nibabel as nib
import numpy as np

from anatomy import ID, STRUCTURES, paint
from cohort import STYLES, TISSUES, Difficulty, draw_patient

VERSION = 2  # of the generator, recorded in dataset.json: named datasets of another version are rewritten
LABELS = {"mri": {"background": 0, "RV": 1, "MYO": 2, "LV": 3},
          "chd": {"background": 0, "LV": 1, "RV": 2, "LA": 3, "RA": 4, "MYO": 5, "AO": 6, "PA": 7}}
RIGHT_HEART = ("rv", "ra", "pa", "vein")  # blood that the contrast bolus reaches first (chd)
TISSUE = {"mri": [0.0, 0.80, 0.22, 0.05, 0.33, 0.06, 0.50, 0.75, 0.27, 0.90],  # bSSFP-like, order of TISSUES
          "chd": [-1000, -100, 50, -850, 70, 700, 250, 10, 110, 320]}  # Hounsfield units


def _smooth(a, axis):
    """[1, 2, 1] / 4 filter along one axis, edges replicated: a cheap Gaussian-like blur."""
    p = np.moveaxis(a, axis, 0)
    p = np.concatenate([p[:1], p, p[-1:]])
    return np.moveaxis(0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:], 0, axis)


def _texture(rng, shape, cell=4):
    """Smooth random field with unit std: coarse white noise, upsampled, blurred in-plane."""
    coarse = rng.standard_normal((-(-shape[0] // cell), -(-shape[1] // cell), shape[2]), np.float32)
    field = coarse.repeat(cell, 0).repeat(cell, 1)[: shape[0], : shape[1]]  # (X, Y, N)
    for _ in range(3):
        field = _smooth(_smooth(field, 0), 1)
    return field / field.std()


def render(cls: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Image float32 of a structure map: per-patient tissue intensities, texture and lung vessels,
    partial-volume blur; mri: bias field and Rician noise, chd: bolus timing and Gaussian noise."""
    mri, tissue = p["style"] == "mri", np.array(TISSUE[p["style"]], np.float32)
    tissue = tissue * p["tissue"] if mri else tissue + p["tissue"]
    if not mri:
        tissue[TISSUES.index("blood")], tissue[TISSUES.index("myocardium")] = p["blood"], p["myo"]
    value = np.array([tissue[TISSUES.index(t)] for _, t in STRUCTURES.values()], np.float32)
    if not mri:
        value[[ID[name] for name in RIGHT_HEART]] *= p["bolus"]
    blood, lung = tissue[TISSUES.index("blood")], cls == ID["lung"]
    tex = _texture(rng, cls.shape)
    img = value[cls] * (1 + 0.04 * tex * (cls != ID["air"]))
    img[lung & (tex > 1.6)] += 0.4 * (blood - tissue[TISSUES.index("lung")])  # vessels in the lungs
    img = _smooth(_smooth(img, 0), 1)
    sigma = p["noise"] * p["noise_gain"]
    if not mri:
        return (img + sigma * rng.standard_normal(img.shape, np.float32)).astype(np.float32)
    xn, yn, zn = (np.linspace(-0.7, 0.7, m, dtype=np.float32) for m in cls.shape)
    xn, yn, zn = xn[:, None, None], yn[None, :, None], zn[None, None, :]  # (X, 1, 1), (1, Y, 1), (1, 1, N)
    k = rng.normal(0, 1, 6) * p["bias"]
    img = img * np.exp(k[0] * xn + k[1] * yn + k[2] * zn + k[3] * xn * yn + k[4] * xn ** 2 + k[5] * yn ** 2)
    noisy = np.hypot(img + sigma * rng.standard_normal(img.shape, np.float32),
                     sigma * rng.standard_normal(img.shape, np.float32))  # Rician
    return (noisy * rng.uniform(150, 1500)).astype(np.float32)  # arbitrary scanner units


def make_patient(rng: np.random.Generator, style: str, difficulty: Difficulty = Difficulty()):
    """One phantom: image float32 (X, Y, N), label uint8 (X, Y, N), spacing (sx, sy, sz) in mm, axes as paint()'s."""
    p = draw_patient(rng, style, difficulty)
    cls, spacing = paint(p)
    return render(cls, p, rng), label_lut(style)[cls], spacing


def label_lut(style):
    """Label of each structure id in the style's label set (uint8 lookup table)."""
    return np.array([LABELS[style].get(name, 0) for name, _ in STRUCTURES.values()], np.uint8)


def flip_axes(arrays, affine, axes):
    """Flip the arrays along each axis in axes and return the affine that keeps every voxel's world position:
    index j becomes n - 1 - j, so column a is negated and the origin moves by (n - 1) times the old column."""
    affine = np.array(affine, dtype=float)
    for axis in axes:
        arrays = [np.flip(a, axis) for a in arrays]
        affine[:3, 3] += affine[:3, axis] * (arrays[0].shape[axis] - 1)
        affine[:3, axis] *= -1
    return arrays, affine


def _save(array, affine, path):
    """Save one NIfTI with qform = sform = affine, in mm."""
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _record(patients, style, seed, difficulty):
    """What identifies a written dataset: dataset.json keeps it under "synthetic"."""
    return {"version": VERSION, "style": style, "patients": int(patients), "seed": seed, **vars(difficulty)}


def _read_meta(out):
    try:
        return json.loads((pathlib.Path(out) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None


def is_current(out_dir, patients=40, style="mri", seed=0, difficulty=Difficulty()) -> bool:
    """Whether out_dir holds the complete dataset that write_synthetic would write with these arguments."""
    meta = _read_meta(out_dir)
    return isinstance(meta, dict) and meta.get("synthetic") == _record(patients, style, seed, difficulty)


def _replaceable(out):
    """Missing, empty, or an earlier synthetic dataset (complete, or left by an interrupted older writer)."""
    if not out.is_dir():
        return not out.exists()
    meta = _read_meta(out)
    if meta is not None:
        return isinstance(meta, dict) and str(meta.get("description", "")).startswith("synthetic cardiac phantoms")
    files = [f for f in out.rglob("*") if not f.is_dir()]
    return {f.parent.name for f in files} <= {"imagesTr", "labelsTr"} and all("syn_" in f.name for f in files)


def _clean_stale(out):
    """Remove the temporary folders of writers of `out` that died (their process is gone, or a day passed)."""
    for folder in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            pid, age = int(folder.name.split(".tmp-")[-1].split("-")[0]), time.time() - folder.stat().st_mtime
            os.kill(pid, 0)  # raises ProcessLookupError when the writer is gone
            stale = age > 86400
        except ProcessLookupError:
            stale = True
        except (ValueError, OSError):  # not a writer's folder, gone meanwhile, or another user's live process
            stale = False
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def write_synthetic(out_dir, patients: int = 40, style: str = "mri", seed: int = 0,
                    difficulty: Difficulty = Difficulty()) -> pathlib.Path:
    """Write an nnU-Net dataset: imagesTr/syn_XXX_0000.nii.gz, labelsTr/syn_XXX.nii.gz, dataset.json.

    Patient i is drawn from the i-th child of np.random.default_rng(seed), so it does not depend on the number
    of patients. Each volume is stored with randomly flipped axes and the matching affine. Everything is written
    into a private folder OUT.tmp-PID-XXXXXX next to OUT, renamed to OUT at the end (under a lock on the parent
    folder): a killed writer never leaves a folder that looks complete, and when several processes write the
    same dataset at once the first one wins and the others discard their copy. OUT may be missing, empty or an
    earlier synthetic dataset (replaced); anything else raises FileExistsError. Returns OUT."""
    import fcntl  # POSIX file locks
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if isinstance(patients, bool) or int(patients) != patients or patients < 1:
        raise ValueError(f"patients must be an integer >= 1, got {patients!r}")
    out, current = pathlib.Path(out_dir), lambda: is_current(out_dir, patients, style, seed, difficulty)
    _clean_stale(out)  # first: a writer killed after its swap leaves OUT current and its old copy beside it
    if current():
        return out
    if not _replaceable(out):
        raise FileExistsError(f"{out} exists and is not a synthetic dataset: give a new or an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        for sub in ("imagesTr", "labelsTr"):
            (tmp / sub).mkdir(parents=True)
        width = max(3, len(str(patients - 1)))
        for i, prng in enumerate(np.random.default_rng(seed).spawn(int(patients))):
            image, label, spacing = make_patient(prng, style, difficulty)
            affine = np.diag([*spacing, 1.0])
            affine[:3, 3] = prng.uniform(-150, 150, 3)  # world position of voxel (0, 0, 0): table offset
            (image, label), affine = flip_axes((image, label), affine, np.flatnonzero(prng.random(3) < 0.5))
            _save(image, affine, tmp / "imagesTr" / f"syn_{i:0{width}d}_0000.nii.gz")
            _save(label, affine, tmp / "labelsTr" / f"syn_{i:0{width}d}.nii.gz")
        knobs = ", ".join(f"{k}={v}" for k, v in vars(difficulty).items())
        meta = {"name": f"synthetic-{style}",
                "description": f"synthetic cardiac phantoms (synthetic.py version {VERSION}), style={style}, "
                               f"seed={seed}, {knobs}",
                "channel_names": {"0": "MRI" if style == "mri" else "CT"}, "labels": dict(LABELS[style]),
                "numTraining": int(patients), "file_ending": ".nii.gz",
                "synthetic": _record(patients, style, seed, difficulty)}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        lock = os.open(out.parent, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time swaps its copy in
            if not current():  # else another writer finished first: ours is discarded below
                old = tmp.with_name(tmp.name + "-old")
                if out.exists():
                    os.replace(out, old)  # an earlier dataset moves aside (a rename cannot replace a full folder)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(lock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _display(plane):
    """Radiological view of an (X, Y) slice: anterior at the top, the patient's right on the left
    (evaluate.py's figures and the notebooks show the mirror image: the patient's right on the right)."""
    return plane[::-1, ::-1].T


COLOURS = {"LV": (1, 0.25, 0.2), "RV": (0.2, 0.5, 1), "LA": (1, 0.6, 0), "RA": (0.7, 0.3, 1),
           "MYO": (0.2, 0.9, 0.2), "AO": (1, 1, 0.1), "PA": (1, 0.2, 0.9)}


def main(argv=None):
    from runs import Parser, check_writable, non_negative, positive
    parser = Parser(description="Draw the synthetic-phantom figure.")
    parser.add_argument("--figure", default="docs/synthetic.png", help="output PNG")
    parser.add_argument("--patients", type=positive(int), default=2, help="patients per style")
    parser.add_argument("--seed", type=non_negative(int), default=0)
    args = parser.parse_args(argv)
    check_writable(args.figure, "--figure", folder=False)  # before the drawing
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = [(style, draw_patient(rng, style), rng) for style in STYLES
            for rng in np.random.default_rng(args.seed).spawn(args.patients)]
    positions = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
    fig, axes = plt.subplots(len(rows), len(positions), figsize=(1.75 * len(positions), 1.9 * len(rows)),
                             squeeze=False)
    for row, (style, p, rng) in enumerate(rows):
        cls, spacing = paint(p)
        image, label = render(cls, p, rng), label_lut(style)[cls]
        colours = ListedColormap([(0, 0, 0, 0)] + [(*COLOURS[name], 0.45) for name in list(LABELS[style])[1:]])
        n, low, high = image.shape[2], *((-300, 500) if style == "chd" else np.percentile(image, (0.5, 99.5)))
        for col, position in enumerate(positions):
            k = int(np.clip(round(position * n) - 1, 0, n - 1))  # slice whose position (k + 1) / N is nearest
            ax = axes[row, col]
            ax.imshow(_display(image[:, :, k]), cmap="gray", vmin=low, vmax=high)
            ax.imshow(_display(label[:, :, k]), cmap=colours, vmin=0, vmax=len(LABELS[style]) - 1,
                      interpolation="nearest")
            ax.set_title(f"p = {(k + 1) / n:.2f}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        ax = axes[row, 0]
        ax.set_ylabel(f"{style.upper()}, N = {n}\n{spacing[0]:.1f} x {spacing[2]:.1f} mm\n"
                      + "\n".join(a.replace("_", " ") for a in p["anomalies"]), fontsize=7)
    fig.legend([Patch(color=c) for c in COLOURS.values()], list(COLOURS), loc="lower center", ncol=7,
               fontsize=8, frameon=False)
    fig.suptitle("Synthetic phantoms, feet (mri: apex) to head: p = (i + 1) / N is the slice position PCL uses",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    path = pathlib.Path(args.figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=76)
    print(f"wrote {path}")


if __name__ == "__main__":
    from runs import cli
    cli(main)
