"""data.py, cache.py, layouts.py and volumes.py: orientation, layouts, cache, dataset, splits and bad input."""
import gzip
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import cache
import data
from data import check
from layouts import Case, detect_layout, label_lookup
from volumes import DataError, _fit, preprocess, read_case, slice_direction

REPO = Path(__file__).resolve().parents[1]


def volume(shape=(20, 16, 7), seed=0):
    """An image whose every slice and every row is different, and a label map of 3 classes."""
    rng = np.random.default_rng(seed)
    image = (rng.normal(size=shape) + np.arange(shape[2])[None, None, :] * 3).astype(np.float32)
    label = (rng.random(shape) * 3).astype(np.uint8)
    return image, label


def save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.2, 8.0, 1.0]) if affine is None else affine), str(path))
    return path


def flipped(array, affine, axis):
    """The same volume stored with one axis reversed, with the affine that keeps world positions."""
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1, array.shape[axis] - 1
    return np.flip(array, axis).copy(), affine @ flip


def swapped(array, affine):
    """The same volume stored with its two in-plane axes swapped."""
    perm = np.eye(4)[:, [1, 0, 2, 3]]
    return np.swapaxes(array, 0, 1).copy(), affine @ perm


def nnunet(root, volumes, labels=None, classes=("background", "a", "b"), names=None):
    for i, (image, affine) in enumerate(volumes):
        name = names[i] if names else f"case{i}"
        save(root / "imagesTr" / f"{name}_0000.nii.gz", image, affine)
        if labels is not None and labels[i] is not None:
            save(root / "labelsTr" / f"{name}.nii.gz", labels[i], affine)
    meta = {"labels": {c: k for k, c in enumerate(classes)}, "channel_names": {"0": "MRI"},
            "file_ending": ".nii.gz", "numTraining": len(volumes)}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ------------------------------------------------------------------------ orientation
@pytest.mark.parametrize("change", ["slice axis flipped", "in-plane flipped", "both in-plane flipped",
                                    "in-plane swapped", "oblique"])
def test_storage_order_does_not_change_the_slices(tmp_path, change):
    image, label = volume()
    affine = np.diag([1.5, 1.2, 8.0, 1.0])
    if change == "oblique":  # a short-axis-like stack: tilted 30 degrees, still pointing headward
        c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
        affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ affine[:3, :3]
    ref = read_case(Case("a", "a", save(tmp_path / "a.nii.gz", image, affine),
                         save(tmp_path / "a_gt.nii.gz", label, affine)), label_lookup("nnunet", 3))
    img2, lab2, aff2 = image, label, affine
    if change == "slice axis flipped":
        (img2, aff2), (lab2, _) = flipped(image, affine, 2), flipped(label, affine, 2)
    if change.startswith("in-plane flipped") or change.startswith("both"):
        (img2, aff2), (lab2, _) = flipped(image, affine, 0), flipped(label, affine, 0)
    if change.startswith("both"):
        (img2, aff2), (lab2, _) = flipped(img2, aff2, 1), flipped(lab2, aff2, 1)
    if change == "in-plane swapped":
        (img2, aff2), (lab2, _) = swapped(image, affine), swapped(label, affine)
    if change == "oblique":  # oblique storage with the slice axis reversed
        (img2, aff2), (lab2, _) = flipped(image, affine, 2), flipped(label, affine, 2)
    assert change == "oblique" or not np.array_equal(img2, image) or change == "in-plane swapped"
    out = read_case(Case("b", "b", save(tmp_path / "b.nii.gz", img2, aff2),
                         save(tmp_path / "b_gt.nii.gz", lab2, aff2)), label_lookup("nnunet", 3))
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])
    np.testing.assert_allclose(out[2], ref[2])


def test_slices_run_toward_the_head(tmp_path):
    """An affine whose slice axis points to the feet is read back in reverse."""
    image, _ = volume()
    down = np.diag([1.5, 1.2, -8.0, 1.0])
    got, _, _ = read_case(Case("a", "a", save(tmp_path / "a.nii.gz", image, down), None),
                          label_lookup("nnunet", 3))
    np.testing.assert_array_equal(got, image[:, :, ::-1])


@pytest.mark.parametrize("tilt", [5, -5, 0, 14, -14, 16, -16, 25])
def test_a_sagittal_stack_is_ordered_by_its_main_direction_whatever_its_small_tilt(tmp_path, tilt):
    """Slices stacked along x (patient's right), tilted a few degrees up or down: read in stored order
    when they point to +x, reversed when to -x. (The sign of the tilt used to decide: a patient tilted
    5 degrees down had its slices reversed against one tilted 5 degrees up.) Past 15 degrees of tilt the
    stack counts as running feet-head, and is read toward the head."""
    image, _ = volume()
    c, s = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
    tilted = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # turns x toward -z by the tilt
    for sign in (1, -1):
        headward = -sign * tilt > 0  # the slice axis, sign * (c, 0, -s), points up
        expected = image if (sign > 0 if abs(tilt) < 15 else headward) else image[:, :, ::-1]
        affine = np.eye(4)
        affine[:3, :3] = tilted @ np.array([[0, 0, 8.0 * sign], [1.2, 0, 0], [0, 1.5, 0]])  # axes 0, 1, 2: y, z, x
        got, _, _ = read_case(Case("a", "a", save(tmp_path / f"{sign}.nii.gz", image, affine), None),
                              label_lookup("nnunet", 3))
        np.testing.assert_array_equal(got, expected)


def short_axis(tilt, toward_apex=True):
    """The affine of a short-axis stack: its slice axis along a heart's long axis, base to apex (left,
    front and down), `tilt` degrees below the horizontal, its horizontal part 30 degrees from the front
    toward the left; stored apex last (toward_apex) or first."""
    t, f = np.radians(tilt), np.radians(30)
    u = np.array([-np.sin(f) * np.cos(t), np.cos(f) * np.cos(t), -np.sin(t)])  # (3,) base -> apex
    a = np.cross(u, [0.0, 0.0, 1.0])
    a /= np.linalg.norm(a)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([1.5 * a, 1.2 * np.cross(u, a), 8.0 * u * (1 if toward_apex else -1)], axis=1)
    return affine


def test_short_axis_stacks_either_side_of_15_degrees_run_one_way(tmp_path, monkeypatch):
    """Stacks tilted 10 and 25 degrees below the horizontal, each stored apex last and apex first, are
    all read apex first: ordered along the dataset's one direction (toward the head, the base). Decided
    each alone, the 10-degree ones lay flat and ran toward the front, apex last: their positions were
    reversed against the others'."""
    image, _ = volume()  # slice means grow with the stored index: from base to apex, stored apex last
    stacks = [(image if apex_last else image[:, :, ::-1].copy(), short_axis(tilt, apex_last))
              for tilt in (10, 25) for apex_last in (True, False)]
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    cache = data.open_dataset(nnunet(tmp_path / "d", stacks), image_size=16)
    images = cache.array("images")
    for v in cache.volumes:
        means = images[v.start:v.start + v.slices].astype(np.float64).mean(axis=(1, 2))  # (N,)
        assert (np.diff(means) < 0).all(), f"{v.id}: apex last"
    assert cache.meta["direction"][2] > np.sin(np.radians(15)) and cache.meta["astray"] == []


def test_slice_direction_is_a_unit_vector_whatever_the_slice_thickness():
    """5 mm slices tilted 60 degrees from +z toward +y run along (0, sin 60, cos 60): check's angles are arccos of
    dot products, which a 5 mm long direction clipped to 0 degrees."""
    t = np.radians(60)
    affine = np.diag([1.5, 1.2, 5.0, 1.0])
    affine[:3, 2] = [0.0, 5.0 * np.sin(t), 5.0 * np.cos(t)]
    np.testing.assert_allclose(slice_direction(affine, 2, "a.nii.gz"), [0.0, 0.8660254, 0.5], atol=1e-7)


@pytest.mark.parametrize("column", [2, 0], ids=["slice axis", "in-plane axis"])
def test_an_affine_with_a_zero_axis_is_a_one_line_error_naming_the_file(tmp_path, column):
    """A degenerate sform (a zero column) stopped in an assert (a LinAlgError under python -O) or an OverflowError
    of the resizing: check lists it as the file's problem, and a run stops with it."""
    image, _ = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2)
    affine = np.diag([1.5, 1.2, 8.0, 1.0])
    affine[:3, column] = 0.0
    degenerate = nib.Nifti1Image(image, np.diag([1.5, 1.2, 8.0, 1.0]))  # a valid qform, as nibabel needs one
    degenerate.set_sform(affine, code=1)  # and the sform, which nibabel reads first, singular
    nib.save(degenerate, str(root / "imagesTr" / "case1_0000.nii.gz"))
    expected = rf"{tmp_path}/d/imagesTr/case1_0000\.nii\.gz: its affine gives voxel sizes \[.*\] mm; every axis"
    assert len(check(root)[1]) == 1 and re.match(expected, check(root)[1][0])
    with pytest.raises(DataError, match=expected):
        data.open_dataset(root, image_size=16)
    label = nib.Nifti1Image(volume((12, 12, 4))[1], np.diag([1.5, 1.2, 8.0, 1.0]))  # the label's alone (a TypeError)
    label.set_sform(affine, code=1)
    (root / "labelsTr").mkdir()
    nib.save(label, str(root / "labelsTr" / "case0.nii.gz"))
    assert [p for p in check(root)[1] if "case0" in p][0].startswith(f"{root}/labelsTr/case0.nii.gz: its affine gives")


def test_an_rgb_image_is_a_one_line_error_naming_the_file(tmp_path):
    """NIfTI can store RGB voxels (a record of three bytes): refused by name, not a numpy TypeError of the cast."""
    image, _ = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2)
    rgb = np.zeros((12, 12, 4), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    save(root / "imagesTr" / "case1_0000.nii.gz", rgb)
    expected = rf"{tmp_path}/d/imagesTr/case1_0000\.nii\.gz: voxels of type .*; expected one real number each$"
    assert len(check(root)[1]) == 1 and re.match(expected, check(root)[1][0])
    with pytest.raises(DataError, match=expected):
        data.open_dataset(root, image_size=16)


def test_a_4d_file_reads_the_asked_frame(tmp_path):
    """Each cine frame is a pretraining volume of its own: frame k of a file whose frame k holds k reads k."""
    path = save(tmp_path / "cine.nii.gz", np.stack([np.full((6, 6, 3), k, np.float32) for k in range(5)], axis=3))
    read = [read_case(Case("c", "c", path, None, k), label_lookup("nnunet", 3))[0] for k in range(5)]
    assert [np.unique(r).tolist() for r in read] == [[0.0], [1.0], [2.0], [3.0], [4.0]]


def test_a_file_replaced_in_place_is_read_anew(tmp_path):
    """Reads are cached by path, size and modification time: a file rewritten within one process (a notebook,
    check after a fix) must not come back stale. Here both the size and, set by hand, the time change."""
    path = save(tmp_path / "a.nii.gz", np.zeros((8, 8, 3), np.float32))
    assert read_case(Case("a", "a", path, None), label_lookup("nnunet", 3))[0].shape == (8, 8, 3)
    stamp = path.stat().st_mtime_ns
    save(path, np.full((8, 8, 4), 7.0, np.float32))
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    image = read_case(Case("a", "a", path, None), label_lookup("nnunet", 3))[0]
    assert image.shape == (8, 8, 4) and (image == 7).all()


def test_slice_axis_flag_takes_another_axis(tmp_path):
    image, _ = volume((12, 9, 20))
    path = save(tmp_path / "a.nii.gz", image)
    got, _, spacing = read_case(Case("a", "a", path, None), label_lookup("nnunet", 3), slice_axis=0)
    assert got.shape[2] == 12 and spacing[2] == pytest.approx(1.5)


# ---------------------------------------------------------------------- dataset, positions
def test_positions_follow_the_paper_and_slices_come_in_order(tmp_path):
    vols = [volume((20, 16, n), seed=n) for n in (5, 8)]
    root = nnunet(tmp_path / "d", [(v[0], np.diag([1.5, 1.2, 8.0, 1.0])) for v in vols], [v[1] for v in vols])
    cache = data.open_dataset(root, image_size=16)
    ds = data.SliceDataset(cache, labeled=True)
    assert len(ds) == 13
    expected = [(i + 1) / 5 for i in range(5)] + [(i + 1) / 8 for i in range(8)]
    assert [ds[k]["position"].item() for k in range(13)] == expected  # float64, as losses.pcl_mask needs
    assert [ds[k]["patient"] for k in range(13)] == ["case0"] * 5 + ["case1"] * 8
    # each slice of the first volume is the one at the same index: slice means grow with index
    means = [ds[k]["image"].mean().item() for k in range(5)]
    assert means == sorted(means)
    batch = ds[[7, 2, 9]]
    assert batch["image"].shape == (3, 1, 16, 16) and batch["label"].shape == (3, 16, 16)
    assert batch["image"].dtype == torch.float16 and batch["label"].dtype == torch.uint8  # the cache's own, 3 bytes a pixel
    assert torch.equal(batch["image"][:, 0], torch.from_numpy(cache.array("images")[ds.rows[[7, 2, 9]]]))  # served as cached
    for j, k in enumerate([7, 2, 9]):  # a batch read equals single reads, in the asked order
        assert (batch["image"][j] == ds[k]["image"]).all() and (batch["label"][j] == ds[k]["label"]).all()
    assert set(np.unique(batch["label"])) <= {0, 1, 2}


def test_a_cache_with_no_room_on_its_disk_is_one_line(tmp_path, monkeypatch):
    """The cache's arrays are allocated before they are written: writing a memory map past a full disk killed
    the process with SIGBUS and printed nothing (measured on a 200 KiB tmpfs)."""
    vols = [volume(seed=k) for k in range(2)]
    root = nnunet(tmp_path / "d", [(v[0], None) for v in vols], [v[1] for v in vols])
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    asked = []

    def full(fd, offset, length):
        asked.append(length)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache.os, "posix_fallocate", full)
    with pytest.raises(DataError, match=r"cache: no room for a cache of 0 MB \(No space left on device\); free some, "
                                        r"or pass --cache DIR"):
        data.open_dataset(root, image_size=16)
    assert asked and asked[0] >= 14 * 16 * 16 * 2 and not list((tmp_path / "cache").rglob("*.npy"))


@pytest.mark.parametrize("damage", ["meta.json truncated", "meta.json empty", "no fingerprint", "images.npy truncated",
                                    "labels.npy empty", "images.npy removed", "images.npy of another shape"])
def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    """A cache folder damaged after its build (a disk error, a hand edit) used to end every run in a traceback
    until deleted by hand; it is now stale like any other, and rebuilt."""
    vols = [volume(seed=k) for k in range(2)]
    root = nnunet(tmp_path / "d", [(v[0], None) for v in vols], [v[1] for v in vols])
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    good = data.open_dataset(root, image_size=16)
    images, folder = np.array(good.array("images")), good.folder
    meta, npy = folder / "meta.json", folder / ("labels.npy" if "labels" in damage else "images.npy")
    if damage == "meta.json truncated":
        meta.write_text(meta.read_text()[:50])
    elif damage == "meta.json empty":
        meta.write_text("")
    elif damage == "no fingerprint":
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "fingerprint"}))
    elif damage.endswith("truncated"):
        npy.write_bytes(npy.read_bytes()[:1000])
    elif damage.endswith("empty"):
        npy.write_bytes(b"")
    elif damage.endswith("removed"):
        npy.unlink()
    else:
        np.save(npy, images[:-1])
    rebuilt = data.open_dataset(root, image_size=16)
    assert rebuilt.folder == folder and np.array_equal(rebuilt.array("images"), images)


def test_a_patients_unlabeled_frame_is_left_out_of_finetuning_and_scoring(tmp_path, monkeypatch):
    """Patient p0 has a labeled and an unlabeled frame: finetuning trains on the labeled one, Dice scores it
    alone (the unlabeled frame's empty label map used to count as truth), and pretraining reads both."""
    from dice import evaluate_patients
    vols = [volume(seed=k) for k in range(3)]
    root = nnunet(tmp_path / "d", [(v[0], None) for v in vols], [vols[0][1], None, vols[2][1]],
                  names=["p0_frame01", "p0_frame12", "p1_frame01"])
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    cache = data.open_dataset(root, image_size=16)
    assert len(data.SliceDataset(cache, ["p0"], labeled=True)) == 7 and len(data.SliceDataset(cache, ["p0"])) == 14

    class Background(torch.nn.Module):  # predicts background everywhere
        def forward(self, x):
            return torch.stack([torch.ones_like(x[:, 0])] + [torch.zeros_like(x[:, 0])] * 2, dim=1)  # (B, 3, S, S)
    result = evaluate_patients(Background(), cache, ["p0", "p1"], torch.device("cpu"))
    assert sorted(result["per_volume"]) == ["p0_frame01", "p1_frame01"]
    from evaluate import save_figures  # and --figures draws the volumes it scored: no figure of an empty "truth"
    save_figures(Background(), cache, ["p0", "p1"], torch.device("cpu"), tmp_path / "figures")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["p0_frame01.png", "p1_frame01.png"]
    with pytest.raises(DataError, match=r"patients without labels: \['p9'\]"):
        unlabeled = nnunet(tmp_path / "e", [(v[0], None) for v in vols], [vols[0][1], None, None],
                           names=["p0_frame01", "p9_frame01", "p1_frame01"])
        data.SliceDataset(data.open_dataset(unlabeled, image_size=16), ["p0", "p9"], labeled=True)


def test_preprocessing_clips_zscores_and_keeps_integer_labels(tmp_path):
    image, label = volume((32, 32, 4))
    image[0, 0, 0] = 1e6  # an outlier that clipping to the [1, 99] percentiles removes
    root = nnunet(tmp_path / "d", [(image * 50 + 1000, np.diag([1.0, 1.0, 5.0, 1.0]))], [label])
    cache = data.open_dataset(root, image_size=32)  # native size: resampling is the identity
    x = cache.array("images")[:].astype(np.float64)
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3 and x.max() < 3
    assert cache.array("labels").dtype == np.uint8 and set(np.unique(cache.array("labels"))) <= {0, 1, 2}


def test_preprocessing_clips_at_the_1st_and_99th_percentiles_by_hand():
    x = np.arange(32 * 32 * 4, dtype=np.float64)  # 0 .. 4095: the 1st and 99th percentiles are 40.95 and 4054.05
    clipped = np.clip(x, 0.01 * 4095, 0.99 * 4095)
    expected = ((clipped - clipped.mean()) / clipped.std()).reshape(32, 32, 4).transpose(2, 0, 1)  # (N, S, S)
    images, _ = preprocess(x.reshape(32, 32, 4).astype(np.float32), None, (1, 1, 1), 32)  # native size
    np.testing.assert_allclose(images.astype(np.float64), expected, atol=4e-3)  # float16


@pytest.mark.parametrize("n", [128, 100])
def test_downsampling_is_the_antialiased_bilinear_filter(n):
    """Resizing n -> 32 px averages each output pixel's footprint with the triangle filter of bilinear
    interpolation stretched by the factor s = n / 32 (PIL's and torch's antialias), written out here;
    without antialiasing, bilinear reads 4 pixels and aliases noise (a difference of about 2.4)."""
    image = np.random.default_rng(n).normal(size=(n, n, 2)).astype(np.float32)
    s = n / 32
    centre = (np.arange(32) + 0.5) * s  # (32,) output pixel centres in input coordinates
    weights = np.maximum(0, 1 - np.abs(np.arange(n) + 0.5 - centre[:, None]) / s)  # (32, n)
    weights /= weights.sum(axis=1, keepdims=True)
    z = (image - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)
    expected = np.stack([weights @ z[:, :, k] @ weights.T for k in range(2)])  # (2, 32, 32)
    images, _ = preprocess(image, None, (1, 1, 1), 32, intensity="zscore")
    np.testing.assert_allclose(images.astype(np.float64), expected, atol=1e-3)


def test_a_centre_crop_or_pad_puts_the_odd_pixel_after_as_the_square_padding_does():
    x = torch.arange(49.0).reshape(1, 7, 7)
    assert torch.equal(_fit(x, 4, 0), x[:, 1:5, 1:5])  # 3 px too many: 1 cut before, 2 after
    padded = _fit(torch.ones(1, 3, 3), 6, 0)  # 3 px too few: 1 added before, 2 after
    assert torch.equal(padded[0, 1:4, 1:4], torch.ones(3, 3)) and padded.sum() == 9


def test_the_square_padding_puts_the_odd_column_after_and_pads_with_the_lowest_intensity():
    """16 x 13 px of 1 mm to 16 px: the field of view is padded to 16 x 16 by 1 column before and 2 after (the
    odd one after, as _fit does), with the z-scored volume's minimum (the background of a scan, not its mean)."""
    image = np.arange(16 * 13 * 2, dtype=np.float32).reshape(16, 13, 2)
    z = (image - image.mean()) / image.std()  # (16, 13, 2): no resampling at 1 mm to 16 px
    images, _ = preprocess(image, None, (1.0, 1.0, 1.0), 16, intensity="zscore")
    expected = np.full((2, 16, 16), z.min())  # z.min() = -1.730, the padding
    expected[:, :, 1:14] = z.transpose(2, 0, 1)
    np.testing.assert_allclose(images.astype(np.float64), expected, atol=4e-3)  # float16


def test_a_spacing_leaving_either_side_under_16_px_is_refused(tmp_path):
    """10 x 50 mm at --spacing 1.25 is 8 x 40 px: the short side alone is too few for the U-Net."""
    image = np.random.default_rng(0).normal(size=(10, 50, 3)).astype(np.float32)
    root = nnunet(tmp_path / "d", [(image, np.diag([1.0, 1.0, 5.0, 1.0]))])
    with pytest.raises(DataError, match=r"case0_0000\.nii\.gz: --spacing 1\.25 mm leaves 8 x 40 px .* fewer than the 16"):
        data.open_dataset(root, 64, spacing=1.25)


def test_cache_is_reused_and_rebuilt_when_sources_or_settings_change(tmp_path):
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    first = data.open_dataset(root, image_size=16)
    stamp = (first.folder / "meta.json").stat().st_mtime_ns
    assert data.open_dataset(root, image_size=16).folder == first.folder
    assert (first.folder / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert data.open_dataset(root, image_size=32).folder != first.folder  # other settings
    save(root / "imagesTr" / "case0_0000.nii.gz", image * 2)  # edited source
    rebuilt = data.open_dataset(root, image_size=16)
    assert rebuilt.folder == first.folder and rebuilt.meta["fingerprint"] != first.meta["fingerprint"]
    assert not list(Path(first.folder).parent.glob("*.tmp*"))


def test_an_edit_that_keeps_a_file_s_size_or_a_renamed_class_rebuilds_the_cache(tmp_path):
    """The fingerprint is the size and modification time of every source, dataset.json included: an edit in
    place (same size, a new time) and a class renamed in dataset.json rebuild the cache."""
    from synthetic import write_synthetic
    root = write_synthetic(tmp_path / "d", patients=2, style="mri", seed=1)
    first = data.open_dataset(root, 16, cache=tmp_path / "c")
    image = root / "imagesTr" / "syn_000_0000.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert data.open_dataset(root, 16, cache=tmp_path / "c").meta["fingerprint"] != first.meta["fingerprint"]
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {("LVC" if k == "LV" else k): v for k, v in meta["labels"].items()}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert data.open_dataset(root, 16, cache=tmp_path / "c").classes == ["background", "RV", "MYO", "LVC"]


def test_a_new_build_names_the_caches_of_an_older_version_nobody_reads(tmp_path, monkeypatch, capsys):
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION - 1)
    old = data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    monkeypatch.undo()
    data.open_dataset(root, image_size=32, cache=tmp_path / "c")  # other settings, this version: still read
    capsys.readouterr()
    data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    said = capsys.readouterr().out
    assert f"note: 1 cache folder(s) of {root.resolve()} made by another version" in said and str(old.folder) in said
    data.open_dataset(root, image_size=16, cache=tmp_path / "c")  # found, not built: nothing more to say
    assert "another version" not in capsys.readouterr().out


OPEN = """
import hashlib, os, sys, time
from pathlib import Path
import cache, data
build = cache.build
def slow_build(*args):
    print("building", flush=True)
    time.sleep(1)  # the other process looks for the cache meanwhile
    build(*args)
cache.build = slow_build
root, cache, ready = sys.argv[1], sys.argv[2], Path(sys.argv[3])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:  # both processes open the dataset at the same moment
    time.sleep(0.01)
found = data.open_dataset(root, 16, cache=cache)
print(found.folder, hashlib.sha1(found.array("images")[:].tobytes() + found.array("labels")[:].tobytes()).hexdigest())
"""


def test_processes_opening_a_new_cache_at_once_build_it_once(tmp_path):
    """The second waits for the first one's build and reuses it (it used to build again and replace
    the first one's folder under its readers)."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    (tmp_path / "ready").mkdir()
    openers = [subprocess.Popen([sys.executable, "-c", OPEN, str(root), str(tmp_path / "cache"), str(tmp_path / "ready")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [opener.communicate()[0].splitlines() for opener in openers]
    assert [opener.returncode for opener in openers] == [0, 0], outputs
    assert sum(lines.count("building") for lines in outputs) == 1, outputs
    assert outputs[0][-1] == outputs[1][-1]  # one folder, the same arrays
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_slices_are_memory_mapped_and_never_pickled(tmp_path):
    image, label = volume((64, 64, 30))
    cache = data.open_dataset(nnunet(tmp_path / "d", [(image, None)], [label]), image_size=64)
    ds = data.SliceDataset(cache, labeled=True)
    ds[3]
    assert isinstance(cache.array("images"), np.memmap)
    assert len(pickle.dumps(ds)) < 30 * 64 * 64  # a worker gets file names, not the arrays


def test_a_worker_of_a_cache_rebuilt_meanwhile_stops_instead_of_reading_other_volumes(tmp_path):
    """A run's loader workers map the cache by its folder's name. Another run that finds the dataset changed
    (a case added) rebuilds that folder in place: a worker started after it would read the new arrays against
    the old volume table (slices of another volume). It stops with the reason; the opener's own maps, made at
    opening, and a worker of the new cache read on."""
    image, label = volume((20, 16, 6))
    root = nnunet(tmp_path / "d", [(image, None)] * 2, [label] * 2)
    first = data.SliceDataset(data.open_dataset(root, image_size=16))
    before = first[7]["image"].clone()
    worker = pickle.loads(pickle.dumps(first))  # as a DataLoader worker receives it
    save(root / "imagesTr" / "aaa_0000.nii.gz", volume((20, 16, 9), seed=5)[0])  # sorts first: every row moves
    second = data.SliceDataset(data.open_dataset(root, image_size=16))
    assert second.cache.folder == first.cache.folder and len(second.cache.array("images")) == 21
    for _ in range(2):  # and again: the new arrays are not kept for a later call
        with pytest.raises(DataError, match=r"rebuilt or removed by another run since this one opened it"):
            worker[7]
    assert torch.equal(first[7]["image"], before)  # mapped when opened: the old arrays, still whole
    assert torch.equal(pickle.loads(pickle.dumps(second))[7]["image"], second[7]["image"])


def test_unlabeled_images_pretrain_but_cannot_finetune(tmp_path):
    vols = [volume(seed=k) for k in range(2)]
    root = nnunet(tmp_path / "d", [(v[0], None) for v in vols], [vols[0][1], None])
    cache = data.open_dataset(root, image_size=16)
    assert len(data.SliceDataset(cache)) == 14 and cache.patients(labeled=True) == ["case0"]
    with pytest.raises(DataError, match="without labels"):
        data.SliceDataset(cache, labeled=True)


# ------------------------------------------------------------------------------- layouts
def test_raw_layouts_are_found_and_read(tmp_path):
    image, _ = volume((12, 12, 4))
    raw = np.zeros((12, 12, 4), np.int16)
    raw[2:5, 2:5, :] = 205
    raw[6:9, 6:9, :] = 850
    save(tmp_path / "mmwhs" / "ct_train_1001_image.nii.gz", image)
    save(tmp_path / "mmwhs" / "ct_train_1001_label.nii.gz", raw)
    chd = np.zeros((12, 12, 4), np.uint8)
    chd[0:3, 0:3] = 7
    chd[5:7, 5:7] = 12  # labels above 7 are background, as in the authors' code
    save(tmp_path / "chd" / "ct_1001_image.nii.gz", image)
    save(tmp_path / "chd" / "ct_1001_label.nii.gz", chd)
    save(tmp_path / "chd" / "ct_1002_image.nii.gz", image)  # unlabeled
    for p in ("001", "002"):
        for f in ("01", "12"):
            save(tmp_path / "acdc" / "training" / f"patient{p}" / f"patient{p}_frame{f}.nii.gz", image)
            save(tmp_path / "acdc" / "training" / f"patient{p}" / f"patient{p}_frame{f}_gt.nii.gz",
                 (chd % 4).astype(np.uint8))
    save(tmp_path / "hvsmr" / "Training_dataset_sx_cropped" / "training_sa_crop_pat0.nii.gz", image)
    save(tmp_path / "hvsmr" / "Ground_truth" / "training_sa_crop_pat0-label.nii.gz", (chd % 3).astype(np.uint8))

    for layout in ("mmwhs", "chd", "acdc", "hvsmr"):
        assert data.find_cases(tmp_path / layout)[0] == layout
    cache = data.open_dataset(tmp_path / "mmwhs", image_size=16)
    assert cache.classes[0] == "background" and len(cache.classes) == 8
    counts = np.bincount(cache.array("labels")[:].ravel(), minlength=8)
    assert counts[1] > 0 and counts[7] > 0 and counts[2:7].sum() == 0  # 205 -> 1, 850 -> 7
    cache = data.open_dataset(tmp_path / "chd", image_size=16)
    assert [v.labeled for v in cache.volumes] == [True, False]
    assert set(np.unique(cache.array("labels")[:4])) == {0, 7}
    acdc = data.find_cases(tmp_path / "acdc")[1]
    assert [c.patient for c in acdc] == ["patient001"] * 2 + ["patient002"] * 2
    assert all(c.label is not None for c in acdc)
    hvsmr = data.find_cases(tmp_path / "hvsmr")
    assert hvsmr[1][0].label is not None and len(hvsmr[2]) == 3
    (tmp_path / "hvsmr" / "Ground_truth").rename(tmp_path / "hvsmr" / "Ground truth")  # the folder's other spelling
    assert data.find_cases(tmp_path / "hvsmr")[1][0].label.parent.name == "Ground truth"
    (tmp_path / "hvsmr" / "Ground_truth").mkdir()  # both spellings, the label in one of them
    assert data.find_cases(tmp_path / "hvsmr")[1][0].label.parent.name == "Ground truth"
    with pytest.raises(DataError, match=r"^\S+/hvsmr/Ground truth/training_sa_crop_pat0-label.nii.gz: the label of "
                                        r"\S+/training_sa_crop_pat0.nii.gz lies outside \S+/Training_dataset_sx_cropped; "
                                        r"point --data at the folder that holds both$"):
        data.find_cases(tmp_path / "hvsmr" / "Training_dataset_sx_cropped", "hvsmr")  # the images' folder alone
    (tmp_path / "link").symlink_to(tmp_path / "hvsmr" / "Training_dataset_sx_cropped")  # check reads it as training does
    with pytest.raises(SystemExit, match=r"training_sa_crop_pat0-label.nii.gz: the label of \S+ lies outside"):
        data.main(["check", str(tmp_path / "link"), "--layout", "hvsmr"])
    beside = tmp_path / "hvsmr" / "Training_dataset_sx_cropped" / "training_sa_crop_pat0-label.nii.gz"
    (tmp_path / "hvsmr" / "Ground truth" / "training_sa_crop_pat0-label.nii.gz").rename(beside)  # one flat folder
    assert data.find_cases(tmp_path / "hvsmr" / "Training_dataset_sx_cropped", "hvsmr")[1][0].label == beside


def test_an_mmwhs_folder_of_ct_and_mr_volumes_is_refused(tmp_path):
    """MM-WHS ships CT and MR in sibling folders: its root read whole would mix the two in one dataset."""
    image, label = volume()
    for name in ("ct_train/ct_train_1001", "mr_train/mr_train_1001"):
        save(tmp_path / "mmwhs" / f"{name}_image.nii.gz", image)
    assert len(data.find_cases(tmp_path / "mmwhs" / "ct_train")[1]) == 1
    with pytest.raises(DataError, match=r"^\S+mmwhs: holds MM-WHS's CT \(ct_train_1001_image.nii.gz\) and MR "
                                        r"\(mr_train_1001_image.nii.gz\) volumes, which one dataset cannot mix; "
                                        r"point --data at one modality's folder \(the authors: ct_train\)$"):
        data.find_cases(tmp_path / "mmwhs")


def test_every_mmwhs_label_value_becomes_its_structure(tmp_path):
    """The MM-WHS challenge's label values, from its description: slice k holds the k-th value alone."""
    structures = {205: "MYO", 420: "LA", 500: "LV", 550: "RA", 600: "RV", 820: "AO", 850: "PA"}
    label = np.zeros((16, 16, 8), np.int16)
    for k, value in enumerate(structures, start=1):
        label[:, :, k] = value
    image, _ = volume((16, 16, 8))
    save(tmp_path / "m" / "ct_train_1001_image.nii.gz", image)
    save(tmp_path / "m" / "ct_train_1001_label.nii.gz", label)
    cache = data.open_dataset(tmp_path / "m", image_size=16)
    read = [cache.classes[int(np.bincount(s.ravel()).argmax())] for s in cache.array("labels")[:]]  # (8,) names
    assert read == ["background"] + list(structures.values())


def test_nnunet_frames_of_one_patient_share_a_fold(tmp_path):
    """nnU-Net's ACDC conversion names cases patient001_frame01 and patient001_frame12: one patient, one fold."""
    names = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 5) for f in (1, 12)]
    image, label = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * len(names), [label] * len(names), names=names)
    cases = data.find_cases(root)[1]
    assert [c.id for c in cases] == names and [c.patient for c in cases] == [n[:10] for n in names]
    for fold in range(4):
        split = data.split_patients([c.patient for c in cases], folds=4, fold=fold, val=1)
        assert all(sum(c.patient in part for part in split.values()) == 1 for c in cases)
        assert sum(c.patient in split["test"] for c in cases) == 2  # both frames of the tested patient


def test_an_nnunet_dataset_without_classes_opens_for_pretraining(tmp_path):
    """dataset.json's "labels": {} (unlabeled scans) is no Decathlon map: such a set can pretrain, and check says
    it cannot finetune."""
    image, _ = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2, classes=())
    layout, cases, classes = data.find_cases(root)
    assert (layout, [c.id for c in cases], classes) == ("nnunet", ["case0", "case1"], [])
    assert check(root)[1] == [f"{root}: no class but none in its dataset.json: nothing to finetune on"]


def test_nnunet_label_values_with_a_gap_are_refused(tmp_path):
    """Values 0, 1, 3 leave class 2 without a name: a one-line refusal naming dataset.json, not a KeyError."""
    image, _ = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)])
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 3}, "file_ending": ".nii.gz"}))
    with pytest.raises(DataError, match=r"dataset\.json: label values must be 0\.\.K-1, got \[0, 1, 3\]"):
        data.find_cases(root)


def test_nnunet_file_ending_of_dataset_json_is_read(tmp_path):
    """nnU-Net v2 datasets may store uncompressed .nii files, as their dataset.json's file_ending says."""
    image, label = volume((12, 12, 4))
    for name in ("case0", "case1"):
        save(tmp_path / "d" / "imagesTr" / f"{name}_0000.nii", image)
    save(tmp_path / "d" / "labelsTr" / "case0.nii", label)
    meta = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MRI"}, "file_ending": ".nii"}
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(meta))
    cases = data.find_cases(tmp_path / "d")[1]
    assert [(c.id, c.label and c.label.name) for c in cases] == [("case0", "case0.nii"), ("case1", None)]


@pytest.mark.parametrize("stray", ["labelsTr/case1.nii", "imagesTr/case2_0000.nii", "imagesTr/CASE3_0000.NII.GZ"])
def test_an_nnunet_file_of_another_ending_is_refused_not_left_out(tmp_path, stray):
    """With file_ending .nii.gz, a label saved as .nii made its patient unlabeled without a word (out of every
    fold's test), and an image so saved dropped its case: a one-line refusal naming the file."""
    image, label = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2, [label, None])
    data.find_cases(root)  # as written: both cases found
    save(root / stray, label if stray.startswith("labels") else image)
    with pytest.raises(DataError, match=rf"{re.escape(stray.split('/')[1])}: not a \.nii\.gz file, the file_ending of "
                                        rf".*dataset\.json; 1 such file\(s\) in {stray.split('/')[0]}"):
        data.find_cases(root)


def test_other_files_beside_an_nnunet_dataset_s_are_still_left_alone(tmp_path):
    """Backups, checksums, an editor's swap file and macOS's ._ files are no NIfTI of the dataset: ignored, as before."""
    image, label = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2, [label, None])
    for name in ("imagesTr/case0_0000.nii.gz.bak", "imagesTr/case0_0000.nii.gz.md5", "labelsTr/case0.nii.gz~",
                 "imagesTr/.case0_0000.nii.gz.swp", "imagesTr/._case0_0000.nii.gz", "labelsTr/._case0.nii.gz",
                 "imagesTr/case5_0000.mha"):
        (root / name).write_bytes(b"\0" * 8)
    cases = data.find_cases(root)[1]
    assert [(c.id, c.label and c.label.name) for c in cases] == [("case0", "case0.nii.gz"), ("case1", None)]


@pytest.mark.parametrize("copy", ["backup/patient001/patient001_frame01.nii.gz", "training/patient001/patient001_frame01.nii"])
def test_a_case_found_twice_is_refused_naming_both_files(tmp_path, copy):
    """A raw layout is searched through every subfolder: a patient copied to backup/, or one volume saved both as
    .nii and .nii.gz, was read twice (trained on twice; its two Dice under one id, one of them lost)."""
    image, _ = volume((12, 12, 4))
    first = tmp_path / "acdc" / "training" / "patient001" / "patient001_frame01.nii.gz"
    save(first, image)
    data.find_cases(tmp_path / "acdc")
    save(tmp_path / "acdc" / copy, image)
    with pytest.raises(DataError, match=r"patient001_frame01\.nii(\.gz)?: case patient001_frame01 again \(also "
                                        r".*patient001_frame01\.nii(\.gz)?\); keep one of them$") as e:
        data.find_cases(tmp_path / "acdc")
    assert str(first) in str(e.value) and str(tmp_path / "acdc" / copy) in str(e.value)


@pytest.mark.parametrize("image_name,label_name", [("patient001_frame01.nii.gz", "patient001_frame01_gt.nii"),
                                                   ("patient001_frame01.nii", "patient001_frame01_gt.nii.gz"),
                                                   ("ct_1001_image.nii", "ct_1001_label.nii.gz")])
def test_a_raw_layout_s_label_is_found_under_either_ending(tmp_path, image_name, label_name):
    """An image saved as .nii.gz and its label as .nii (or the reverse) stay one labeled case."""
    image, label = volume((12, 12, 4))
    save(tmp_path / "d" / "p" / image_name, image)
    save(tmp_path / "d" / "p" / label_name, (label % 3).astype(np.uint8))
    cases = data.find_cases(tmp_path / "d")[1]
    assert [(c.image.name, c.label and c.label.name) for c in cases] == [(image_name, label_name)]


def test_an_imagestr_folder_without_dataset_json_names_the_missing_file(tmp_path):
    """imagesTr/ marks an nnU-Net dataset: the user is told the dataset.json it lacks, not that its layout is unknown."""
    image, _ = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)])
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"d/dataset\.json: missing \(an nnU-Net dataset needs it\)"):
        data.find_cases(root)


def test_the_folder_above_or_inside_an_nnunet_dataset_is_refused_naming_the_dataset(tmp_path):
    """nnU-Net's ACDC names its labels labelsTr/patient001_frame01.nii.gz, ACDC's own image name: --data
    nnUNet_raw/ (one folder too high) was taken for ACDC's layout and pretrained on the label maps."""
    image, label = volume((12, 12, 4))
    names = ["patient001_frame01", "patient001_frame12"]
    root = nnunet(tmp_path / "nnUNet_raw" / "Dataset027_ACDC", [(image, None)] * 2, [label] * 2, names=names)
    with pytest.raises(DataError, match=rf"^{tmp_path}/nnUNet_raw: holds the nnU-Net dataset\(s\) {root}; point --data "
                                        rf"at one of them \(or name this folder's own layout with --layout\)$"):
        data.find_cases(tmp_path / "nnUNet_raw")
    with pytest.raises(DataError, match=rf"^{root}/labelsTr: a folder of the nnU-Net dataset {root}; point --data at "
                                        rf"that one$"):
        data.find_cases(root / "labelsTr")
    with pytest.raises(DataError, match=r"no images found for the acdc layout"):  # told the layout: no label as an image
        data.find_cases(tmp_path / "nnUNet_raw", "acdc")
    assert [c.label.name for c in data.find_cases(root)[1]] == [f"{n}.nii.gz" for n in names]


def test_raw_layouts_follow_symlinked_folders_and_stop_at_a_loop(tmp_path):
    """A subset of patients linked from elsewhere: Path.rglob skipped the linked folders, and their patients
    were left out without a word. A link back up the tree is walked once."""
    image, label = volume((12, 12, 4))
    for p in ("001", "002"):
        store = tmp_path / "store" / f"patient{p}"
        save(store / f"patient{p}_frame01.nii.gz", image)
        save(store / f"patient{p}_frame01_gt.nii.gz", (label % 4).astype(np.uint8))
    (tmp_path / "acdc").mkdir()
    (tmp_path / "acdc" / "patient001").symlink_to(tmp_path / "store" / "patient001")
    (tmp_path / "acdc" / "patient002").symlink_to(tmp_path / "store" / "patient002")
    (tmp_path / "store" / "patient002" / "up").symlink_to(tmp_path / "acdc")  # a loop
    layout, cases, _ = data.find_cases(tmp_path / "acdc")
    assert layout == "acdc" and [(c.patient, c.label.name) for c in cases] == [
        ("patient001", "patient001_frame01_gt.nii.gz"), ("patient002", "patient002_frame01_gt.nii.gz")]


def test_raw_files_in_a_folder_named_like_nnunet_s_are_read_unless_it_is_an_nnunet_dataset_s(tmp_path):
    """With --layout chd, ct_1001 in c/imagesTr/ (no dataset.json above it) is a CHD volume like ct_1002 in c/more/."""
    image, label = volume((12, 12, 4))
    for folder, name in (("imagesTr", "ct_1001"), ("more", "ct_1002")):
        save(tmp_path / "c" / folder / f"{name}_image.nii.gz", image)
        save(tmp_path / "c" / folder / f"{name}_label.nii.gz", label)
    assert [(c.id, c.label is not None) for c in data.find_cases(tmp_path / "c", "chd")[1]] == [
        ("ct_1001_image", True), ("ct_1002_image", True)]


def test_a_link_to_a_folder_that_is_gone_is_one_line_not_a_silent_gap(tmp_path):
    """A patient folder linked from a store that moved: os.walk lists the broken link as a file, and the patient was
    left out without a word."""
    image, _ = volume((12, 12, 4))
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz", image)
    (tmp_path / "acdc" / "patient002").symlink_to(tmp_path / "moved" / "patient002")
    with pytest.raises(DataError, match=rf"^{tmp_path}/acdc/patient002: a link to {tmp_path}/moved/patient002, which is "
                                        rf"gone; its volumes would be left out$"):
        data.find_cases(tmp_path / "acdc")


def test_a_dataset_json_that_is_not_nnunet_s_names_the_way_out(tmp_path):
    """A CHD folder with a metadata file named dataset.json: one below it is no nnU-Net dataset (none has imagesTr or
    labelsTr beside it), so the layout is still found; one at its top is read as nnU-Net's and says --layout."""
    image, label = volume((12, 12, 4))
    save(tmp_path / "chd" / "ct_1001_image.nii.gz", image)
    save(tmp_path / "chd" / "ct_1001_label.nii.gz", label)
    (tmp_path / "chd" / "meta").mkdir()
    (tmp_path / "chd" / "meta" / "dataset.json").write_text('{"name": "ImageCHD"}')
    assert data.find_cases(tmp_path / "chd")[0] == "chd"
    (tmp_path / "chd" / "dataset.json").write_text('{"name": "ImageCHD"}')
    with pytest.raises(DataError, match=r"chd/dataset\.json: not a valid dataset\.json \(KeyError\('labels'\)\); another "
                                        r"layout's folder\? pass --layout$"):
        data.find_cases(tmp_path / "chd")
    assert data.find_cases(tmp_path / "chd", "chd")[0] == "chd"


def test_the_walk_scans_a_folder_reached_again_through_a_link_once_and_stops_there(tmp_path, monkeypatch):
    """store/patient002/up links back to acdc/: the walk lists acdc, patient001, patient002 and up, and stops at
    up (already seen). Descending on (its subfolders not cleared), it rescans the same folders until the kernel's
    symlink limit: 4 scans become 61, and each further link back up multiplies them."""
    image, _ = volume((12, 12, 4))
    for p in ("001", "002"):
        save(tmp_path / "store" / f"patient{p}" / f"patient{p}_frame01.nii.gz", image)
    (tmp_path / "acdc").mkdir()
    for p in ("001", "002"):
        (tmp_path / "acdc" / f"patient{p}").symlink_to(tmp_path / "store" / f"patient{p}")
    (tmp_path / "store" / "patient002" / "up").symlink_to(tmp_path / "acdc")
    scanned, real = [], os.scandir
    def scandir(path="."):
        scanned.append(os.path.relpath(path, tmp_path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    assert [c.id for c in data.find_cases(tmp_path / "acdc", "acdc")[1]] == ["patient001_frame01", "patient002_frame01"]
    assert sorted(scanned) == ["acdc", "acdc/patient001", "acdc/patient002", "acdc/patient002/up"]


def test_a_folder_named_imagestr_outside_an_nnunet_dataset_is_detected_by_its_files(tmp_path):
    """--data c/imagesTr holding CHD files, with no dataset.json in c/: not "a folder of the nnU-Net dataset c"."""
    image, label = volume((12, 12, 4))
    save(tmp_path / "c" / "imagesTr" / "ct_1001_image.nii.gz", image)
    save(tmp_path / "c" / "imagesTr" / "ct_1001_label.nii.gz", label)
    layout, cases, _ = data.find_cases(tmp_path / "c" / "imagesTr")
    assert layout == "chd" and [(c.id, c.label.name) for c in cases] == [("ct_1001_image", "ct_1001_label.nii.gz")]


def test_the_folder_above_several_nnunet_datasets_names_them(tmp_path):
    """Three datasets under nnUNet_raw/: all three named, sorted (up to three)."""
    image, _ = volume((12, 12, 4))
    roots = [nnunet(tmp_path / "nnUNet_raw" / f"Dataset00{k}_X", [(image, None)]) for k in (3, 1, 2)]
    listed = ", ".join(str(r) for r in sorted(roots))
    with pytest.raises(DataError, match=rf"^{tmp_path}/nnUNet_raw: holds the nnU-Net dataset\(s\) "
                                        rf"{re.escape(listed)}; "):
        data.find_cases(tmp_path / "nnUNet_raw")


def test_a_raw_layout_over_an_nnunet_dataset_skips_all_four_of_its_folders(tmp_path):
    """--layout acdc on nnUNet_raw/: labelsTs/patient101_frame01.nii.gz (a test label, ACDC's image name) is no image,
    as labelsTr's are not."""
    image, label = volume((12, 12, 4))
    root = nnunet(tmp_path / "nnUNet_raw" / "Dataset027_ACDC", [(image, None)], [label], names=["patient001_frame01"])
    save(root / "imagesTs" / "patient101_frame01_0000.nii.gz", image)
    save(root / "labelsTs" / "patient101_frame01.nii.gz", label)
    with pytest.raises(DataError, match=r"no images found for the acdc layout"):
        data.find_cases(tmp_path / "nnUNet_raw", "acdc")


def test_a_raw_layout_beside_a_dataset_json_of_its_own_is_still_read(tmp_path):
    """--layout acdc on a folder that also holds a dataset.json (a MONAI datalist, say): patient001/'s volume is
    ACDC's, not skipped as an nnU-Net folder's (only imagesTr, labelsTr, imagesTs and labelsTs are)."""
    image, label = volume((12, 12, 4))
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz", image)
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01_gt.nii.gz", (label % 4).astype(np.uint8))
    (tmp_path / "acdc" / "dataset.json").write_text(json.dumps({"training": []}))
    cases = data.find_cases(tmp_path / "acdc", "acdc")[1]
    assert [(c.id, c.label.name) for c in cases] == [("patient001_frame01", "patient001_frame01_gt.nii.gz")]


def test_an_uncompressed_acdc_cine_file_is_read(tmp_path):
    """--cine finds patient001_4d.nii as it finds patient001_4d.nii.gz: one pretraining volume per frame."""
    image, _ = volume((12, 12, 4))
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz", image)
    save(tmp_path / "acdc" / "patient001" / "patient001_4d.nii", np.stack([image] * 3, axis=3))
    cases = data.find_cases(tmp_path / "acdc", cine=True)[1]
    assert [(c.id, c.frame) for c in cases if c.label is None and c.frame is not None] == [
        ("patient001_4d_t00", 0), ("patient001_4d_t01", 1), ("patient001_4d_t02", 2)]


def test_a_label_shifted_along_two_axes_is_that_far_from_its_image(tmp_path):
    """Shifted 3 mm along x and 4 mm along y: every corner lies 5 mm (Euclidean) from the image's, not 4."""
    image, label = volume((12, 12, 4))
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    moved = affine.copy()
    moved[:2, 3] = [3.0, 4.0]
    case = Case("a", "a", save(tmp_path / "a.nii.gz", image, affine), save(tmp_path / "a_gt.nii.gz", label, moved))
    with pytest.raises(DataError, match=r"its corners lie up to 5 mm from the image's$"):
        read_case(case, label_lookup("nnunet", 3))


def test_python_data_py_check_takes_intensity(tmp_path, capsys):
    """`python data.py check DIR --intensity zscore` reads a nearly constant image unclipped: usable; the default
    (clip-zscore, the training's) reports it."""
    image = np.zeros((20, 20, 5), np.float32)
    image[:2, :1, :] = 1000.0  # 10 of 2,000 voxels
    root = nnunet(tmp_path / "d", [(image, None)], [np.zeros((20, 20, 5), np.uint8)])
    for flags, code, last in (([], 1, "1 problem(s): NOT usable"),
                              (["--intensity", "zscore"], 0, "0 problem(s): usable")):
        with pytest.raises(SystemExit) as done:
            data.main(["check", str(root), *flags])
        assert (done.value.code, capsys.readouterr().out.splitlines()[-1]) == (code, last)


def test_a_patient_folder_linked_twice_is_read_once(tmp_path):
    """acdc/patient001 and acdc/alias both link to store/patient001: one real folder, walked once (each real
    folder once), so its volume is one case, not "case patient001_frame01 again"."""
    image, _ = volume((12, 12, 4))
    save(tmp_path / "store" / "patient001" / "patient001_frame01.nii.gz", image)
    (tmp_path / "acdc").mkdir()
    for name in ("patient001", "alias"):
        (tmp_path / "acdc" / name).symlink_to(tmp_path / "store" / "patient001")
    assert [c.id for c in data.find_cases(tmp_path / "acdc")[1]] == ["patient001_frame01"]


def test_a_raw_layout_with_other_json_files_is_still_detected(tmp_path):
    """Only a dataset.json marks an nnU-Net dataset below --data: a metadata file info.json beside ACDC's volumes
    leaves the folder ACDC's."""
    image, _ = volume((12, 12, 4))
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz", image)
    (tmp_path / "acdc" / "patient001" / "info.json").write_text("{}")
    layout, cases, _ = data.find_cases(tmp_path / "acdc")
    assert layout == "acdc" and [c.id for c in cases] == ["patient001_frame01"]


def test_a_folder_that_cannot_be_read_is_one_line_not_a_silent_gap(tmp_path, monkeypatch):
    """os.walk (as Path.rglob) skipped a subfolder it could not list: its patients were left out without a word."""
    image, _ = volume((12, 12, 4))
    for p in ("001", "002"):
        save(tmp_path / "acdc" / f"patient{p}" / f"patient{p}_frame01.nii.gz", image)
    real = os.scandir
    def scandir(path="."):
        if str(path).endswith("patient002"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=rf"^{tmp_path}/acdc/patient002: cannot be read \(Permission denied\); "
                                        rf"its volumes would be left out$"):
        data.find_cases(tmp_path / "acdc", "acdc")


@pytest.mark.parametrize("edit,refusal", [
    (dict(file_ending=None), r"dataset\.json: file_ending is None; only NIfTI files \(\.nii\.gz or \.nii\) are read$"),
    (dict(file_ending="nii.gz"), r"dataset\.json: file_ending is 'nii\.gz'; only NIfTI"),
    (dict(file_ending=".mha"), r"dataset\.json: file_ending is '\.mha'; only NIfTI"),
    (dict(labels={"background": 0, "MYO": 1, "myocardium": 1}),
     r"dataset\.json: labels 'MYO' and 'myocardium' share the value 1; each class needs its own$"),
    ("labelsTR", r"/labelsTR: nnU-Net's folder is named labelsTr \(the case matters\); rename it$")])
def test_a_dataset_json_or_folder_that_would_be_misread_is_one_line(tmp_path, edit, refusal):
    """A null file_ending was a TypeError from the file search; a duplicated label value dropped a class name;
    a labelsTR folder (the case changed) left every patient unlabeled, and `check` called the dataset usable."""
    image, label = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2, [label] * 2)
    if edit == "labelsTR":
        (root / "labelsTr").rename(root / "labelsTR")
    else:
        (root / "dataset.json").write_text(json.dumps(dict(json.loads((root / "dataset.json").read_text()), **edit)))
    with pytest.raises(DataError, match=refusal):
        data.find_cases(root)


def test_a_labelstr_folder_beside_a_case_variant_of_it_is_read(tmp_path):
    """labelsTR is refused only where labelsTr is missing (its labels would never be found); beside labelsTr (a
    copy, say) the dataset reads from labelsTr, as nnU-Net does."""
    image, label = volume((12, 12, 4))
    root = nnunet(tmp_path / "d", [(image, None)] * 2, [label] * 2)
    (root / "labelsTR").mkdir()
    assert [c.label.name for c in data.find_cases(root)[1]] == ["case0.nii.gz", "case1.nii.gz"]


def test_a_label_stored_in_another_orientation_says_so(tmp_path):
    """The same voxels stored flipped (another affine, the same world): refused as before, now saying how the two
    files differ; a shifted or rescaled label, how far its corners lie from the image's."""
    image, label = volume((12, 12, 4))
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    img_path = save(tmp_path / "a.nii.gz", image, affine)
    case = Case("a", "a", img_path, save(tmp_path / "a_gt.nii.gz", *flipped(label, affine, 0)))
    with pytest.raises(DataError, match=r"a_gt\.nii\.gz: affine differs from its image's \(a\.nii\.gz\): stored LAS, "
                                        r"the image RAS$"):
        read_case(case, label_lookup("nnunet", 3))
    moved = affine.copy()
    moved[1, 3] = 2.5
    case = Case("a", "a", img_path, save(tmp_path / "a_gt.nii.gz", label, moved))
    with pytest.raises(DataError, match=r"affine differs from its image's \(a\.nii\.gz\): its corners lie up to "
                                        r"2\.5 mm from the image's$"):
        read_case(case, label_lookup("nnunet", 3))
    wider = np.diag([1.5, 1.0, 4.0, 1.0])  # 1.5 mm pixels along x: the far corner, 11 pixels out, is 5.5 mm off
    case = Case("a", "a", img_path, save(tmp_path / "a_gt.nii.gz", label, wider))
    with pytest.raises(DataError, match=r"its corners lie up to 5\.5 mm from the image's$"):
        read_case(case, label_lookup("nnunet", 3))


def test_a_nearly_constant_image_names_the_clipping_and_its_cure(tmp_path):
    """99.5% of the voxels 0: the clipped image is constant, so refused, but unclipped (--intensity zscore) it reads;
    `check` takes --intensity too. A constant image is refused either way, with no such advice."""
    image = np.zeros((20, 20, 5), np.float32)
    image[:2, :1, :] = 1000.0  # 10 of 2,000 voxels
    root = nnunet(tmp_path / "d", [(image, None)], [np.zeros((20, 20, 5), np.uint8)])
    clipped = check(root)[1]
    assert len(clipped) == 1 and clipped[0].endswith("case0_0000.nii.gz: image is constant between its 1st and 99th "
                                                     "percentiles (nearly every voxel is one value); --intensity zscore "
                                                     "reads it without clipping")
    assert check(root, intensity="zscore")[1] == []
    with pytest.raises(DataError, match=r"^image is constant$"):
        preprocess(np.full((20, 20, 5), 3.0, np.float32), None, (1.0, 1.0, 1.0), 16)


@pytest.mark.parametrize("layout,image_name,label_name,value", [
    ("mmwhs", "ct_train_1001_image.nii.gz", "ct_train_1001_label.nii.gz", 300),  # not an MM-WHS structure's value
    ("acdc", "patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz", 4)])  # ACDC's classes are 0..3
def test_a_raw_layout_s_unknown_label_value_is_refused_naming_the_file(tmp_path, layout, image_name, label_name, value):
    """A label value outside the layout's classes is an error, not background nor a class index past the last."""
    image, _ = volume((12, 12, 4))
    label = np.zeros((12, 12, 4), np.int16)
    label[2:5, 2:5] = value
    save(tmp_path / layout / image_name, image)
    save(tmp_path / layout / label_name, label)
    problems = check(tmp_path / layout)[1]
    assert len(problems) == 1 and f"{label_name}: label values [{value}] are not among" in problems[0]
    case = data.find_cases(tmp_path / layout)[1][0]
    with pytest.raises(DataError, match=rf"{label_name}: label values \[{value}\] are not among"):
        read_case(case, label_lookup(layout, 8 if layout == "mmwhs" else 4))


# -------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_never_leak_a_patient(seed):
    patients = [f"p{i:02d}" for i in range(23)]
    tests = []
    for fold in range(5):
        split = data.split_patients(patients, folds=5, fold=fold, seed=seed, val=3)
        train, val, test = map(set, (split["train"], split["val"], split["test"]))
        assert not (train & val or train & test or val & test)
        assert train | val | test == set(patients) and len(val) == 3
        assert split == data.split_patients(list(reversed(patients)), 5, fold, seed, 3)  # deterministic
        tests += split["test"]
    assert sorted(tests) == patients  # every patient is tested exactly once


def test_the_split_is_the_published_one():
    """The draw itself, pinned: every table in results/ was computed with this draw, so a change to its
    seeding (the seed ignored, or the second shuffle seeded without the fold) must show here."""
    patients = [f"p{i:02d}" for i in range(10)]
    assert data.split_patients(patients, 5, fold=1, seed=0, val=2) == {
        "train": ["p09", "p08", "p00", "p05", "p03", "p06"], "val": ["p01", "p04"], "test": ["p02", "p07"]}
    assert data.split_patients(patients, 5, fold=0, seed=1, val=2) == {
        "train": ["p01", "p05", "p02", "p07", "p03", "p09"], "val": ["p06", "p00"], "test": ["p04", "p08"]}


def test_every_fold_draws_its_own_validation_and_training_patients():
    patients = [f"p{i:02d}" for i in range(40)]
    splits = [data.split_patients(patients, 5, fold, seed=0, val=2) for fold in range(5)]
    assert len({tuple(s["val"]) for s in splits}) == 5  # not one validation pair for every fold
    assert len({tuple(s["train"][:2]) for s in splits}) == 5  # the M = 2 patients differ too


def test_patients_of_a_split_keep_all_their_volumes_together(tmp_path):
    vols = [volume(seed=k) for k in range(4)]
    root = nnunet(tmp_path / "d", [(v[0], None) for v in vols], [v[1] for v in vols])
    cache = data.open_dataset(root, image_size=16)
    split = data.split_patients(cache.patients(labeled=True), folds=2, fold=0, val=1)
    train = data.SliceDataset(cache, split["train"], labeled=True)
    test = data.SliceDataset(cache, split["test"], labeled=True)
    assert not set(train.patients) & set(test.patients) and len(train) + len(test) == 21


def test_impossible_splits_are_refused():
    with pytest.raises(DataError, match="fold 5 of 5"):
        data.split_patients(["a", "b", "c", "d", "e"], folds=5, fold=5)
    with pytest.raises(DataError, match="validation"):
        data.split_patients(["a", "b", "c"], folds=3, fold=0, val=2)


# ---------------------------------------------------------------------------- bad input
def bad_dataset(tmp_path, problem):
    image, label = volume()
    affine = np.diag([1.5, 1.2, 8.0, 1.0])
    root = nnunet(tmp_path / "bad", [(image, affine)], [label])
    img_path, lab_path = root / "imagesTr" / "case0_0000.nii.gz", root / "labelsTr" / "case0.nii.gz"
    if problem == "truncated":
        img_path.write_bytes(img_path.read_bytes()[:300])
    elif problem == "corrupt":
        img_path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    elif problem == "shape":
        save(lab_path, label[:, :, :-1])
    elif problem == "affine":
        save(lab_path, label, np.diag([1.5, 1.2, 6.0, 1.0]))
    elif problem == "non-integer":
        save(lab_path, label.astype(np.float32) + 0.5)
    elif problem == "unlisted":
        save(lab_path, label * 3)
    elif problem == "nan":
        image[3, 3, 3] = np.nan
        save(img_path, image)
    elif problem == "2d":
        save(img_path, image[:, :, 0])
    elif problem == "4d":
        save(img_path, np.stack([image, image], axis=3))
    elif problem == "orphan label":
        save(root / "labelsTr" / "ghost.nii.gz", label)
    elif problem == "empty":
        img_path.unlink(), lab_path.unlink()
    elif problem == "broken link":
        img_path.unlink()
        img_path.symlink_to(tmp_path / "moved.nii.gz")
    return root, {"orphan label": "ghost.nii.gz", "empty": "bad"}.get(
        problem, lab_path.name if problem in ("shape", "affine", "non-integer", "unlisted") else img_path.name)


PROBLEMS = {"truncated": "cannot read", "corrupt": "cannot read", "shape": "shape",
            "affine": "affine", "non-integer": "non-integer", "unlisted": "label values",
            "nan": "NaN", "2d": "3D", "4d": "3D", "orphan label": "without its image", "empty": "no images",
            "broken link": "cannot read"}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bad_input_gets_one_clear_line_and_no_cache(tmp_path, problem, monkeypatch):
    root, culprit = bad_dataset(tmp_path, problem)
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as error:
        data.open_dataset(root, image_size=16)
    message = str(error.value)
    assert culprit in message and PROBLEMS[problem] in message and "\n" not in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("meta.json"))
    result = subprocess.run([sys.executable, "data.py", "check", str(root)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0 and culprit in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_label_affine_off_by_a_twentieth_of_the_finest_spacing_is_refused(tmp_path):
    """Spacing 1 x 1 x 10 mm: a label shifted 0.3 mm in-plane is off its image (the tolerance is 5% of the finest
    spacing, 0.05 mm, not of the slice thickness, 0.5 mm); a 0.01 mm rounding passes."""
    image, label = volume((12, 12, 4))
    affine = np.diag([1.0, 1.0, 10.0, 1.0])
    img_path = save(tmp_path / "a.nii.gz", image, affine)
    for shift, refused in ((0.3, True), (0.01, False)):
        moved = affine.copy()
        moved[0, 3] = shift
        case = Case("a", "a", img_path, save(tmp_path / "a_gt.nii.gz", label, moved))
        if refused:
            with pytest.raises(DataError, match=r"a_gt\.nii\.gz: affine differs from its image's \(a\.nii\.gz\)"):
                read_case(case, label_lookup("nnunet", 3))
        else:
            np.testing.assert_array_equal(read_case(case, label_lookup("nnunet", 3))[1], label)


def test_a_float_label_map_with_one_fractional_voxel_is_refused(tmp_path):
    """One 0.5 among integer-valued floats (an interpolated label map) is refused: rounded, it would be a class."""
    image, label = volume((12, 12, 4))
    label = label.astype(np.float32)
    label[3, 3, 1] = 0.5
    case = Case("a", "a", save(tmp_path / "a.nii.gz", image), save(tmp_path / "a_gt.nii.gz", label))
    with pytest.raises(DataError, match=r"a_gt\.nii\.gz: label map has non-integer values"):
        read_case(case, label_lookup("nnunet", 3))


def test_check_counts_patients_not_volumes(tmp_path):
    """Two patients with two frames each: 4 volumes of 2 patients (folds split patients)."""
    image, label = volume((12, 12, 4))
    names = ["p0_frame01", "p0_frame12", "p1_frame01", "p1_frame12"]
    root = nnunet(tmp_path / "d", [(image, None)] * 4, [label] * 4, names=names)
    assert "volumes      4 (4 labeled) of 2 patients" in check(root)[0]


def test_check_reports_a_thin_sliced_volume_tilted_far_from_the_others(tmp_path):
    """Three axial volumes of 8 mm slices and one of 5 mm tilted 60 degrees toward the front: the dataset's direction
    is the principal axis of the unit slice directions, 0.5 * atan(0.866 / 2.5) = 9.55 degrees from +z, and the
    tilted volume lies 60 - 9.55 = 50 degrees from it, past the 45 reported."""
    t = np.radians(60)
    tilted = np.diag([1.5, 1.2, 5.0, 1.0])
    tilted[:3, 2] = [0.0, 5.0 * np.sin(t), 5.0 * np.cos(t)]
    vols = [volume((12, 12, 4), seed=k)[0] for k in range(4)]
    root = nnunet(tmp_path / "d", [(vols[0], None), (vols[1], None), (vols[2], None), (vols[3], tilted)])
    lines, problems = check(root)
    assert problems == [str(root / "imagesTr" / "case3_0000.nii.gz") + ": its slices run feet-head, 50 degrees "
                        "from the dataset's direction: positions would not compare across volumes"]
    assert any(line.endswith("volumes 10 to 50 degrees from it") for line in lines)


def test_check_summarizes_a_good_dataset(tmp_path):
    vols = [volume(seed=k) for k in range(3)]
    root = nnunet(tmp_path / "d", [(v[0], None) for v in vols], [vols[0][1], None, vols[2][1]])
    lines, problems = check(root)
    text = "\n".join(lines)
    assert problems == [] and "3 (2 labeled)" in text and "median 7" in text and "RAS x3" in text
    assert "slices run   feet-head, along (0.00, 0.00, 1.00) in RAS+; volumes 0 to 0 degrees from it" in text
    result = subprocess.run([sys.executable, "data.py", "check", str(root)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "usable" in result.stdout


def test_negative_chd_label_values_are_reported(tmp_path, monkeypatch):
    """CHD maps labels above 7 to background; a negative one is an error like any unknown value."""
    image, _ = volume((12, 12, 4))
    label = np.zeros((12, 12, 4), np.int16)
    label[2:5, 2:5] = -1
    save(tmp_path / "chd" / "ct_1001_image.nii.gz", image)
    save(tmp_path / "chd" / "ct_1001_label.nii.gz", label)
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"ct_1001_label\.nii\.gz: label values \[-1\] are not among"):
        data.open_dataset(tmp_path / "chd", image_size=16)
    problems = check(tmp_path / "chd")[1]
    assert len(problems) == 1 and "ct_1001_label.nii.gz: label values [-1] are not among" in problems[0]
    assert "image.nii.gz" not in problems[0]  # the label file alone is at fault, and named alone


def test_a_corrupt_cine_file_is_named(tmp_path):
    image, label = volume((12, 12, 4))
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz", image)
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01_gt.nii.gz", label)
    cine = tmp_path / "acdc" / "patient001" / "patient001_4d.nii.gz"
    cine.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(DataError, match=r"patient001_4d\.nii\.gz: cannot read NIfTI header") as error:
        data.find_cases(tmp_path / "acdc", cine=True)
    assert "\n" not in str(error.value)
    cine.write_bytes(b"")
    with pytest.raises(DataError, match=r"patient001_4d\.nii\.gz: cannot read NIfTI header"):
        data.find_cases(tmp_path / "acdc", cine=True)


def test_check_reports_volumes_whose_slices_run_along_another_body_axis(tmp_path, monkeypatch, capsys):
    """Positions mean places along one direction: a sagittal volume among axial ones is a problem, which
    check names and a cache build notes."""
    vols = [volume(seed=k) for k in range(3)]
    sagittal = np.array([[0, 0, 8.0, 0], [1.2, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])  # axes 0, 1, 2: y, z, x
    axial = np.diag([1.5, 1.2, 8.0, 1.0])
    root = nnunet(tmp_path / "d", [(vols[0][0], axial), (vols[1][0], sagittal), (vols[2][0], axial)])
    lines, problems = check(root)
    assert "slices run   feet-head, along (0.00, 0.00, 1.00) in RAS+; volumes 0 to 90 degrees from it" in lines
    assert problems == [str(root / "imagesTr" / "case1_0000.nii.gz") + ": its slices run left-right, 90 degrees "
                        "from the dataset's direction: positions would not compare across volumes"]
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    assert data.open_dataset(root, image_size=16).meta["astray"] == [str(root / "imagesTr" / "case1_0000.nii.gz")]
    assert "note: 1 volume(s) of" in capsys.readouterr().out
    data.open_dataset(root, image_size=16, slice_axis=1)  # every volume: 8 mm pixels, slices 1.2 or 1.5 mm apart
    said = capsys.readouterr().out
    assert "note: 3 volume(s) of" in said and "are read across their stacking axis, maybe: " in said
    assert "case0_0000.nii.gz: pixels of" in said and "pass --slice-axis 2" in said
    tilted = [(vols[0][0], short_axis(10)), (vols[1][0], short_axis(25)), (vols[2][0], short_axis(40))]
    lines, problems = check(nnunet(tmp_path / "e", tilted))  # short-axis stacks, 10 to 40 degrees below the horizontal
    assert problems == [] and any(line.startswith("slices run   feet-head") for line in lines)


def test_check_reports_image_channels_that_are_not_read(tmp_path, capsys):
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    assert check(root)[1] == []
    save(root / "imagesTr" / "case0_0001.nii.gz", image)  # a second channel of case0
    problems = check(root)[1]
    assert len(problems) == 1 and "case0_0001.nii.gz: an image channel other than 0000, ignored" in problems[0]
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T1", "1": "T2"}}))
    problems = check(root)[1]
    assert len(problems) == 2 and "dataset.json: 2 image channels listed; only channel 0000" in problems[0]
    result = subprocess.run([sys.executable, "data.py", "check", str(root)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "NOT usable" in result.stdout
    capsys.readouterr()
    data.open_dataset(root, image_size=16)  # training reads channel 0000 alone, and its cache build says so
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {problem}" for problem in problems]


def test_check_reports_fewer_cases_than_dataset_json_lists(tmp_path, capsys):
    """numTraining above the cases found: a copy that missed files. Below: images without labels, fine."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None), (image, None)], [label, None])  # numTraining 2: one unlabeled
    assert check(root)[1] == []
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 1}))
    assert check(root)[1] == []  # an image added to pretrain on
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 3}))
    problems = check(root)[1]
    assert problems == [f"{root / 'dataset.json'}: numTraining is 3, but imagesTr holds 2 images: files missing?"]
    for wrong in ("3", 2.5, True, -1):  # nnU-Net writes a count; anything else says nothing of the files
        (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": wrong}))
        assert check(root)[1] == [f"{root / 'dataset.json'}: numTraining is {wrong!r}, not a count of cases"]
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 3}))
    capsys.readouterr()
    data.open_dataset(root, image_size=16)  # read all the same, and its cache build says so
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")] == [f"note: {problems[0]}"]


def test_a_decathlon_task_is_refused_with_the_conversion_to_run(tmp_path):
    """MSD tasks (imagesTr/la_003.nii.gz, labels {"0": "background", ...}) are read after nnU-Net's conversion."""
    image, label = volume()
    save(tmp_path / "Task02_Heart" / "imagesTr" / "la_003.nii.gz", image)
    save(tmp_path / "Task02_Heart" / "labelsTr" / "la_003.nii.gz", label)
    meta = {"name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
            "numTraining": 1, "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}]}
    (tmp_path / "Task02_Heart" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset\.json: labels map values to names, as in a Medical Segmentation "
                                        r"Decathlon task or an nnU-Net v1 dataset; convert it with nnUNetv2_convert_MSD_dataset"):
        data.find_cases(tmp_path / "Task02_Heart")


@pytest.mark.parametrize("labels,refusal", [
    ({"background": 0, "A": 1, "ignore": 2}, "label 'ignore' is nnU-Net's 'ignore' label, which this project does not"),
    ({"background": 0, "whole": [1, 2], "core": 2}, "label 'whole' is a region \\(several values\\), which this project")])
def test_nnunet_ignore_labels_and_regions_are_refused(tmp_path, labels, refusal):
    """An 'ignore' label marks unannotated pixels and a region joins classes: read as classes, they were
    trained and scored as anatomy without a word."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    (root / "dataset.json").write_text(json.dumps({**json.loads((root / "dataset.json").read_text()), "labels": labels}))
    with pytest.raises(DataError, match=rf"dataset\.json: {refusal}"):
        data.find_cases(root)


def test_a_dataset_of_background_alone_cannot_finetune(tmp_path, monkeypatch):
    """Its dataset.json names background alone: check said usable, finetuning logged val_dice nan and
    evaluate.py ended in a traceback."""
    import finetune
    from runs import RunError
    image, _ = volume()
    root = nnunet(tmp_path / "d", [(image, None)] * 4, [np.zeros(image.shape, np.uint8)] * 4, classes=("background",))
    assert check(root)[1] == [f"{root}: no class but background in its dataset.json: nothing to finetune on"]
    monkeypatch.setenv("PCL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RunError, match=r"d: no class but background in its dataset.json, nothing to finetune on"):
        finetune.main(["--pretrained", "none", "--data", str(root), "--image-size", "16", "--out", str(tmp_path / "ft")])


# ------------------------------------------------------------------- the authors' preprocessing
def test_cine_without_cine_files_is_refused(tmp_path):
    """--cine (the acdc preset's) on a dataset without ACDC's 4D files used to pretrain on the labeled frames
    without a word: not the authors' recipe."""
    image, label = volume((12, 12, 4))
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz", image)
    save(tmp_path / "acdc" / "patient001" / "patient001_frame01_gt.nii.gz", label)
    nn = nnunet(tmp_path / "nn", [(image, None)], [label])
    for root, layout in ((tmp_path / "acdc", "acdc"), (nn, "nnunet")):
        assert data.find_cases(root)[0] == layout
        with pytest.raises(DataError, match=rf"--cine found no 4D cine file .* in this {layout} dataset"):
            data.find_cases(root, cine=True)


def test_acdc_cine_frames_pretrain_and_only_ed_es_finetune(tmp_path):
    """ACDC: every frame of patientXXX_4d.nii.gz is a pretraining volume (with --cine); finetuning and
    the folds see the labeled ED and ES frames; a patient's frames never leave its fold."""
    root = tmp_path / "acdc" / "training"
    frames = 5
    for p in range(1, 7):
        image, label = volume((12, 12, 4 + p % 3), seed=p)
        cine = np.stack([image + t for t in range(frames)], axis=3)  # (X, Y, Z, T): frame t is image + t
        save(root / f"patient{p:03d}" / f"patient{p:03d}_4d.nii.gz", cine)
        for t in (0, 3):  # ED and ES are two of the cine frames, stored again with their labels
            save(root / f"patient{p:03d}" / f"patient{p:03d}_frame{t + 1:02d}.nii.gz", cine[..., t])
            save(root / f"patient{p:03d}" / f"patient{p:03d}_frame{t + 1:02d}_gt.nii.gz", label % 4)
    cine = data.open_dataset(tmp_path / "acdc", 16, cine=True)
    pretraining = data.SliceDataset(cine, cine=True)
    per_patient = {p: sum(v.slices for v in cine.volumes if v.patient == p and v.cine) for p in cine.patients()}
    assert len(pretraining) == sum(per_patient.values()) == sum(frames * (4 + p % 3) for p in range(1, 7))
    assert {v.id for v in cine.volumes if v.cine} == {f"patient{p:03d}_4d_t{t:02d}" for p in range(1, 7)
                                                       for t in range(frames)}
    first = [cine.array("images")[v.start:v.start + v.slices] for v in cine.volumes if v.id.startswith("patient001_4d")]
    assert all(np.array_equal(f, first[0]) for f in first)  # frame t = frame 0 + t: z-scored per frame, as the authors'
    plain = data.open_dataset(tmp_path / "acdc", 16)  # without --cine the 4D files are not read
    assert not any(v.cine for v in plain.volumes) and len(plain.volumes) == 12
    assert len(data.SliceDataset(cine, labeled=True)) == len(data.SliceDataset(plain, labeled=True))
    split = data.split_patients(cine.patients(labeled=True), folds=3, fold=0, val=1)
    held_out = data.SliceDataset(cine, [p for p in cine.patients() if p not in split["test"]], cine=True)
    assert not set(held_out.patients) & set(split["test"])  # pretraining without a fold drops all its frames
    assert set(data.SliceDataset(cine, split["test"], labeled=True).patients) == set(split["test"])


@pytest.mark.parametrize("source", [(0.7, 0.9), (1.6, 1.25), (2.2, 3.0)])
def test_spacing_resamples_to_the_stated_mm_per_pixel(tmp_path, source):
    """A disc of 30 mm radius, stored at any spacing, is 30 / 1.25 = 24 px in radius after
    --spacing 1.25, and the centre of the field of view is cropped or padded to S x S."""
    sx, sy = source
    x = (np.arange(round(100 / sx)) - (round(100 / sx) - 1) / 2) * sx  # a 100 mm field of view
    y = (np.arange(round(100 / sy)) - (round(100 / sy) - 1) / 2) * sy
    disc = (x[:, None] ** 2 + y[None, :] ** 2 < 30 ** 2)[:, :, None].repeat(3, 2)
    image = (disc * 100.0 + np.random.default_rng(0).normal(0, 1, disc.shape)).astype(np.float32)
    affine = np.diag([sx, sy, 5.0, 1.0])
    root = nnunet(tmp_path / "d", [(image, affine)], [disc.astype(np.uint8)])
    cache = data.open_dataset(root, 64, spacing=1.25)
    assert cache.volumes[0].spacing[0] == 1.25
    label = cache.array("labels")[1]  # (64, 64), the disc of the middle slice
    area = (label == 1).sum()
    assert area == pytest.approx(np.pi * 24 ** 2, rel=0.05)
    rows, cols = np.nonzero(label)
    assert rows.mean() == pytest.approx(31.5, abs=1) and cols.mean() == pytest.approx(31.5, abs=1)
    small = data.open_dataset(root, 32, spacing=1.25).array("labels")[1]  # 80 px of 1.25 mm, centre cropped
    assert (small == 1).sum() == (label[16:48, 16:48] == 1).sum()
    assert data.open_dataset(root, 32, spacing=6.25).volumes[0].spacing[0] == 6.25  # 100 mm in 16 px: enough
    with pytest.raises(DataError, match=r"\.nii\.gz: --spacing 10.0 mm leaves 10 x 10 px .* fewer than the 16"):
        data.open_dataset(root, 32, spacing=10.0)  # a typo's spacing: the field of view in a few pixels
    with pytest.raises(DataError, match=r"\.nii\.gz: --spacing 0.002 mm makes \d+ x \d+ px .* more than the 2048"):
        data.open_dataset(root, 32, spacing=0.002)  # metres for mm: 10 GB a slice, before this check


@pytest.mark.parametrize("n, spacing", [(256, None), (40, None), (150, 1.5)])
def test_labels_stay_on_their_image_when_resampled(n, spacing):
    """Discs at 20 random places resampled from n x n px to 64 x 64 (down, up, and to a spacing): on
    average a label's centre lies where its image's does (bilinear keeps pixel centres); torch's
    "nearest" takes source pixel floor(i * n / 64) and shifts labels by 0.2-0.4 px on both axes."""
    centres = np.random.default_rng(n).uniform(0.3 * n, 0.7 * n, (20, 2))  # (20, 2) in source pixels
    i = np.arange(n)
    discs = ((i[:, None, None] - centres[:, 0]) ** 2 + (i[None, :, None] - centres[:, 1]) ** 2 < (0.2 * n) ** 2)
    image = np.where(discs, 100.0, 0.0).astype(np.float32)  # (n, n, 20), one disc per slice
    images, labels = preprocess(image, discs.astype(np.uint8), (1.0, 1.0, 1.0), 64, spacing, intensity="zscore")
    bright = images.astype(np.float64) - images.min()  # (20, 64, 64): weights of each slice's disc
    rows, cols = np.indices((64, 64))
    image_centres = np.stack([(bright * rows).sum((1, 2)), (bright * cols).sum((1, 2))], 1) / bright.sum((1, 2))[:, None]
    label_centres = np.stack([(labels * rows).sum((1, 2)), (labels * cols).sum((1, 2))], 1) / labels.sum((1, 2))[:, None]
    shift = label_centres - image_centres  # (20, 2) in output pixels
    assert np.abs(shift.mean(axis=0)).max() < 0.05 and np.abs(shift).max() < 0.3, shift.mean(axis=0)


def test_zscore_without_clipping_keeps_the_extremes(tmp_path):
    image, label = volume((16, 16, 5), seed=4)
    image[0, 0, 0] = 1000.0  # one bright voxel
    root = nnunet(tmp_path / "d", [(image, np.diag([1.0, 1.0, 5.0, 1.0]))], [label])  # 16 x 16 x 1 mm: no resampling
    clipped = data.open_dataset(root, 16).array("images")[:].astype(np.float64)
    plain = data.open_dataset(root, 16, intensity="zscore").array("images")[:].astype(np.float64)
    assert plain.max() > 10 > clipped.max()  # the outlier survives only without clipping
    expected = ((image - image.mean()) / image.std()).transpose(2, 0, 1)  # (N, S, S)
    np.testing.assert_allclose(plain, expected, atol=2e-2)  # float16 in the cache


# ------------------------------------------------------------------------ the cache's bookkeeping
def test_a_label_file_edited_alone_rebuilds_the_cache(tmp_path):
    """Label maps are sources too: a corrected label file (its image untouched) must reach finetuning."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    first = data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    before = np.array(first.array("labels"))
    save(root / "labelsTr" / "case0.nii.gz", np.zeros_like(label))  # every voxel relabeled background
    again = data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    assert again.meta["fingerprint"] != first.meta["fingerprint"]
    assert before.any() and not np.array(again.array("labels")).any()


def test_the_older_version_note_names_only_caches_of_this_dataset(tmp_path, monkeypatch, capsys):
    """Two datasets in folders of one name (a/d and b/d) share the cache's folder prefix: an older cache of
    a/d is not b/d's to delete."""
    image, label = volume()
    a = nnunet(tmp_path / "a" / "d", [(image, None)], [label])
    b = nnunet(tmp_path / "b" / "d", [(image, None)], [label])
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION - 1)
    data.open_dataset(a, image_size=16, cache=tmp_path / "c")
    monkeypatch.undo()
    capsys.readouterr()
    data.open_dataset(b, image_size=16, cache=tmp_path / "c")
    assert "another version" not in capsys.readouterr().out


def test_the_in_plane_spacing_of_a_volume_is_its_longer_side_over_the_image_size(tmp_path):
    """Without --spacing the slice is padded square to its longer side, 20 x 1.5 = 30 mm (the other is
    16 x 1.2 = 19.2 mm), then resized to 16 px: 1.875 mm per pixel; the slice spacing stays 8 mm."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])  # save's affine: 1.5, 1.2, 8 mm
    found = data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    assert found.volumes[0].spacing == pytest.approx([30 / 16, 8.0])


def test_a_build_removes_orphan_folders_of_dead_or_no_process_and_keeps_live_ones(tmp_path):
    """NAME.tmpPID left by a killed build is removed, and so is NAME.tmp with no process id at all, of this cache
    or of another one in the folder (a killed build of other settings held its reserved disk space until that
    cache was built again); a build still running in another process keeps its folder."""
    folder = tmp_path / "c" / "d-0123456789ab"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        orphans = [folder.with_name(name + suffix) for name in (folder.name, "other-fedcba987654")
                   for suffix in (".tmp", ".tmp999999999", f".tmp{live.pid}")]
        for orphan in orphans:
            orphan.mkdir(parents=True)
        fresh = cache._fresh_build_folder(folder)
        assert [o.exists() for o in orphans] == [False, False, True] * 2
        assert fresh == folder.with_name(f"{folder.name}.tmp{os.getpid()}") and fresh.is_dir()
    finally:
        live.kill()
        live.wait()


def test_every_reading_setting_gets_a_cache_of_its_own(tmp_path):
    """The cache folder is named by all the settings: reopening with another intensity, spacing or size
    never returns slices read with the first one's."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    asked = [dict(image_size=16), dict(image_size=16, intensity="zscore"), dict(image_size=16, spacing=1.0),
             dict(image_size=32)]
    opened = [data.open_dataset(root, cache=tmp_path / "c", **settings) for settings in asked]
    assert len({found.folder for found in opened}) == len(asked)
    for settings, found in zip(asked, opened):
        assert found.meta["intensity"] == settings.get("intensity", "clip-zscore")
        assert (found.meta["spacing"], found.image_size) == (settings.get("spacing"), settings["image_size"])
    assert not np.array_equal(opened[0].array("images"), opened[1].array("images"))  # clipped or not


def test_a_labels_array_of_another_shape_is_rebuilt(tmp_path):
    """Both arrays are checked against the volumes' slice count: a labels.npy one slice short (a hand
    copy, a disk error) is stale, not read with its rows out of step with the images."""
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])
    good = data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    labels = np.array(good.array("labels"))
    np.save(good.folder / "labels.npy", labels[:-1])
    rebuilt = data.open_dataset(root, image_size=16, cache=tmp_path / "c")
    assert rebuilt.array("labels").shape == (7, 16, 16) and np.array_equal(rebuilt.array("labels"), labels)


def test_a_cache_over_the_disk_quota_is_the_same_one_line(tmp_path, monkeypatch):
    """EDQUOT (a user's quota on a shared cluster) is a full disk too: one line, not a SIGBUS later."""
    import errno
    image, label = volume()
    root = nnunet(tmp_path / "d", [(image, None)], [label])

    def over_quota(fd, offset, length):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(cache.os, "posix_fallocate", over_quota)
    with pytest.raises(DataError, match=r"no room for a cache of .* \(Disk quota exceeded\); free some, or pass --cache DIR"):
        data.open_dataset(root, image_size=16, cache=tmp_path / "c")


def test_python_data_py_check_prints_the_summary_every_problem_and_its_exit_code(tmp_path, capsys):
    """`python data.py check DIR`: three volumes of 5, 6 and 10 slices (median 6, 21 in all), in-plane spacings
    1.0 to 2.0 mm and slices 6 to 8 mm, label shares summing to 100%; exit code 0. With its stacking axis
    the first (--slice-axis 0: 20 slices each) or a layout it does not have (--layout acdc), the flag is
    obeyed; with two problems, both are printed, counted, and the exit code is 1."""
    vols = [volume((20, 16, n), seed=n) for n in (5, 6, 10)]
    affines = [np.diag([1.5, 1.2, 8.0, 1.0]), np.diag([1.0, 2.0, 6.0, 1.0]), np.diag([1.5, 1.2, 7.0, 1.0])]
    root = nnunet(tmp_path / "d", [(v[0], a) for v, a in zip(vols, affines)], [v[1] for v in vols])

    def run(*flags):
        with pytest.raises(SystemExit) as done:
            data.main(["check", str(root), *flags])
        return done.value.code, capsys.readouterr().out.splitlines()
    code, out = run()
    assert code == 0 and out[-1] == "0 problem(s): usable"
    assert "slices       per volume min 5, median 6, max 10; 21 in all (slice axis 2)" in out
    assert "spacing mm   in-plane 1.00..2.00, slice 6.00..8.00" in out
    shares = [float(s) for s in re.findall(r"\((\d+\.\d)%\)", next(line for line in out if line.startswith("label voxels")))]
    assert len(shares) == 3 and sum(shares) == pytest.approx(100, abs=0.2)
    thin = nnunet(tmp_path / "ct", [(vols[0][0], np.diag([0.98, 0.98, 0.45, 1.0]))])  # square pixels, thin slices
    assert check(thin)[1] == []  # a fine CT (overlapping reconstruction), not a stack read across
    code, out = run("--slice-axis", "0")  # obeyed, and doubted: 1.0 to 1.5 mm apart, pixels of 6 to 8 mm
    assert code == 1 and "slices       per volume min 20, median 20, max 20; 60 in all (slice axis 0)" in out
    doubts = [line for line in out if line.startswith("problem: ")]
    assert len(doubts) == 3 and all(re.fullmatch(r"problem: \S+case\d_0000\.nii\.gz: pixels of \d\.\d\d x \d\.\d\d mm "
                                                 r"but slices 1\.[05]0 mm apart along array axis 0; if it is stacked "
                                                 r"along axis 2, pass --slice-axis 2", line) for line in doubts), doubts
    assert "pixels of 1.20 x 8.00 mm but slices 1.50 mm apart" in doubts[0]
    with pytest.raises(SystemExit, match=r"^error: \S+: no images found for the acdc layout$"):
        data.main(["check", str(root), "--layout", "acdc"])
    save(root / "imagesTr" / "case0_0001.nii.gz", vols[0][0])  # a second channel, never read
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T1", "1": "T2"}}))
    code, out = run()
    problems = [line for line in out if line.startswith("problem: ")]
    assert code == 1 and len(problems) == 2 and out[-1] == "2 problem(s): NOT usable"


# ----------------------------------------- in-plane geometry, clipping and layout detection, by hand
def test_the_square_field_of_view_is_the_longer_side_in_mm_whichever_axis_it_is():
    """8 x 16 px of 1 x 2 mm is 8 x 32 mm: axis 1 is the longer side, so the field of view is 32 mm square,
    16 px of 2 mm. The 8 mm of axis 0 then fill 4 of the 16 rows, in the middle (rows 6..9, 12 mm of padding
    on each side); every column is the volume's."""
    image = np.random.default_rng(0).normal(size=(8, 16, 2)).astype(np.float32)
    label = np.ones((8, 16, 2), np.uint8)
    images, labels = preprocess(image, label, (1.0, 2.0, 5.0), 16)
    expected = np.zeros((2, 16, 16), np.uint8)
    expected[:, 6:10, :] = 1
    assert np.array_equal(labels, expected)
    assert (images[:, :5] == images.min()).all() and (images[:, 11:] == images.min()).all()  # the padding


def test_the_clipping_percentiles_are_those_of_the_whole_volume():
    """Clipping uses the volume's own 1st and 99th percentiles (a sample of it only beyond 2M voxels): here a
    volume of 32 x 32 x 16 voxels whose every 8th voxel (in storage order) is 0 and the rest 1..16383, so
    every voxel counts: 1st percentile 0 (12.5 % zeros), 99th near 16220."""
    image = np.arange(32 * 32 * 16, dtype=np.float32)
    image[::8] = 0
    image = image.reshape(32, 32, 16)
    low, high = np.percentile(image, [1, 99])
    assert low == 0 and 16100 < high < 16400
    clipped = np.clip(image, low, high).astype(np.float64)
    expected = ((clipped - clipped.mean()) / clipped.std()).transpose(2, 0, 1)  # (16, 32, 32), no resampling
    images, _ = preprocess(image, None, (1.0, 1.0, 1.0), 32)
    np.testing.assert_allclose(images.astype(np.float64), expected, atol=4e-3)


def test_an_acdc_folder_of_uncompressed_nii_files_is_detected(tmp_path):
    """ACDC's file names mark the layout whichever NIfTI ending they have: patient001_frame01.nii (and its
    _gt label) is acdc, as patient001_frame01.nii.gz is."""
    folder = tmp_path / "acdc" / "patient001"
    folder.mkdir(parents=True)
    for name in ("patient001_frame01.nii", "patient001_frame01_gt.nii"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), str(folder / name))
    assert detect_layout(tmp_path / "acdc") == "acdc"
    layout, cases, _ = data.find_cases(tmp_path / "acdc")
    assert layout == "acdc" and [(c.id, c.patient, c.label.name) for c in cases] == [
        ("patient001_frame01", "patient001", "patient001_frame01_gt.nii")]
