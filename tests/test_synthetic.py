"""Tests of the synthetic phantoms: cohort.py's parameters and knobs, anatomy.py's labelled anatomy,
synthetic.py's intensities and datasets (atomic, race-safe writing), and data.py's check of them."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import anatomy
import cohort
import data
import synthetic as S
from cohort import Difficulty
from layouts import LAYOUT_CLASSES

REPO = Path(__file__).resolve().parents[1]


def _phantom(rng, style, difficulty=Difficulty()):
    """make_patient's steps, keeping the parameters: (style, params, image, label, spacing)."""
    p = cohort.draw_patient(rng, style, difficulty)
    cls, spacing = anatomy.paint(p)
    return style, p, S.render(cls, p, rng), S.label_lut(style)[cls], spacing


@pytest.fixture(scope="module")
def phantoms():
    """Five phantoms per style, from independent child generators."""
    return [_phantom(rng, style) for i, style in enumerate(S.STYLES)
            for rng in np.random.default_rng(100 + i).spawn(5)]


def _slices_with(label, value):
    """Indices of the slices (axis 2) that contain the label value."""
    return np.flatnonzero((label == value).any(axis=(0, 1)))


def _neighbours(label, value):
    """Labels of the in-plane 4-neighbours of the voxels with this value, the value itself left out."""
    padded = np.pad(label, ((1, 1), (1, 1), (0, 0)))
    near = [padded[1 + dx: padded.shape[0] - 1 + dx, 1 + dy: padded.shape[1] - 1 + dy][label == value]
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    near = np.concatenate(near)
    return near[near != value]


# ------------------------------------------------------------------ cohort.py: parameters and knobs
@pytest.mark.parametrize("style", S.STYLES)
def test_parameters_lie_in_their_ranges_and_spread(style):
    patients = [cohort.draw_patient(rng, style) for rng in np.random.default_rng(1).spawn(200)]
    for name, (low, high, _) in cohort.ranges(style).items():
        values = np.array([p[name] for p in patients]).ravel()
        assert values.min() >= low and values.max() <= high, name
        assert values.max() - values.min() >= 0.5 * (high - low), name  # the spread is real


def test_docstring_table_states_the_ranges():
    rows = {m[0]: m[1:] for m in re.findall(r"^(\w+) +(\S+) +(\S+) +(variability|contrast) ", cohort.__doc__, re.M)}
    assert set(rows) == set(cohort.RANGES)
    for name, (mri, chd, knob) in cohort.RANGES.items():
        stated = [None if r == "-" else tuple(float(x) for x in r.split("..")) for r in rows[name][:2]]
        assert stated == [mri, chd] and rows[name][2] == knob, name
    for name, probabilities in cohort.ANOMALIES.items():
        assert re.search(rf"^{name} +{probabilities[0]:.2f} +{probabilities[1]:.2f} ".replace("0.00", "0"),
                         cohort.__doc__, re.M), name


@pytest.mark.parametrize("style", S.STYLES)
def test_knobs(style):
    table = cohort.ranges(style)
    same = [cohort.draw_patient(rng, style, Difficulty(variability=0, contrast=0, anomalies=0))
            for rng in np.random.default_rng(2).spawn(5)]
    for name, (low, high, _) in table.items():  # knobs at 0: every patient is the canonical one
        assert all(np.allclose(p[name], (low + high) / 2) for p in same), name
    assert all(p["anomalies"] == () for p in same)
    wide = [cohort.draw_patient(rng, style, Difficulty(variability=3, noise=2))
            for rng in np.random.default_rng(2).spawn(50)]
    scales = np.array([p["heart_scale"] for p in wide])
    assert scales.min() < table["heart_scale"][0] and scales.max() > table["heart_scale"][1]  # wider than the range
    assert scales.min() >= table["heart_scale"][0] / 4 and all(p["noise_gain"] == 2 for p in wide)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    cohort.draw_patient(a, style), cohort.draw_patient(b, style, Difficulty(0, 0, 0, 0))
    assert a.random() == b.random()  # the knobs never change which random numbers a patient uses
    with pytest.raises(ValueError):
        Difficulty(variability=-1)


class _Zeros:
    """A generator whose every draw is 0: each parameter at the low end of its (widened) range."""
    def random(self, size=None):
        return 0.0 if size is None else np.zeros(size)


@pytest.mark.parametrize("style", S.STYLES)
def test_a_range_starting_at_0_is_widened_below_0_unclamped(style):
    """Only ranges with a positive low end stop at a quarter of it: below, above, bias (low end 0) may go
    negative (a scan starting above the apex); at knobs 2 and every draw 0 each is centre - (high - low)."""
    p = cohort.draw_patient(_Zeros(), style, Difficulty(variability=2, contrast=2))
    zero_low = [name for name, (low, _, _) in cohort.ranges(style).items() if low == 0]
    assert set(zero_low) == ({"below", "above", "bias"} if style == "mri" else {"above"})
    for name in zero_low:
        high = cohort.ranges(style)[name][1]
        assert p[name] == pytest.approx(high / 2 - high) and p[name] < 0, name  # -15 mm for mri's below


@pytest.mark.parametrize("style", S.STYLES)
def test_anomalies_occur_at_their_frequencies(style):
    column = S.STYLES.index(style)
    for knob in (1.0, 2.0):
        drawn = [cohort.draw_patient(rng, style, Difficulty(anomalies=knob))["anomalies"]
                 for rng in np.random.default_rng(4).spawn(1500)]
        for name, probabilities in cohort.ANOMALIES.items():
            p = min(1.0, knob * probabilities[column])
            frequency = np.mean([name in a for a in drawn])
            assert abs(frequency - p) <= 4 * np.sqrt(p * (1 - p) / len(drawn)) + 1e-9, (name, knob)


# --------------------------------------------------------------------------- anatomy and images
@pytest.mark.parametrize("style", S.STYLES)
def test_deterministic_and_patients_differ(style):
    rng = np.random.default_rng(7)
    a, second = S.make_patient(rng, style), S.make_patient(rng, style)  # two consecutive patients
    b = S.make_patient(np.random.default_rng(7), style)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    for c in (second, S.make_patient(np.random.default_rng(8), style)):
        assert c[0].shape != a[0].shape or not np.allclose(c[0], a[0])
        assert c[2] != a[2]


def test_types_labels_and_geometry(phantoms):
    for style in S.STYLES:
        group = [ph for ph in phantoms if ph[0] == style]
        present = [set(np.unique(label).tolist()) for _, _, _, label, _ in group]
        assert set().union(*present) == set(S.LABELS[style].values())  # exactly the style's classes
        for value in S.LABELS[style].values():
            assert sum(value in labels for labels in present) >= len(group) - 1  # each class in most patients
    for style, p, image, label, spacing in phantoms:
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert np.isfinite(image).all()
        assert cohort.SLICES[style][0] <= image.shape[2] <= cohort.SLICES[style][1]
        assert spacing[0] == spacing[1] == p["dxy"] and spacing[2] > 0
        assert abs(image.shape[0] * spacing[0] - p["fov"]) <= spacing[0] and image.shape[0] == image.shape[1]
    assert len({ph[2].shape for ph in phantoms}) == len(phantoms)  # sizes vary per patient


def test_volumes_have_the_stated_slice_counts():
    """cohort.py: mri volumes of 10 to 20 slices, chd 20 to 36; longer scans are cut at the most (some reach it)."""
    for style, (low, high) in (("mri", (10, 20)), ("chd", (20, 36))):
        counts = [anatomy.paint(cohort.draw_patient(rng, style))[0].shape[2]
                  for rng in np.random.default_rng(100).spawn(12)]  # 12 draws: both styles reach their most
        assert low <= min(counts) and max(counts) == high, style


def test_the_noise_knob_multiplies_the_noise_std():
    """chd adds Gaussian noise of std noise * knob (HU) after the blur: the same patient at knobs 2 and 0
    differs by exactly that noise."""
    p = cohort.draw_patient(np.random.default_rng(6), "chd")
    quiet, loud = (S.make_patient(np.random.default_rng(6), "chd", Difficulty(noise=k))[0] for k in (0, 2))
    assert (loud - quiet).std() == pytest.approx(2 * p["noise"], rel=0.02)


def test_papillary_muscles_are_labelled_lv_as_in_acdc():
    p = cohort.draw_patient(np.random.default_rng(0), "mri", Difficulty(variability=0, anomalies=0))
    cls, _ = anatomy.paint(p)
    papillary = cls == anatomy.ID["papillary"]
    assert papillary.sum() > 0 and (S.label_lut("mri")[cls][papillary] == S.LABELS["mri"]["LV"]).all()


def test_values_with_a_positive_low_end_stop_at_a_quarter_of_it():
    """A knob widens a range about its centre; a value whose range starts above 0 never falls below a quarter
    of that start (at any knob), so no size or intensity turns negative."""
    patients = [cohort.draw_patient(rng, "mri", Difficulty(variability=100, contrast=100))
                for rng in np.random.default_rng(2).spawn(20)]
    for name, (low, high, _) in cohort.ranges("mri").items():
        if low > 0:
            assert np.concatenate([np.ravel(p[name]) for p in patients]).min() == pytest.approx(low / 4), name


def test_chd_labels_match_the_chd_layout():
    assert list(S.LABELS["chd"]) == LAYOUT_CLASSES["chd"] and list(S.LABELS["chd"].values()) == list(range(8))
    assert list(S.LABELS["mri"]) == LAYOUT_CLASSES["acdc"]


def test_myocardium_encloses_lv(phantoms):
    for style, p, _, label, _ in phantoms:
        names = {v: k for k, v in S.LABELS[style].items()}
        near = [names[v] for v in _neighbours(label, S.LABELS[style]["LV"])]
        allowed = {"MYO", "background"} if style == "mri" else {"MYO", "LA", "AO", "PA"}  # PA: swapped vessels
        allowed |= {"RV"} if "vsd" in p["anomalies"] else set()
        assert set(near) <= allowed and near.count("MYO") >= 0.85 * len(near)  # open only at the valves


def test_plausible_slice_ranges(phantoms):
    for style, p, _, label, _ in phantoms:
        k = {name: _slices_with(label, value) for name, value in S.LABELS[style].items() if value}
        assert k["MYO"][0] <= k["LV"][0]  # apical myocardial cap
        area = (label == S.LABELS[style]["LV"]).sum(axis=(0, 1))
        assert area[k["LV"][0]] < 0.5 * area.max()  # the cavity is small at the apex
        if style == "mri":
            assert k["MYO"][0] < k["RV"][0]  # the RV does not reach the apex
        else:  # atria and great vessels above the ventricles' lowest slices, the aorta everywhere
            assert k["LV"][0] < k["LA"][0] and k["LV"][0] < k["RA"][0] and k["LV"][0] < k["PA"][0]
            assert k["PA"][-1] > k["LV"][-1] and k["AO"][-1] > k["LV"][-1] and len(k["AO"]) > 0.6 * label.shape[2]


def test_volume_axes_are_those_the_docstrings_state(phantoms):
    """mri: axis 2 runs along the LV long axis (each heart tilted away from the canonical one by up to ~20 deg),
    not toward the head, which is 50 deg off it (chd's axis 2). Both: the RV lies to the right (axis 0) and in
    front (axis 1) of the LV."""
    for style, _, _, label, spacing in phantoms:
        lv = np.isin(label, [S.LABELS[style]["LV"], S.LABELS[style]["MYO"]])
        points = np.argwhere(lv) * np.array(spacing)  # (voxels, 3) in mm
        points -= points.mean(axis=0)
        long_axis = np.linalg.eigh(points.T @ points)[1][:, -1]  # the principal axis of the LV
        angle = np.degrees(np.arccos(abs(long_axis[2])))  # between it and axis 2
        assert angle < 25 if style == "mri" else angle > 35, (style, angle)
        centre = lambda name: (np.argwhere(label == S.LABELS[style][name]) * np.array(spacing)).mean(axis=0)
        assert (centre("RV")[:2] > centre("LV")[:2]).all(), style


def test_vsd_opens_the_septum():
    for anomalies in (0.0, 10.0):  # none, or every chd anomaly (a VSD among them)
        _, p, _, label, _ = _phantom(np.random.default_rng(9), "chd", Difficulty(anomalies=anomalies))
        touching = (_neighbours(label, S.LABELS["chd"]["LV"]) == S.LABELS["chd"]["RV"]).any()
        assert touching == ("vsd" in p["anomalies"]) and ("vsd" in p["anomalies"]) == (anomalies > 0)


def _chd_stub(**changes):
    """A chd patient's parameters: the canonical one (knobs 0), heart and vessels of scale 1, no tilt, spin or
    rotation, a scan from 10 mm below the apex to 10 mm above the arch, no anomaly; then these changes."""
    p = cohort.draw_patient(np.random.default_rng(0), "chd", Difficulty(0, 0, 0, 0))
    p.update(heart_scale=1.0, body_scale=1.0, lv_length=1.0, vessel_size=1.0, below=10.0, above=10.0, anomalies=())
    return {**p, **changes}


def _chd_stub_span(below=10.0, above=10.0):
    """The stub's planned coverage s1 - s0 (mm): apex 85 x 0.643 mm below the base (APEX_DIR's z) minus below,
    up to the arch top 60 (ASC_TOP) + 18 (arch) + 13 (aortic radius) mm above the base plus above."""
    return 85 * 0.643 + below + 60 + 18 + 13 + above


def test_the_slice_count_is_the_coverage_over_dz_rounded_to_the_nearest():
    """N = round(extent / dz) (cohort.py), not its floor: 165.655 / 6 = 27.6 slices make 28."""
    cls, _ = anatomy.paint(_chd_stub(dz=6.0, fov=40.0, dxy=2.0))
    assert _chd_stub_span() / 6 == pytest.approx(27.61, abs=0.01) and cls.shape[2] == 28


@pytest.mark.parametrize("dz, slices", [(6.0, 28), (4.0, 36)])  # 4 mm: 41.4 slices, cut at chd's most (36)
def test_the_slices_span_exactly_the_planned_coverage(dz, slices):
    """The returned slice spacing is the coverage over N, so N slices cover s0..s1 even when N is clipped."""
    cls, spacing = anatomy.paint(_chd_stub(dz=dz, fov=40.0, dxy=2.0))
    assert cls.shape[2] == slices and cls.shape[2] * spacing[2] == pytest.approx(_chd_stub_span())


def test_slice_centres_lie_half_a_slice_inside_the_coverage():
    """Slice k is centred at s0 + (k + 0.5) dz: read off the spine, whose intervertebral discs (muscle) are
    at heights z with z % 28 < 5 mm (marrow elsewhere); chd slices are axial with z = 0 at the LV base."""
    below = 14.5  # no slice centre within 0.5 mm of a disc's edge (a half-slice shift moves 4 of the 5 discs)
    p = _chd_stub(below=below, dz=6.0, fov=42.0, dxy=2.0, shift_x=35.0, shift_y=-93.0)  # spine (0, -45) in the middle
    cls, (_, _, dz) = anatomy.paint(p)
    column = cls[10, 10]  # the middle of the 21 x 21 grid: the vertebral body's centre (within 1 mm)
    centres = -85 * 0.643 - below + (np.arange(len(column)) + 0.5) * dz
    assert set(column.tolist()) == {anatomy.ID["muscle"], anatomy.ID["marrow"]}
    assert np.array_equal(np.flatnonzero(column == anatomy.ID["muscle"]), np.flatnonzero(centres % 28 < 5))


def test_a_swapped_vessels_patient_has_its_aorta_where_the_pa_was():
    """Transposition swaps the great vessels' origins: the swapped aorta starts at the pulmonary valve, over
    voxels that are PA without the anomaly, and the PA at the aortic valve, over the plain one's aorta."""
    ao, pa = anatomy.ID["ao"], anatomy.ID["pa"]
    plain = anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0))[0]
    swapped = anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0, anomalies=("swapped_vessels",)))[0]
    assert ((swapped == ao) & (plain == pa)).sum() > 50 and ((swapped == pa) & (plain == ao)).sum() > 50


def test_small_pa_shrinks_only_the_pa_and_small_ao_spares_it():
    """small_pa halves the PA radius (a quarter of its cross-section) and leaves the aorta voxel for voxel;
    small_ao leaves the PA's radius alone (its smaller aorta covers less of the PA, if anything)."""
    ao, pa = anatomy.ID["ao"], anatomy.ID["pa"]
    plain, small_pa, small_ao = (anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0, anomalies=an))[0]
                                 for an in ((), ("small_pa",), ("small_ao",)))
    assert np.array_equal(small_pa == ao, plain == ao)
    assert (small_pa == pa).sum() < 0.4 * (plain == pa).sum()
    assert (small_ao == ao).sum() < 0.5 * (plain == ao).sum() and (small_ao == pa).sum() >= (plain == pa).sum()


@pytest.mark.parametrize("style", S.STYLES)
def test_scan_coverage_moves_the_apex_position(style):
    def apex_positions(difficulty, patients):
        positions = []
        for rng in np.random.default_rng(5).spawn(patients):
            label = S.label_lut(style)[anatomy.paint(cohort.draw_patient(rng, style, difficulty))[0]]
            positions.append((_slices_with(label, S.LABELS[style]["LV"])[0] + 1) / label.shape[2])
        return np.array(positions)
    assert apex_positions(Difficulty(), 10).std() > 0.05
    assert apex_positions(Difficulty(variability=0, anomalies=0), 3).std() < 0.01


def test_intensities_need_shapes_not_thresholds(phantoms):
    for style, p, image, label, _ in phantoms:
        lv, rv, myo = (np.median(image[label == S.LABELS[style][k]]) for k in ("LV", "RV", "MYO"))
        blood_bg = image[(label == 0) & (image > 0.8 * lv) & (image < 1.2 * lv)]
        assert blood_bg.size > 0.2 * (label == S.LABELS[style]["LV"]).sum()  # blood-like background (vessels)
        if style == "mri":
            assert abs(lv - rv) < 0.25 * abs(lv) and lv > 1.5 * myo  # one bright blood pool, darker muscle
        else:  # HU as drawn: left and right heart blood differ by the bolus ratio
            assert abs(lv - p["blood"]) < 25 and abs(rv - p["blood"] * p["bolus"]) < 25 and abs(myo - p["myo"]) < 25
            assert np.percentile(image, 1) < -700  # air and lungs


def test_make_patient_rejects_unknown_style():
    with pytest.raises(ValueError):
        S.make_patient(np.random.default_rng(0), "pet")


# -------------------------------------------------------------------------------------- datasets
def _canonical(path):
    """Array of a NIfTI file reordered from its affine to the phantom's axes (+x, +y, +z: R, A, S)."""
    image = nib.load(path)
    ornt = nib.orientations.io_orientation(image.affine)  # R, A, S is nibabel's identity orientation
    return nib.orientations.apply_orientation(np.asanyarray(image.dataobj), ornt), image


def test_written_dataset_matches_make_patient(tmp_path):
    out = tmp_path / "ds"
    assert S.write_synthetic(out, patients=8, style="mri", seed=3) == out
    meta = json.loads((out / "dataset.json").read_text())
    assert {"name", "description", "channel_names", "labels", "numTraining", "file_ending"} <= set(meta)
    assert meta["numTraining"] == 8 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert "seed=3" in meta["description"] and "variability=1.0" in meta["description"]
    assert meta["synthetic"]["style"] == "mri" and S.is_current(out, 8, "mri", 3)
    cases = [f"syn_{i:03d}" for i in range(8)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    for case, rng in zip(cases[:3], np.random.default_rng(3).spawn(3)):  # patient i: i-th child generator
        image, label, spacing = S.make_patient(rng, "mri")
        saved_image, nii = _canonical(out / "imagesTr" / f"{case}_0000.nii.gz")
        saved_label, nii_label = _canonical(out / "labelsTr" / f"{case}.nii.gz")
        assert np.asanyarray(nii.dataobj).dtype == np.float32 and np.asanyarray(nii_label.dataobj).dtype == np.uint8
        assert np.array_equal(saved_image, image) and np.array_equal(saved_label, label)
        assert np.allclose(nii.header.get_zooms(), spacing) and np.array_equal(nii.affine, nii_label.affine)
        assert np.allclose(np.abs(nii.affine[:3, :3]), np.diag(spacing))  # axis-aligned, no permutation
    flips = np.array([np.diag(nib.load(out / "labelsTr" / f"{c}.nii.gz").affine)[:3] < 0 for c in cases])
    assert flips.any(axis=0).all() and not flips.all(axis=0).any()  # every axis stored both ways somewhere


def test_chd_dataset_passes_the_check(tmp_path, capsys):
    out = S.write_synthetic(tmp_path / "chd", patients=3, style="chd", seed=5, difficulty=Difficulty(noise=0.5))
    meta = json.loads((out / "dataset.json").read_text())
    assert list(meta["labels"]) == LAYOUT_CLASSES["chd"] and meta["channel_names"] == {"0": "CT"}
    assert "noise=0.5" in meta["description"] and meta["synthetic"]["noise"] == 0.5
    image, _, _ = S.make_patient(np.random.default_rng(5).spawn(1)[0], "chd", Difficulty(noise=0.5))
    assert np.array_equal(_canonical(out / "imagesTr" / "syn_000_0000.nii.gz")[0], image)
    with pytest.raises(SystemExit) as done:  # python data.py check OUT
        data.main(["check", str(out)])
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed
    counts = dict(re.findall(r"(\w+) (\d+) \(", printed.split("label voxels")[1]))
    assert list(counts) == LAYOUT_CLASSES["chd"] and all(int(n) > 0 for n in counts.values())  # 7 foreground


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


def test_rewrite_replaces_an_earlier_dataset(tmp_path):
    S.write_synthetic(tmp_path, patients=3, style="mri", seed=0)
    first = np.asanyarray(nib.load(tmp_path / "labelsTr" / "syn_000.nii.gz").dataobj)
    S.write_synthetic(tmp_path, patients=1, style="mri", seed=0)  # patient 0 does not depend on the count
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["syn_000.nii.gz"]
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "labelsTr" / "syn_000.nii.gz").dataobj), first)
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 1
    assert [p.name for p in tmp_path.parent.iterdir() if ".tmp-" in p.name] == []  # no temporary folder left


def test_refuses_a_folder_that_is_not_synthetic(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        S.write_synthetic(tmp_path, patients=1)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit) as refused:  # python data.py make-synthetic OUT: a one-line error
        data.main(["make-synthetic", str(tmp_path), "--patients", "1"])
    assert str(refused.value.code).startswith("error: ") and "not a synthetic dataset" in str(refused.value.code)
    assert "\n" not in str(refused.value.code)


def _tiny_patient(rng, style, difficulty=Difficulty()):
    """make_patient's stand-in where the dataset's writing, not the phantom, is tested: a 2 x 2 x 1 volume."""
    return np.zeros((2, 2, 1), np.float32), np.zeros((2, 2, 1), np.uint8), (1.0, 1.0, 1.0)


def test_a_current_dataset_is_not_generated_again(tmp_path, monkeypatch):
    """write_synthetic on a dataset it already wrote (same arguments) returns at once: no patient is drawn."""
    calls = []
    monkeypatch.setattr(S, "make_patient", lambda *args: calls.append(args) or _tiny_patient(*args))
    S.write_synthetic(tmp_path / "ds", patients=2, style="mri", seed=0)
    assert len(calls) == 2
    S.write_synthetic(tmp_path / "ds", patients=2, style="mri", seed=0)
    assert len(calls) == 2


def test_a_dataset_another_writer_finished_meanwhile_is_kept(tmp_path, monkeypatch):
    """When another writer swaps in the same dataset while we generate, the first one wins: ours is discarded
    and theirs stays in place (the same files), so readers of theirs are not disturbed."""
    out, theirs = tmp_path / "ds", tmp_path / "theirs"
    monkeypatch.setattr(S, "make_patient", _tiny_patient)
    S.write_synthetic(theirs, patients=2, style="mri", seed=0)  # the other writer's finished copy
    inode = (theirs / "dataset.json").stat().st_ino

    def meanwhile(*args):
        if theirs.exists():
            theirs.rename(out)  # the other writer's swap, during our first patient
        return _tiny_patient(*args)
    monkeypatch.setattr(S, "make_patient", meanwhile)
    assert S.write_synthetic(out, patients=2, style="mri", seed=0) == out
    assert (out / "dataset.json").stat().st_ino == inode and S.is_current(out, 2, "mri", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # our copy is gone


def test_a_folder_holding_another_nnunet_dataset_is_refused_and_left_intact(tmp_path, monkeypatch):
    """A dataset.json that synthetic.py did not write (a real nnU-Net dataset) makes the folder someone's
    data: write_synthetic raises and every file stays byte for byte, none is deleted."""
    monkeypatch.setattr(S, "make_patient", _tiny_patient)
    out = tmp_path / "Dataset004_LA"
    files = {"dataset.json": json.dumps({"name": "LA", "description": "left atrium MRI", "labels": {"background": 0,
                                         "LA": 1}, "channel_names": {"0": "MRI"}, "numTraining": 1,
                                         "file_ending": ".nii.gz"}).encode(),
             "imagesTr/la_003_0000.nii.gz": b"image bytes", "labelsTr/la_003.nii.gz": b"label bytes"}
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    with pytest.raises(FileExistsError):
        S.write_synthetic(out, patients=1)
    assert {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset004_LA"]


def test_a_thousand_patients_are_named_with_three_digits_and_1001_with_four(tmp_path, monkeypatch):
    """Case names have as many digits as the largest index needs, at least 3: syn_000..syn_999 for 1000."""
    saved = []
    monkeypatch.setattr(S, "make_patient", _tiny_patient)
    monkeypatch.setattr(S, "_save", lambda array, affine, path: saved.append(Path(path).name))
    for patients, first, last in ((1000, "syn_000", "syn_999"), (1001, "syn_0000", "syn_1000")):
        saved.clear()
        S.write_synthetic(tmp_path / str(patients), patients=patients, style="mri", seed=0)
        labels = saved[1::2]  # image, label, image, ...
        assert labels[0] == f"{first}.nii.gz" and labels[-1] == f"{last}.nii.gz" and saved[0] == f"{first}_0000.nii.gz"
        assert len(set(labels)) == patients and len({len(name) for name in labels}) == 1


@pytest.mark.parametrize("kwargs", [{"patients": 0}, {"patients": 2.5}, {"style": "ct"}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        S.write_synthetic(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


WRITE = ("import sys, synthetic; "
         "synthetic.write_synthetic(sys.argv[1], patients=int(sys.argv[3]), style='mri', seed=int(sys.argv[2]))")


def test_concurrent_writers_of_one_dataset(tmp_path):
    out = tmp_path / "ds"
    for seed in (0, 1, 1):  # a new dataset, a replaced one, an already complete one
        writers = [subprocess.Popen([sys.executable, "-c", WRITE, str(out), str(seed), "2"], cwd=REPO,
                                    stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for writer in writers:
            assert writer.wait() == 0, writer.stderr.read()
        assert S.is_current(out, 2, "mri", seed) and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
        for case, rng in zip(("syn_000", "syn_001"), np.random.default_rng(seed).spawn(2)):
            assert np.array_equal(_canonical(out / "labelsTr" / f"{case}.nii.gz")[0], S.make_patient(rng, "mri")[1])


def test_killed_writer_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "ds"
    writer = subprocess.Popen([sys.executable, "-c", WRITE, str(out), "0", "50"], cwd=REPO)
    while not list(tmp_path.glob("ds.tmp-*/imagesTr/*")) and writer.poll() is None:
        time.sleep(0.05)  # until it writes its first volume
    writer.kill(), writer.wait()
    assert not out.exists() and len(list(tmp_path.glob("ds.tmp-*"))) == 1  # only its private folder
    live = tmp_path / f"ds.tmp-{os.getpid()}-abcdef"  # a live writer's folder (ours) is kept
    live.mkdir()
    S.write_synthetic(out, patients=1, style="mri", seed=0)  # the next writer removes the dead one's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", live.name] and S.is_current(out, 1, "mri", 0)
    old = tmp_path / "ds.tmp-999999999-abcdef-old"  # a writer killed after its swap: OUT current, its old copy left
    (old / "imagesTr").mkdir(parents=True)
    S.write_synthetic(out, patients=1, style="mri", seed=0)  # current: nothing to write, but the copy goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", live.name]


def test_only_the_folders_of_dead_or_day_old_writers_are_removed(tmp_path):
    """A writer's folder is ds.tmp-PID-XXXXXX: it goes when PID is gone, or when it is a day old (the PID then
    belongs to another process); a live writer's, and anything not named like a writer's, stay."""
    day_old = tmp_path / f"ds.tmp-{os.getpid()}-abcdef"  # a live PID (ours), but two days old: reused
    day_old.mkdir()
    os.utime(day_old, (time.time() - 2 * 86400,) * 2)
    live, foreign = tmp_path / f"ds.tmp-{os.getpid()}-123456", tmp_path / "ds.tmp-notes"
    live.mkdir(), foreign.mkdir()
    S.write_synthetic(tmp_path / "ds", patients=1, style="mri", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", live.name, foreign.name])


def test_a_named_dataset_s_first_use_after_a_killed_rewrite_removes_its_old_copy(tmp_path, monkeypatch, capsys):
    """data/NAME is current, and beside it the old copy a rewrite killed after its swap left: data.py's use of
    the name (not only write_synthetic) removes the copy, and says nothing of generating."""
    monkeypatch.setattr(data, "REPO", tmp_path)
    monkeypatch.setitem(data.SYNTHETIC, "tiny-named", ("mri", 1, 0, {}))
    folder = data.resolve_data("tiny-named")
    assert "generating synthetic dataset 'tiny-named'" in capsys.readouterr().out
    old = folder.with_name("tiny-named.tmp-999999999-abcdef-old")
    (old / "imagesTr").mkdir(parents=True)
    assert data.resolve_data("tiny-named") == folder and not old.exists() and capsys.readouterr().out == ""


def test_make_synthetic_writes_the_dataset_its_flags_ask_for(tmp_path, capsys):
    """python data.py make-synthetic OUT --style chd --seed 4 --contrast 0.7 --noise 0.5 --anomalies 2: the
    dataset written records (and is) exactly those, each knob in its own field."""
    data.main(["make-synthetic", str(tmp_path / "out"), "--patients", "1", "--style", "chd", "--seed", "4",
               "--variability", "1.2", "--contrast", "0.7", "--noise", "0.5", "--anomalies", "2"])
    assert capsys.readouterr().out.startswith("wrote 1 chd patients (")
    knobs = Difficulty(variability=1.2, contrast=0.7, noise=0.5, anomalies=2.0)
    assert S.is_current(tmp_path / "out", 1, "chd", 4, knobs)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert {k: meta["synthetic"][k] for k in ("style", "patients", "seed", "variability", "contrast", "noise", "anomalies")} \
        == {"style": "chd", "patients": 1, "seed": 4, "variability": 1.2, "contrast": 0.7, "noise": 0.5, "anomalies": 2.0}
    image, _, _ = S.make_patient(np.random.default_rng(4).spawn(1)[0], "chd", knobs)
    assert np.array_equal(_canonical(tmp_path / "out" / "imagesTr" / "syn_000_0000.nii.gz")[0], image)


def test_the_phantom_figure_replaces_an_old_one_and_follows_its_flags(tmp_path, saved_figures, capsys):
    """python synthetic.py --figure OLD.png --patients 1 --seed 5: rewrites the existing figure, one row per style
    of the patient drawn from seed 5, each column the slice whose position (k + 1) / N is nearest the column's."""
    old = tmp_path / "synthetic.png"
    old.write_bytes(b"an older figure")
    S.main(["--figure", str(old), "--patients", "1", "--seed", "5"])
    assert old.read_bytes()[:4] == b"\x89PNG" and capsys.readouterr().out == f"wrote {old}\n"
    axes = np.array([ax for ax in saved_figures["synthetic.png"].axes if ax.get_images()]).reshape(-1, 7)  # (rows, 7 positions)
    assert len(axes) == len(S.STYLES)
    for row, style in zip(axes, S.STYLES):
        n = S.paint(S.draw_patient(np.random.default_rng(5).spawn(1)[0], style))[0].shape[2]  # N
        assert row[0].get_ylabel().startswith(f"{style.upper()}, N = {n}\n")
        for ax, position in zip(row, (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)):
            shown = float(ax.get_title().split("= ")[1])
            assert abs(shown - position) <= 0.5 / n + 0.005, (style, ax.get_title(), position)


# ------------------------------------- the phantom's labels, intensities, knobs and anatomy, by hand
@pytest.mark.parametrize("style", S.STYLES)
def test_make_patient_s_label_is_the_painted_anatomy_of_its_image(style):
    """make_patient's label map is the labelled anatomy of the same patient's parameters, voxel for voxel
    (not shifted a slice), and in chd, without noise, its LV voxels read the drawn blood HU."""
    image, label, spacing = S.make_patient(np.random.default_rng(11), style, Difficulty(noise=0))
    p = cohort.draw_patient(np.random.default_rng(11), style, Difficulty(noise=0))  # the same first draws
    cls, painted_spacing = anatomy.paint(p)
    assert spacing == painted_spacing and label.shape == image.shape == cls.shape
    for name, value in S.LABELS[style].items():
        structures = [s for s, (label_name, _) in anatomy.STRUCTURES.items() if label_name == name]
        if value:
            assert np.array_equal(label == value, np.isin(cls, [anatomy.ID[s] for s in structures])), name
    if style == "chd":  # LV cavity voxels away from the wall (not blurred by the partial-volume filter)
        lv = (cls == anatomy.ID["lv"])
        inner = lv & np.roll(lv, 1, 0) & np.roll(lv, -1, 0) & np.roll(lv, 1, 1) & np.roll(lv, -1, 1)
        assert (label[inner] == S.LABELS["chd"]["LV"]).all()
        ratio = image[inner] / p["blood"]  # texture: +-4 % per unit of a unit-std field
        assert abs(np.median(ratio) - 1) < 0.01 and np.mean(np.abs(ratio - 1) < 0.12) > 0.99


def test_the_texture_is_a_smooth_field_of_unit_std():
    """_texture: coarse noise upsampled and blurred, rescaled to std 1, so tissue varies by +-4 % per unit and
    lung vessels (texture > 1.6) cover about 5 % of the lungs (a unit Gaussian's tail beyond 1.6: 5.5 %)."""
    field = S._texture(np.random.default_rng(0), (96, 80, 12))
    assert field.shape == (96, 80, 12) and field.std() == pytest.approx(1, rel=1e-4)
    assert 0.02 < (field > 1.6).mean() < 0.10
    assert np.corrcoef(field[1:].ravel(), field[:-1].ravel())[0, 1] > 0.9  # smooth in-plane


def test_the_bias_field_strength_is_the_bias_parameter():
    """mri: the image is multiplied by exp(a smooth polynomial) whose coefficients scale with p["bias"]: with no
    noise and the same random numbers, log(image at bias b / image at bias 0) doubles when b does, and at
    b = 0.25 it varies by several percent across the volume."""
    p = cohort.draw_patient(np.random.default_rng(4), "mri")
    cls, _ = anatomy.paint(p)
    body = cls != anatomy.ID["air"]
    images = {b: S.render(cls, {**p, "bias": b, "noise_gain": 0.0}, np.random.default_rng(5)) for b in (0, 0.125, 0.25)}
    half, full = (np.log(images[b][body] / images[0][body]) for b in (0.125, 0.25))
    np.testing.assert_allclose(full, 2 * half, atol=1e-4)
    assert full.std() > 0.03


@pytest.mark.parametrize("style", S.STYLES)
def test_each_knob_scales_only_its_own_ranges(style):
    """variability 0, contrast 1: anatomy, pose and geometry at their centres, intensities spread; and the reverse.
    (mri's tissue centre: 1.0; chd's bolus centre: 1.0; noise centre mri 0.0325.)"""
    table = cohort.ranges(style)
    for frozen, knobs in (("variability", dict(variability=0)), ("contrast", dict(contrast=0))):
        patients = [cohort.draw_patient(rng, style, Difficulty(**knobs)) for rng in np.random.default_rng(2).spawn(20)]
        for name, (low, high, knob) in table.items():
            values = np.array([np.ravel(p[name]) for p in patients])
            if knob == frozen:
                assert np.allclose(values, (low + high) / 2), (frozen, name)
            else:
                assert values.max() - values.min() > 0.3 * (high - low), (frozen, name)
    assert cohort.draw_patient(np.random.default_rng(0), "mri", Difficulty(contrast=0))["noise"] == pytest.approx(0.0325)


@pytest.mark.parametrize("knob", ["variability", "contrast", "noise", "anomalies"])
def test_an_infinite_or_negative_knob_is_refused(knob):
    """The knobs are finite numbers >= 0: inf would make every range infinite (NaN voxels), NaN likewise."""
    for bad in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ValueError, match=f"difficulty knob {knob} must be a finite number"):
            Difficulty(**{knob: bad})
    assert getattr(Difficulty(**{knob: 1e6}), knob) == 1e6


@pytest.mark.parametrize("anomaly, r_lv, length, wall", [
    ((), 24, 85, 9), (("thick_wall",), 24 * 0.8, 85, 9 * 1.6), (("dilated_lv",), 24 * 1.3, 85 * 1.1, 9 * 0.75),
    (("single_ventricle",), 24 * 1.25, 85, 9)])
def test_the_lv_cavity_is_the_half_ellipsoid_each_anomaly_sizes(anomaly, r_lv, length, wall):
    """The LV cavity (blood and papillary muscles) is half a prolate ellipsoid of radius r_lv and length L - wall
    below the base: 2/3 pi r_lv^2 (L - wall) mm^3, with the anomaly's factors (cohort.py's table) applied to the
    canonical 24, 85 and 9 mm. Hypertrophy: 54.5 ml instead of 91.7; a single ventricle leaves a rudimentary RV."""
    cls, spacing = anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0, anomalies=anomaly))
    cavity = np.isin(cls, [anatomy.ID["lv"], anatomy.ID["papillary"]]).sum() * np.prod(spacing)
    assert cavity == pytest.approx(2 / 3 * np.pi * r_lv ** 2 * (length - wall), rel=0.03)
    if anomaly == ("single_ventricle",):  # RV width beyond the septum x 0.4: well under the plain RV
        plain, _ = anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0))
        assert (cls == anatomy.ID["rv"]).sum() < 0.6 * (plain == anatomy.ID["rv"]).sum()


def test_the_valve_plane_leaves_the_mitral_and_aortic_valves_open():
    """The myocardial valve plane closes the LV base except at its two valves: the LV cavity touches the LA
    (mitral valve) and the aorta (aortic valve) in-plane, and touches neither the RV nor the PA (no VSD,
    no transposition)."""
    cls, _ = anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0))
    near = set(_neighbours(cls, anatomy.ID["lv"]).tolist())
    assert {anatomy.ID["la"], anatomy.ID["ao"]} <= near
    assert not near & {anatomy.ID["rv"], anatomy.ID["pa"]}


def test_two_papillary_muscles_of_the_stated_size():
    """Two papillary muscles, each a rod of radius 0.18 x the cavity radius inner(c) = 24 sqrt(1 - ((c - L)/(L - wall))^2)
    from c = 0.3 L to 0.85 L (L 85, wall 9 mm): 2 pi 0.18^2 24^2 x 76 x [t - t^3/3] from t = -0.783 to -0.168,
    about 4070 mm^3 together (one alone would be half)."""
    cls, spacing = anatomy.paint(_chd_stub(dz=6.0, fov=120.0, dxy=2.0))
    t0, t1 = (0.3 * 85 - 85) / 76, (0.85 * 85 - 85) / 76
    expected = 2 * np.pi * 0.18 ** 2 * 24 ** 2 * 76 * ((t1 - t1 ** 3 / 3) - (t0 - t0 ** 3 / 3))
    assert expected == pytest.approx(4070, rel=0.01)
    assert (cls == anatomy.ID["papillary"]).sum() * np.prod(spacing) == pytest.approx(expected, rel=0.06)


def test_dilation_grows_a_pixel_into_a_diamond_in_plane():
    """_dilate by `steps` with the 4-neighbourhood: one pixel becomes the diamond |dx| + |dy| <= steps
    (5 pixels for 1 step, 13 for 2), in every slice, and never across slices."""
    mask = np.zeros((9, 9, 3), bool)
    mask[4, 4, 1] = True
    for steps, count in ((1, 5), (2, 13)):
        grown = anatomy._dilate(mask, steps)
        dx, dy = np.abs(np.arange(9) - 4)[:, None], np.abs(np.arange(9) - 4)[None, :]
        assert np.array_equal(grown[:, :, 1], dx + dy <= steps) and grown[:, :, 1].sum() == count
        assert not grown[:, :, 0].any() and not grown[:, :, 2].any()
