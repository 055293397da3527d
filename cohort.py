"""cohort.py: how the synthetic patients differ from each other, and by how much.

Real cohorts are hard because patients differ: the heart sits at another place and angle, has another
size and shape, is malformed in congenital heart disease (CHD); scans start and stop at other levels, so
one normalized slice position p is not the same anatomy in every patient; contrast, noise and resolution
vary. draw_patient() draws all of it for one patient as a dict (cheap: no voxel is painted); anatomy.py
paints the dict, synthetic.py images it. Each parameter is uniform in its range below; the four knobs of a
Difficulty scale the ranges:

    variability  spread of every anatomy, pose, coverage and imaging-geometry range around its centre:
                 0 = every patient is the canonical average one, 1 = the ranges below, > 1 wider (values
                 of a range with a positive low end stay above a quarter of it)
    contrast     spread of the intensity ranges (tissue contrast, blood enhancement, bolus, bias, noise level)
    noise        multiplier of the noise standard deviation
    anomalies    multiplier of the anomaly probabilities (capped at 1)

parameter    mri          chd         knob         what it models
rotation     -15..15      -15..15     variability  in-plane rotation of the patient on the table (deg)
shift_x      -20..20      -20..20     variability  heart position in the field of view, left-right (mm)
shift_y      -20..20      -20..20     variability  heart position in the field of view, front-back (mm)
tilt_x       -12..12      -12..12     variability  tilt of the heart's long axis about the left-right axis (deg) and
tilt_y       -12..12      -12..12     variability    about the front-back axis: the heart drifts across slices
spin         -15..15      -15..15     variability  turn of the heart about the head-feet axis (deg)
heart_scale  0.8..1.25    0.8..1.25   variability  size of the heart and great vessels (x a canonical adult's)
body_scale   0.9..1.2     0.9..1.2    variability  chest width and depth relative to the heart
fat          5..20        5..20       variability  subcutaneous fat (mm)
lv_size      0.85..1.15   0.85..1.15  variability  LV cavity radius (x 24 mm)
lv_length    0.9..1.1     0.9..1.1    variability  LV length from apex to base (x 85 mm)
wall         0.8..1.2     0.8..1.2    variability  LV wall thickness (x 9 mm)
rv_size      0.8..1.25    0.8..1.25   variability  RV width beyond the septum (x 18 mm) and how far it wraps the LV
la_size      0.8..1.25    0.8..1.25   variability  LA radii (x 30, 17, 19 mm)
ra_size      0.8..1.25    0.8..1.25   variability  RA radii (x 20, 22, 28 mm)
vessel_size  0.85..1.15   0.85..1.15  variability  aorta and pulmonary artery radii (x 13 and 11 mm)
below        0..30        5..60       variability  the scan starts this far below the LV apex (mm)
above        0..30        0..50       variability  ... and stops this far above the LV base (mri) / the arch (chd)
dz           6.5..10      5.5..8.5    variability  slice spacing aimed at (mm): N = extent / dz, in 10..20 / 20..36
dxy          1.3..1.9     1.25..1.45  variability  in-plane pixel size (mm)
fov          220..290     180..260    variability  in-plane field of view, each axis (mm)
tissue       0.85..1.15   -15..15     contrast     intensity of each tissue (one draw each): mri factor, chd HU offset
blood        -            150..500    contrast     blood pool of the left heart and the aorta (HU)
bolus        -            0.6..1.4    contrast     right / left heart blood: > 1 early phase, right heart brighter
myo          -            80..140     contrast     myocardium (HU)
bias         0..0.25      -           contrast     strength of the smooth multiplicative bias field
noise        0.015..0.05  8..30       contrast     noise std (mri: Rician, blood = 0.9; chd: HU), times the noise knob

anomaly           mri    chd    what it models
rv_dilation       0.10   0.25   RV width and wrap x 1.5 (volume or pressure overload, ACDC's abnormal RV)
vsd               0      0.25   ventricular septal defect: a hole in the septum, LV and RV blood pools touch
swapped_vessels   0      0.15   transposition: the aorta leaves the RV in front, the pulmonary trunk the LV
small_ao          0      0.10   hypoplastic aorta (radius x 0.55)
small_pa          0      0.15   hypoplastic pulmonary arteries (radius x 0.5)
single_ventricle  0      0.08   rudimentary RV (x 0.4) beside an enlarged LV (radius x 1.25)
dilated_lv        0.15   0.05   dilated cardiomyopathy: LV radius x 1.3, length x 1.1, wall x 0.75
thick_wall        0.15   0      hypertrophy: LV wall x 1.6, cavity radius x 0.8
Anomalies are drawn independently (a patient may have several); anatomy.py applies their effects.
"""
from dataclasses import dataclass, asdict

import numpy as np

STYLES = ("mri", "chd")
TISSUES = ("air", "fat", "muscle", "lung", "liver", "bone", "marrow", "fluid", "myocardium", "blood")
SLICES = {"mri": (10, 20), "chd": (20, 36)}  # slices per volume
_V, _C = "variability", "contrast"
# name: (mri range or None, chd range or None, knob); the docstring's table says what each models
RANGES = {
    "rotation": ((-15, 15), (-15, 15), _V), "shift_x": ((-20, 20), (-20, 20), _V),
    "shift_y": ((-20, 20), (-20, 20), _V), "tilt_x": ((-12, 12), (-12, 12), _V),
    "tilt_y": ((-12, 12), (-12, 12), _V), "spin": ((-15, 15), (-15, 15), _V),
    "heart_scale": ((0.8, 1.25), (0.8, 1.25), _V), "body_scale": ((0.9, 1.2), (0.9, 1.2), _V),
    "fat": ((5, 20), (5, 20), _V), "lv_size": ((0.85, 1.15), (0.85, 1.15), _V),
    "lv_length": ((0.9, 1.1), (0.9, 1.1), _V), "wall": ((0.8, 1.2), (0.8, 1.2), _V),
    "rv_size": ((0.8, 1.25), (0.8, 1.25), _V), "la_size": ((0.8, 1.25), (0.8, 1.25), _V),
    "ra_size": ((0.8, 1.25), (0.8, 1.25), _V), "vessel_size": ((0.85, 1.15), (0.85, 1.15), _V),
    "below": ((0, 30), (5, 60), _V), "above": ((0, 30), (0, 50), _V),
    "dz": ((6.5, 10), (5.5, 8.5), _V), "dxy": ((1.3, 1.9), (1.25, 1.45), _V), "fov": ((220, 290), (180, 260), _V),
    "tissue": ((0.85, 1.15), (-15, 15), _C), "blood": (None, (150, 500), _C), "bolus": (None, (0.6, 1.4), _C),
    "myo": (None, (80, 140), _C), "bias": ((0, 0.25), None, _C), "noise": ((0.015, 0.05), (8, 30), _C),
}
# name: (probability in mri, probability in chd); effects in anatomy.py, meaning in the docstring
ANOMALIES = {"rv_dilation": (0.10, 0.25), "vsd": (0.0, 0.25), "swapped_vessels": (0.0, 0.15),
             "small_ao": (0.0, 0.10), "small_pa": (0.0, 0.15), "single_ventricle": (0.0, 0.08),
             "dilated_lv": (0.15, 0.05), "thick_wall": (0.15, 0.0)}


@dataclass(frozen=True)
class Difficulty:
    """The knobs that scale the cohort's variability (see the module docstring); defaults: the stated ranges."""
    variability: float = 1.0
    contrast: float = 1.0
    noise: float = 1.0
    anomalies: float = 1.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
                raise ValueError(f"difficulty knob {name} must be a finite number >= 0, got {value!r}")


def ranges(style: str) -> dict:
    """{name: (low, high, knob)} of the parameters that the style draws."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    column = STYLES.index(style)
    return {name: (*row[column], row[2]) for name, row in RANGES.items() if row[column] is not None}


def draw_patient(rng: np.random.Generator, style: str, difficulty: Difficulty = Difficulty()) -> dict:
    """One patient's parameters: every name of ranges(style) (tissue: one value per TISSUES entry), the tuple
    of its anomalies, its style and the noise knob. Always takes the same numbers from rng, whatever the knobs."""
    table, spread = ranges(style), {_V: difficulty.variability, _C: difficulty.contrast}
    draws = {name: rng.random(len(TISSUES) if name == "tissue" else None) for name in table}
    chance = rng.random(len(ANOMALIES))
    patient = {"style": style, "noise_gain": float(difficulty.noise)}
    for name, (low, high, knob) in table.items():
        value = (low + high) / 2 + spread[knob] * (draws[name] - 0.5) * (high - low)
        value = np.maximum(value, low / 4) if low > 0 else value
        patient[name] = value if name == "tissue" else float(value)
    probability = [min(1.0, p[STYLES.index(style)] * difficulty.anomalies) for p in ANOMALIES.values()]
    patient["anomalies"] = tuple(name for name, x, p in zip(ANOMALIES, chance, probability) if x < p)
    return patient
