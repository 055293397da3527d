"""Tests of synthetic.py: determinism, the anatomy's invariants along t, and the written nnU-Net dataset."""
import json
import time

import nibabel as nib
import numpy as np
import pytest

import synthetic as S


@pytest.fixture(scope="module")
def phantoms():
    """Six phantoms per style, from independent child generators: [(style, image, label, spacing)]."""
    return [(style, *S.make_patient(rng, style)) for i, style in enumerate(S.STYLES)
            for rng in np.random.default_rng(100 + i).spawn(6)]


def _slices_with(label, value):
    """Indices of the slices (axis 2) that contain the label value."""
    return np.flatnonzero((label == value).any(axis=(0, 1)))


@pytest.mark.parametrize("style", S.STYLES)
def test_deterministic_and_patients_differ(style):
    rng = np.random.default_rng(7)
    a, second = S.make_patient(rng, style), S.make_patient(rng, style)  # two consecutive patients
    b = S.make_patient(np.random.default_rng(7), style)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    other = S.make_patient(np.random.default_rng(8), style)
    for c in (second, other):
        assert c[0].shape != a[0].shape or not np.allclose(c[0], a[0])
        assert c[2] != a[2]


def test_types_labels_and_geometry(phantoms):
    shapes = set()
    for style, image, label, spacing in phantoms:
        geo = S.GEOMETRY[style]
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert np.isfinite(image).all()
        assert set(np.unique(label)) == {0, 1, 2, 3}  # every label in every patient
        n = image.shape[2]
        assert geo["slices"][0] <= n <= geo["slices"][1]
        assert geo["dxy"][0] <= spacing[0] == spacing[1] <= geo["dxy"][1]
        assert geo["dz"][0] <= spacing[2] <= geo["dz"][1]
        for size in image.shape[:2]:  # field of view in mm within the documented range (rounding: 1 voxel)
            assert geo["fov"][0] - spacing[0] <= size * spacing[0] <= geo["fov"][1] + spacing[0]
        shapes.add(image.shape)
    assert len(shapes) == len(phantoms)  # sizes vary per patient


def test_heart_only_between_apex_and_base(phantoms):
    for _, _, label, _ in phantoms:
        n = label.shape[2]
        t = (np.arange(n) + 0.5) / n
        heart = (label > 0).any(axis=(0, 1))
        outside = (t < S.APEX_T[0]) | (t > S.BASE_T[1])
        assert outside[0] and outside[-1]  # some bottom and some top slices lie outside every heart
        assert not heart[outside].any()
        assert heart[(t > S.APEX_T[1]) & (t < S.BASE_T[0])].all()  # and the heart is contiguous mid-stack


def test_lv_shrinks_to_a_myocardial_cap_and_rv_vanishes_first(phantoms):
    for _, _, label, _ in phantoms:
        lv, myo, rv = (_slices_with(label, S.LABELS[k]) for k in ("LV", "MYO", "RV"))
        assert myo[0] < lv[0]  # apical slices: myocardium closes into a cap without cavity
        assert myo[0] < rv[0]  # the RV ends above the lowest myocardium slice ...
        assert set(rv) <= set(myo) and rv[-1] == myo[-1]  # ... and only exists beside the LV
        area = (label == S.LABELS["LV"]).sum(axis=(0, 1))
        assert area[lv[-1]] > 2 * area[lv[0]]  # basal cavity much larger than the apical one
        assert np.all(np.diff(area[lv]) >= -0.05 * area.max())  # grows toward the base (up to pixelation)


def test_myocardium_encloses_lv_cavity(phantoms):
    for _, _, label, _ in phantoms:
        lv = label == S.LABELS["LV"]
        padded = np.pad(label, ((1, 1), (1, 1), (0, 0)))
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # 4-neighbours of every LV voxel
            neighbour = padded[1 + dx: padded.shape[0] - 1 + dx, 1 + dy: padded.shape[1] - 1 + dy]
            assert np.isin(neighbour[lv], (S.LABELS["LV"], S.LABELS["MYO"])).all()


def test_intensities_need_shapes_not_thresholds(phantoms):
    for style, image, label, _ in phantoms:
        lv, rv, myo = (np.median(image[label == S.LABELS[k]]) for k in ("LV", "RV", "MYO"))
        assert abs(lv - rv) < 0.25 * abs(lv)  # one blood pool: LV and RV alike (up to the bias field)
        assert lv > 1.5 * myo if style == "mri" else lv - myo > 80  # bright blood, darker muscle
        blood_bg = image[(label == 0) & (image > 0.8 * lv) & (image < 1.2 * lv)]
        assert blood_bg.size > 0.2 * (label == S.LABELS["LV"]).sum()  # blood-like background (vessels)
        if style == "ct":
            assert np.percentile(image, 1) < -700 and lv > 180  # air and lungs in HU, blood enhanced


def _canonical(path):
    """Array of a NIfTI file reordered from its affine to the phantom's axes (+x, +y, +z: R, A, S)."""
    image = nib.load(path)
    ornt = nib.orientations.io_orientation(image.affine)  # R, A, S is nibabel's identity orientation
    return nib.orientations.apply_orientation(np.asanyarray(image.dataobj), ornt), image


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "ds"
    start = time.perf_counter()
    returned = S.write_synthetic(out, patients=20, style="mri", seed=3)
    return out, returned, time.perf_counter() - start


def test_write_is_fast(written):
    assert written[2] < 30


def test_written_dataset_matches_make_patient(written):
    out, returned, _ = written
    assert returned == out
    meta = json.loads((out / "dataset.json").read_text())
    assert {"name", "description", "channel_names", "labels", "numTraining", "file_ending"} <= set(meta)
    assert meta["numTraining"] == 20 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3} and "seed=3" in meta["description"]
    cases = [f"syn_{i:03d}" for i in range(20)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    for case, rng in zip(cases[:8], np.random.default_rng(3).spawn(8)):  # patient i: i-th child generator
        image, label, spacing = S.make_patient(rng, "mri")
        saved_image, nii = _canonical(out / "imagesTr" / f"{case}_0000.nii.gz")
        saved_label, nii_label = _canonical(out / "labelsTr" / f"{case}.nii.gz")
        assert np.asanyarray(nii.dataobj).dtype == np.float32 and np.asanyarray(nii_label.dataobj).dtype == np.uint8
        assert np.array_equal(saved_image, image) and np.array_equal(saved_label, label)
        assert np.allclose(nii.header.get_zooms(), spacing) and np.array_equal(nii.affine, nii_label.affine)
        assert np.allclose(np.abs(nii.affine[:3, :3]), np.diag(spacing))  # axis-aligned, no permutation
    flips = np.array([np.diag(nib.load(out / "labelsTr" / f"{c}.nii.gz").affine)[:3] < 0 for c in cases])
    assert flips.any(axis=0).all() and not flips.all(axis=0).any()  # every axis stored both ways somewhere


def test_flip_axes_keeps_world_coordinates():
    rng = np.random.default_rng(0)
    values = rng.permutation(4 * 5 * 6).reshape(4, 5, 6)  # distinct values identify voxels
    affine = np.diag([1.5, 0.8, 7.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    for axes in ([], [0], [2], [0, 1], [0, 1, 2]):
        (flipped,), new = S.flip_axes([values], affine, axes)
        assert np.array_equal(np.diag(new)[:3] < 0, np.isin([0, 1, 2], axes))
        for index in np.ndindex(values.shape):  # plain loop from the definition
            moved = np.argwhere(flipped == values[index])[0]
            assert np.allclose(new @ [*moved, 1], affine @ [*index, 1])


def test_write_ct_channel(tmp_path):
    out = S.write_synthetic(tmp_path / "ct", patients=2, style="ct", seed=5)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    for case, rng in zip(("syn_000", "syn_001"), np.random.default_rng(5).spawn(2)):
        image, _, _ = S.make_patient(rng, "ct")
        assert np.array_equal(_canonical(out / "imagesTr" / f"{case}_0000.nii.gz")[0], image)


def test_rewrite_with_fewer_patients_removes_stale_cases(tmp_path):
    S.write_synthetic(tmp_path, patients=3, style="mri", seed=0)
    first = np.asanyarray(nib.load(tmp_path / "labelsTr" / "syn_000.nii.gz").dataobj)
    S.write_synthetic(tmp_path, patients=1, style="mri", seed=0)  # patient 0 does not depend on the count
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["syn_000.nii.gz"]
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "labelsTr" / "syn_000.nii.gz").dataobj), first)
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 1


@pytest.mark.parametrize("kwargs", [{"patients": 0}, {"patients": 2.5}, {"style": "xray"}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        S.write_synthetic(tmp_path, **kwargs)
    assert not (tmp_path / "dataset.json").exists()


def test_make_patient_rejects_unknown_style():
    with pytest.raises(ValueError):
        S.make_patient(np.random.default_rng(0), "pet")
