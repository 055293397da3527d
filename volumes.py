"""volumes.py: reading one 3D medical volume the same way, whatever its orientation.

  1. read a case (layouts.py finds them) and put it in one canonical orientation decided by the
     affines, so that slice index grows the same way in every volume (along the dataset's one
     direction: toward the patient's head for axial and short-axis stacks) and in-plane axes agree
     across patients;
  2. preprocess: clip intensities to the volume's [1st, 99th] percentile (or not) and z-score; then
     either pad the in-plane field of view to a square and resample every slice to size x size, or
     resample to a fixed spacing in mm and crop or pad the centre to size x size (the authors').

Every problem with the user's files is a DataError whose one-line message names the file.
"""
import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """A problem with the user's data, stated in one line that names the file."""


# ------------------------------------------------------- 1. reading, in canonical orientation
FLAT = np.sin(np.radians(15))  # a slice axis whose z part is below this lies flat (within 15 degrees)
BODY_AXES = ("left-right", "back-front", "feet-head")  # world axes x, y, z of nibabel's RAS+
ASTRAY = 45  # degrees: a volume whose slice axis is further from the dataset's direction is reported
THIN = 2  # one in-plane axis this many times coarser than the slice spacing (the other not): is the slice axis right?


def canonical_order(affine, slice_axis=2, along=None):
    """How to reorder a volume's array axes so that every patient looks alike.

    Returns (axes, flips): transpose the array to `axes` (two in-plane axes, then the slice axis)
    and flip the axes marked True. After that, slice index grows along the unit world direction
    `along` (3,), the dataset's (dataset_direction), or, when it is None, the one this volume alone
    gives (toward the head; see body_axis). The in-plane axes run toward +x (patient's right) before
    +y (anterior) or +z, each assigned to the world axis it is most aligned with.
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)  # unit columns: (3, 3)
    a, b = [k for k in range(3) if k != slice_axis]
    pairs = [(wa, wb) for wa in range(3) for wb in range(3) if wa != wb]
    wa, wb = max(pairs, key=lambda w: abs(directions[w[0], a]) + abs(directions[w[1], b]))
    if wb < wa:
        a, b, wa, wb = b, a, wb, wa
    s = directions[:, slice_axis]  # (3,) the way the stored slice index grows
    along = dataset_direction([s]) if along is None else along
    return (a, b, slice_axis), (directions[wa, a] < 0, directions[wb, b] < 0, s @ along < 0)


def body_axis(direction):
    """The world axis a slice direction (3,) runs along: 2 (feet-head) unless it lies within 15 degrees
    of the horizontal (a sagittal or coronal stack, where the sign of its small z part is mere tilt),
    then the one of 0 (left-right) and 1 (back-front) it is most aligned with."""
    unit = direction / np.linalg.norm(direction)  # (3,)
    return 2 if abs(unit[2]) > FLAT else int(np.argmax(np.abs(unit[:2])))


def voxel_sizes(affine, path):
    """The mm per array axis (3,) of an affine (4, 4); DataError naming path when one is zero or not finite
    (a degenerate sform, which nibabel reads as it is stored)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)  # (3,)
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise DataError(f"{path}: its affine gives voxel sizes {sizes.round(3).tolist()} mm; every axis needs one "
                        f"above 0 (fix the header's sform or qform)")
    return sizes


def slice_direction(affine, slice_axis, path):
    """The unit world direction (3,) in which the stored slice index of the volume in path grows."""
    return np.asarray(affine, dtype=np.float64)[:3, slice_axis] / voxel_sizes(affine, path)[slice_axis]  # (3,)


def axis_doubt(spacing, affine, slice_axis, path):
    """A problem when one in-plane axis of a volume (spacing (3,): in-plane, in-plane, slice mm) is over THIN
    times coarser than its slices are apart, and the other is not (thin slices of square pixels are a fine
    CT): its slices are likely stacked along that coarse array axis. Else None."""
    if max(spacing[:2]) <= THIN * spacing[2] or min(spacing[:2]) > THIN * spacing[2]:
        return None
    coarsest = int(np.argmax(voxel_sizes(affine, path)))
    return (f"{path}: pixels of {spacing[0]:.2f} x {spacing[1]:.2f} mm but slices {spacing[2]:.2f} mm apart along "
            f"array axis {slice_axis}; if it is stacked along axis {coarsest}, pass --slice-axis {coarsest}")


def dataset_direction(directions):
    """The one direction (3,) along which every volume of a dataset is ordered: the principal axis of
    the volumes' slice directions (V, 3), whose signs do not count, pointed toward the head, or, when it
    lies within 15 degrees of the horizontal, toward +x or +y (body_axis).

    Deciding each volume alone would flip somewhere: two short-axis stacks tilted 10 and 25 degrees
    below the horizontal lie on either side of any such boundary and would run opposite ways (apex
    first, base first). Ordered along one direction, slice index grows the same way in every volume
    whose slices are within 90 degrees of it; `python data.py check` reports the ones beyond ASTRAY."""
    d = np.asarray(directions, dtype=np.float64)  # (V, 3) unit vectors
    _, vectors = np.linalg.eigh(d.T @ d)  # (3, 3): eigenvectors by ascending eigenvalue
    r = vectors[:, -1]  # (3,) the axis the directions cluster around, either sign
    return r if r[body_axis(r)] > 0 else -r


def misalignment(direction, along):
    """Degrees between a volume's slice axis and the dataset's direction, either way: 0 to 90."""
    return float(np.degrees(np.arccos(np.clip(abs(direction @ along), 0, 1))))


def reorient(array, axes, flips):
    """Apply canonical_order's result to an array (X, Y, Z) -> (X', Y', N)."""
    array = np.transpose(array, axes)
    return np.flip(array, axis=[k for k in range(3) if flips[k]])


def read_case(case, lookup, slice_axis=2, along=None):
    """Read one case in canonical orientation (its slices ordered along `along`, the dataset's direction,
    or its own when None): image float32 (X, Y, N), label uint8 or None, spacing (sx, sy, sz) in mm.
    Raises DataError naming the file for anything wrong."""
    if slice_axis not in (0, 1, 2):
        raise DataError(f"slice axis must be 0, 1 or 2, got {slice_axis}")
    img, image = _read_nifti(case.image, case.frame)
    spacing = voxel_sizes(img.affine, case.image)  # (3,) mm per array axis
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise DataError(f"{case.image}: contains NaN or Inf voxels")
    axes, flips = canonical_order(img.affine, slice_axis, along)
    label = None
    if case.label is not None:
        lab_img, label = _read_nifti(case.label)
        if label.shape != image.shape:
            raise DataError(f"{case.label}: shape {label.shape} differs from its image's {image.shape}")
        voxel_sizes(lab_img.affine, case.label)  # a degenerate affine of the label alone: one line, naming it
        if not np.allclose(lab_img.affine, img.affine, atol=0.05 * spacing.min()):
            codes = ["".join(nib.aff2axcodes(affine)) for affine in (lab_img.affine, img.affine)]  # e.g. LPS, RAS
            corners = np.stack(np.meshgrid(*[[0, n - 1] for n in image.shape], indexing="ij"), -1).reshape(-1, 3)
            moved = (lab_img.affine - img.affine)[:3] @ np.c_[corners, np.ones(8)].T  # (3, 8): mm, label - image
            how = f"stored {codes[0]}, the image {codes[1]}" if codes[0] != codes[1] else \
                f"its corners lie up to {np.linalg.norm(moved, axis=0).max():.3g} mm from the image's"
            raise DataError(f"{case.label}: affine differs from its image's ({case.image.name}): {how}")
        if not np.issubdtype(label.dtype, np.integer):
            if not np.isfinite(label).all() or (label != np.round(label)).any():
                raise DataError(f"{case.label}: label map has non-integer values")
            label = label.astype(np.int64)
        values = np.unique(label)
        classes = [lookup(int(v)) for v in values]
        if None in classes:
            bad = [int(v) for v, c in zip(values, classes) if c is None]
            raise DataError(f"{case.label}: label values {bad[:5]} are not among the dataset's classes")
        label = np.array(classes, np.uint8)[np.searchsorted(values, label)]  # values -> class indices
        label = reorient(label, axes, flips)
    return reorient(image, axes, flips), label, spacing[list(axes)]


def read_header(path, frame=None):
    """The 3D shape of a NIfTI file (of one frame of a 4D one) and its affine (4, 4), from its header alone."""
    header = _header(path)
    shape = header.shape
    if len(shape) == 4 and (shape[3] == 1 or frame is not None):
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    return shape, header.affine


def header_shape(path):
    """The shape a NIfTI file's header states, whatever its number of dimensions."""
    return _header(path).shape


def _header(path):
    try:
        return nib.load(str(path))  # reads the header; the voxels stay on disk until asked for
    except Exception as e:  # missing, empty, not a NIfTI file: nibabel raises many kinds
        raise DataError(f"{path}: cannot read NIfTI header ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=1)  # the frames of a 4D file are read one after the other: decompress it once
def _load(path, stamp):
    try:
        img = nib.load(path)
        return img, np.asanyarray(img.dataobj)  # keeps the stored dtype (integers stay integers)
    except Exception as e:  # truncated gzip, bad header, ...: nibabel raises many kinds
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None


def _read_nifti(path, frame=None):
    stat = Path(path).stat() if Path(path).exists() else None
    img, data = _load(str(path), stat and (stat.st_mtime_ns, stat.st_size))
    if data.ndim == 4 and (data.shape[3] == 1 or frame is not None):
        data = data[..., frame or 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if data.dtype.kind not in "biuf":  # bool, integers, floats
        raise DataError(f"{path}: voxels of type {data.dtype} (RGB or complex?); expected one real number each")
    return img, data


# ------------------------------------------------------------------------- 2. preprocessing
def preprocess(image, label, spacing, size, target_spacing=None, intensity="clip-zscore"):
    """(X, Y, N) volume -> float16 images (N, S, S) and uint8 labels (N, S, S) or None.

    Intensities: clipped to the volume's [1st, 99th] percentiles then z-scored ("clip-zscore"), or
    z-scored as they are ("zscore"). In-plane, with target_spacing None: the field of view is padded
    to a square (in mm) and resampled to S x S; with target_spacing in mm: resampled to that
    spacing, then the centre is cropped or padded to S x S. Images: bilinear with antialiasing.
    Labels: each class's mask is resampled the same way and a pixel takes the class with the
    largest share, so labels keep their image's pixel centres (torch's "nearest"
    would shift them by up to half a pixel). Padding is the volume's lowest intensity and background."""
    stored = image
    if intensity == "clip-zscore":
        sample = image.ravel()[:: max(1, image.size // 2_000_000)]  # percentiles of <= 2M voxels
        image = np.clip(image, *np.percentile(sample, [1, 99]))
    mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    if std < 1e-6:  # over 99% of the voxels at the lowest value (background) is constant once clipped
        sparse = intensity == "clip-zscore" and stored.std(dtype=np.float64) >= 1e-6
        raise DataError("image is constant" + (" between its 1st and 99th percentiles (nearly every voxel is one "
                                               "value); --intensity zscore reads it without clipping" if sparse else ""))
    image = (image - mean) / std
    low = float(image.min())
    if target_spacing is None:
        extent = max(image.shape[0] * spacing[0], image.shape[1] * spacing[1])  # square field of view, mm
        shape = [round(extent / spacing[axis]) for axis in (0, 1)]
        resized = (size, size)
    else:
        shape = image.shape[:2]
        resized = [max(1, round(image.shape[axis] * spacing[axis] / target_spacing)) for axis in (0, 1)]
        if min(resized) < 16:  # a typo such as 125 for 1.25 would otherwise train on a few pixels
            raise DataError(f"--spacing {target_spacing} mm leaves {resized[0]} x {resized[1]} px of its field of "
                            f"view, fewer than the 16 the U-Net needs")
        if max(resized) > 2048:  # and one such as 0.00125 (metres) would fill the memory
            raise DataError(f"--spacing {target_spacing} mm makes {resized[0]} x {resized[1]} px of its field of "
                            f"view, more than the 2048 read here (the spacing is in mm)")
    pads = [((max(0, n - m) // 2), max(0, n - m) - max(0, n - m) // 2) for n, m in zip(shape, image.shape)]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[:, None], dtype=np.float32))  # (N, 1, X, Y)
    x = F.pad(x, [*pads[1], *pads[0]], value=low)  # (N, 1, X', Y') square field of view
    x = F.interpolate(x, size=tuple(resized), mode="bilinear", antialias=True, align_corners=False)
    images = _fit(x[:, 0], size, low).numpy().astype(np.float16)  # (N, S, S)
    if label is None:
        return images, None
    y = torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1)))  # (N, X, Y) uint8
    y = F.pad(y, [*pads[1], *pads[0]])  # (N, X', Y'), padded with background
    labels, K = torch.empty((len(y), *resized), dtype=torch.uint8), int(label.max()) + 1
    for s in range(0, len(y), 16):  # 16 slices at a time: K planes of 512 x 512 px stay small
        one_hot = F.one_hot(y[s:s + 16].long(), K).permute(0, 3, 1, 2).float()  # (16, K, X', Y')
        shares = F.interpolate(one_hot, size=tuple(resized), mode="bilinear", antialias=True, align_corners=False)
        labels[s:s + 16] = shares.argmax(dim=1)  # (16, X", Y"): the class with the largest share of each pixel
    return images, _fit(labels, size, 0).numpy()


def _fit(x, size, value):
    """Crop or pad the centre of (N, H, W) to (N, size, size); an odd pixel goes after, as in the square padding."""
    for axis in (1, 2):
        excess = x.shape[axis] - size
        if excess > 0:
            x = x.narrow(axis, excess // 2, size)
        elif excess < 0:
            pad = [0, 0, 0, 0]
            pad[2 * (2 - axis):2 * (2 - axis) + 2] = [-excess // 2, -excess - (-excess // 2)]
            x = F.pad(x, pad, value=value)
    return x
