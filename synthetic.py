"""Synthetic cardiac phantoms: a realistic stand-in for ACDC-like (MRI) and CHD-like (CT) data.

PCL assumes that anatomy changes smoothly and consistently with the normalized slice position
p = (i + 1) / N across patients. Each phantom is therefore a stack of axial, short-axis-like slices
whose anatomy is a function of the continuous position t = (k + 0.5) / N of slice k (its centre;
t = 0 at the feet end, 1 at the head end), with per-patient parameters drawn once from the rng:

    t < apex (0.20-0.30)   abdomen: liver (right), stomach with gas and spleen (left), lung bases
    apex .. base (0.65-0.75) heart: myocardial cap at the apex, LV cavity growing toward the base,
                           RV crescent on the septal side appearing above the apex; lungs grow upward
    t > base               atria, then great vessels: aortic root and ascending aorta, pulmonary trunk,
                           superior vena cava, aortic arch at the top (background label)
    all t                  body outline with fat layer, spine, descending aorta

Labels follow ACDC: 0 background, 1 RV cavity, 2 (LV) myocardium, 3 LV cavity (papillary muscles
included). Tissues are painted into a class map, then given per-style intensities: "mri" looks like
cine bSSFP (bright blood and fat, grey myocardium, dark lungs; bias field; Rician noise; 12-20 thick
slices), "ct" like contrast CT in HU (blood ~300, myocardium ~100, lung ~-850; Gaussian noise; 24-40
thin slices). write_synthetic() saves an nnU-Net dataset, each volume in a random storage orientation.
`python synthetic.py --figure docs/synthetic.png` draws the README figure.
"""
import argparse
import json
import os
import pathlib

import nibabel as nib
import numpy as np

STYLES = ("mri", "ct")
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
APEX_T, BASE_T = (0.20, 0.30), (0.65, 0.75)  # ranges of the heart's ends along t: no labels outside
# slices N, slice spacing dz (mm), in-plane spacing dxy (mm), field of view per in-plane axis (mm)
GEOMETRY = {"mri": {"slices": (12, 20), "dz": (7.0, 10.0), "dxy": (1.3, 1.9), "fov": (220.0, 290.0)},
            "ct": {"slices": (24, 40), "dz": (3.5, 5.0), "dxy": (0.9, 1.3), "fov": (180.0, 240.0)}}
AIR, FAT, MUSCLE, LUNG, BLOOD, MYO, LIVER, BONE, MARROW, FLUID = range(10)  # tissue classes
# mean intensity of each class: bSSFP-like in arbitrary units, CT in Hounsfield units
TISSUE = {"mri": np.array([0.0, 0.80, 0.22, 0.05, 0.90, 0.27, 0.33, 0.06, 0.50, 0.75], np.float32),
          "ct": np.array([-1000, -100, 50, -850, 320, 110, 70, 700, 250, 10], np.float32)}


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
    """Inside mask of the ellipse ((u / ax)^2 + (v / ay)^2 < 1), (u, v) = (x - cx, y - cy) rotated by -angle;
    empty where a semi-axis is 0 (the parameters may be per-slice arrays of shape (1, 1, N))."""
    dx, dy = x - cx, y - cy
    u, v = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
    return ((u / np.maximum(ax, 1e-3)) ** 2 + (v / np.maximum(ay, 1e-3)) ** 2 < 1) & (ax > 0) & (ay > 0)


def _ramp(t, t0, t1):
    """Smoothstep of t from 0 (t <= t0) to 1 (t >= t1)."""
    s = np.clip((t - t0) / (t1 - t0), 0, 1)
    return s * s * (3 - 2 * s)


def _smooth(a, axis, passes=1):
    """[1, 2, 1] / 4 filter along one axis, edges replicated: a cheap Gaussian-like blur."""
    for _ in range(passes):
        p = np.moveaxis(a, axis, 0)
        p = np.concatenate([p[:1], p, p[-1:]])
        a = np.moveaxis(0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:], 0, axis)
    return a


def _texture(rng, shape, cell=4):
    """Smooth random field with unit std: coarse white noise, upsampled, blurred in-plane."""
    coarse = rng.standard_normal((-(-shape[0] // cell), -(-shape[1] // cell), shape[2]), np.float32)
    field = coarse.repeat(cell, 0).repeat(cell, 1)[: shape[0], : shape[1]]  # (X, Y, N)
    field = _smooth(_smooth(field, 0, 3), 1, 3)
    return field / field.std()


def make_patient(rng: np.random.Generator, style: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One phantom in canonical orientation: image float32 (X, Y, N), label uint8 (X, Y, N), spacing (sx, sy, sz) in mm.
    Axis 0 grows toward the patient's Right, axis 1 toward Anterior, axis 2 (slices) toward the head:
    slice 0 is the most inferior (abdomen/liver), slice N-1 the most superior (great vessels)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    geo, u01 = GEOMETRY[style], rng.uniform
    n = int(rng.integers(geo["slices"][0], geo["slices"][1] + 1))
    dz, dxy = u01(*geo["dz"]), u01(*geo["dxy"])
    nx, ny = (u01(*geo["fov"], size=2) / dxy).round().astype(int)
    # Patient frame (mm, body centre at 0): x toward the Right, y Anterior. The FOV is centred near the
    # heart with jitter; the patient lies rotated in-plane by `rot`.
    fc, rot = (np.array([-25.0, 5.0]) + rng.normal(0, 8, 2)).tolist(), u01(-0.25, 0.25)
    xw = ((np.arange(nx) - (nx - 1) / 2) * dxy + fc[0])[:, None]  # (X, 1)
    yw = ((np.arange(ny) - (ny - 1) / 2) * dxy + fc[1])[None, :]  # (1, Y)
    x = (np.cos(rot) * xw + np.sin(rot) * yw)[..., None].astype(np.float32)  # (X, Y, 1)
    y = (np.cos(rot) * yw - np.sin(rot) * xw)[..., None].astype(np.float32)  # (X, Y, 1)
    t = ((np.arange(n, dtype=np.float32) + 0.5) / n).reshape(1, 1, n)  # (1, 1, N)
    cls = np.full((nx, ny, n), AIR, np.uint8)  # tissue class map, painted back to front

    def paint(mask, tissue):
        np.copyto(cls, np.uint8(tissue), where=mask)

    # body outline (superellipse, slightly wider in the abdomen), subcutaneous fat, muscle
    A, B, fat = u01(125, 160), u01(95, 120), u01(5, 18)
    grow = 1 + 0.06 * (0.5 - t)
    for shrink, tissue in ((0, FAT), (fat, MUSCLE)):
        paint((np.abs(x) / (A * grow - shrink)) ** 2.4 + (np.abs(y) / (B * grow - shrink)) ** 2.4 < 1, tissue)
    # lungs grow from the diaphragm (just below the apex) upward; the right base is higher (liver)
    t_apex, t_base = u01(*APEX_T), u01(*BASE_T)
    t_dia = t_apex - u01(0.0, 0.08)
    thorax = _ellipse(x, y, 0, -5, A - fat - 14, B - fat - 14)
    for sign, lag in ((1, 0.05), (-1, 0.0)):
        g = _ramp(t, t_dia - 0.12 + lag, t_dia + 0.3) * u01(0.9, 1.1)
        paint(thorax & _ellipse(x, y, sign * A * 0.4, -B * (0.05 + 0.3 * (1 - g)), A * 0.37 * g, B * 0.72 * g), LUNG)
    # abdomen: liver (right) under the right lung, spleen (posterior left), stomach with fluid and gas
    h = np.sqrt(1 - _ramp(t, t_dia - 0.1, t_dia + 0.06))
    inner = (np.abs(x) / (A * grow - fat)) ** 2.4 + (np.abs(y) / (B * grow - fat)) ** 2.4 < 1
    paint(inner & _ellipse(x, y, A * 0.22, -B * 0.05, A * 0.62 * h, B * 0.6 * h, u01(-0.2, 0.2)), LIVER)
    paint(inner & _ellipse(x, y, -A * 0.55, -B * 0.35, A * 0.17 * h, B * 0.3 * h, -0.5), LIVER)
    hs = np.sqrt(1 - _ramp(t, t_dia - 0.08, t_dia + 0.04))
    stomach = _ellipse(x, y, -A * 0.4, B * 0.15, A * 0.24 * hs, B * 0.3 * hs, u01(-0.4, 0.4))
    paint(stomach, FLUID)
    paint(stomach & (y > B * (0.15 + 0.3 * u01(0.2, 0.6) * hs)), AIR)
    # spine: lamina and spinous process, vertebral body (cortex, marrow, discs every ~28 mm), canal
    yv, r_vb = -B + u01(42, 52), u01(14, 19)
    paint(_ellipse(x, y, 0, yv - r_vb - 9, 20, 7) | _ellipse(x, y, 0, yv - r_vb - 22, 4, 10), BONE)
    paint(_ellipse(x, y, 0, yv, r_vb + 2, r_vb + 2), BONE)
    disc = (t * n * dz + u01(0, 28)) % 28 < 5
    paint(_ellipse(x, y, 0, yv, r_vb, r_vb) & ~disc, MARROW)
    paint(_ellipse(x, y, 0, yv, r_vb, r_vb) & disc, MUSCLE)
    paint(_ellipse(x, y, 0, yv - r_vb - 8, 7, 7), FLUID)

    # Heart. s = 0 at the apex, 1 at the base. The myocardium closes into a cap for s < s_cap (at least
    # one slice thick, so some slices near the apex hold myocardium but no LV cavity); the LV cavity
    # radius grows as sqrt toward the base; the RV appears only above s_rv > s_cap.
    L = t_base - t_apex
    s = (t - t_apex) / L  # (1, 1, N)
    s_cap = max(u01(0.07, 0.11), 1.05 / n) / L
    s_rv = s_cap + u01(0.1, 0.2)
    in_heart = (s >= 0) & (s <= 1)
    r_lv = u01(20, 29) * np.sqrt(np.clip((s - s_cap) / (1 - s_cap), 0, 1)) * in_heart  # LV cavity radius (mm)
    r_epi = np.where(in_heart, r_lv + u01(7, 11) * (0.5 + 0.5 * np.clip(s / s_cap, 0, 1)), 0)  # epicardium
    base = (u01(-42, -25), u01(10, 25))  # LV centre at the base; the long axis is tilted, so the
    drift = np.clip(1 - s, 0, 1)  # centre moves left and anterior toward the apex
    cx, cy = base[0] + drift * u01(-25, -5), base[1] + drift * u01(-5, 15)  # (1, 1, N) each
    phi = u01(0.3, 1.0)  # direction from the LV centre to the RV (right-anterior), relative to +x
    u = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)  # (X, Y, N) heart frame, u toward the RV
    v = (y - cy) * np.cos(phi) - (x - cx) * np.sin(phi)
    k, theta = u01(0.9, 1.1), np.arctan2(v, u)
    wobble = 1 + u01(0, 0.05) * np.cos(2 * theta + u01(0, 6.3)) + u01(0, 0.04) * np.cos(3 * theta + u01(0, 6.3))
    r = np.sqrt((u * k) ** 2 + (v / k) ** 2) / wobble  # elliptic, wobbly radius (X, Y, N)
    rs = np.sqrt(np.clip((s - s_rv) / (1 - s_rv), 0, 1)) * in_heart  # RV size 0..1 along s
    h_rv, w_rv = u01(12, 22) * rs, r_epi * u01(1.25, 1.5) * (0.6 + 0.4 * rs)
    cu, bu = (0.7 * r_epi + h_rv) / 2, (1.3 * r_epi + h_rv) / 2  # RV ellipse spans u in [-0.3 r_epi, r_epi + h_rv]

    def rv_shape(extra):
        return ((u - cu) / np.maximum(bu + extra, 1e-3)) ** 2 + (v / np.maximum(w_rv + extra, 1e-3)) ** 2 < 1

    myo, pad = r < r_epi, u01(2, 6)  # pad: pericardial fat
    rv = rv_shape(0) & ~myo & (rs > 0)
    lv = r < r_lv
    # atria and great vessels (blood, background label), positioned from the heart's base centre
    pos = lambda dx, dy: (base[0] + dx + rng.normal(0, 3), base[1] + dy + rng.normal(0, 3))
    ao, r_ao = pos(22, 8), u01(12, 16)
    desc, r_desc = (-r_vb * 0.6 - 8, yv + r_vb * 0.7 + 12), u01(10, 13)
    t_arch, arch = u01(0.9, 0.97), np.subtract(desc, ao)
    vessels = [(pos(15, -25), u01(16, 21), t_base - 0.02, t_base + 0.13),  # left atrium
               (pos(55, -5), u01(16, 21), t_base - 0.06, t_base + 0.12),  # right atrium
               (ao, r_ao, t_base - 0.02, 1.0),  # aortic root, ascending aorta
               (pos(8, 38), u01(11, 14), t_base + 0.03, t_base + 0.22),  # pulmonary trunk
               (pos(50, 5), u01(8, 11), t_base + 0.06, 1.0),  # superior vena cava
               (desc, r_desc, 0.0, 1.0)]  # descending aorta
    blood = (t > t_arch) & _ellipse(x, y, ao[0] + arch[0] / 2, ao[1] + arch[1] / 2,
                                    np.hypot(*arch) / 2 + r_ao, r_ao, np.arctan2(arch[1], arch[0]))
    fat_around = (blood | (in_heart & (r < r_epi + pad))) | (in_heart & (rs > 0) & rv_shape(pad + 3))
    for (vx, vy), radius, t0, t1 in vessels:
        inside = (t >= t0) & (t <= t1)
        blood = blood | (inside & _ellipse(x, y, vx, vy, radius, radius))
        fat_around = fat_around | (inside & _ellipse(x, y, vx, vy, radius + pad, radius + pad))
    paint(fat_around & ~_ellipse(x, y, 0, yv, r_vb + 4, r_vb + 4), FAT)
    paint(blood, BLOOD)
    paint(rv_shape(3) & ~myo & (rs > 0), MYO)  # thin RV free wall (label 0 in ACDC)
    paint(myo, MYO)
    paint(rv | lv, BLOOD)
    papillary = (s > s_cap + 0.15) & (s < 0.9)
    for angle in (np.pi - 0.9 + u01(-0.3, 0.3), np.pi + 0.9 + u01(-0.3, 0.3)):
        d = 0.62 * r_lv
        paint(papillary & ((u - d * np.cos(angle)) ** 2 + (v - d * np.sin(angle)) ** 2 < (0.2 * r_lv) ** 2), MYO)
    label = np.zeros(cls.shape, np.uint8)
    label[myo], label[rv], label[lv] = LABELS["MYO"], LABELS["RV"], LABELS["LV"]

    # intensities: per-patient contrast, tissue texture and lung vessels, partial-volume blur, bias, noise
    table = TISSUE[style].copy()
    if style == "mri":
        table *= rng.uniform(0.85, 1.15, len(table)).astype(np.float32)
    else:
        table[AIR + 1:] += rng.normal(0, 15, len(table) - 1).astype(np.float32)
        table[BLOOD], table[MYO], table[LIVER] = u01(250, 450), u01(80, 140), u01(40, 110)
    tex = _texture(rng, cls.shape)
    img = table[cls] * (1 + 0.04 * tex * (cls != AIR))  # (X, Y, N)
    lung_vessel = (cls == LUNG) & (tex > 1.6)
    img[lung_vessel] += 0.4 * (table[BLOOD] - table[LUNG])
    img = _smooth(_smooth(img, 0), 1)
    if style == "mri":
        xn, yn, zn = (x - fc[0]) / 150, (y - fc[1]) / 150, t - 0.5
        c = rng.normal(0, 0.2, 6).tolist()
        img = img * np.exp(c[0] * xn + c[1] * yn + c[2] * zn + c[3] * xn * yn + c[4] * xn ** 2 + c[5] * yn ** 2)
        sigma = u01(0.015, 0.05)
        img = np.hypot(img + sigma * rng.standard_normal(img.shape, np.float32),
                       sigma * rng.standard_normal(img.shape, np.float32)) * u01(150, 1500)  # Rician
    else:
        img = img + u01(8, 30) * rng.standard_normal(img.shape, np.float32)
    return img.astype(np.float32), label, (float(dxy), float(dxy), float(dz))


def _save(array, affine, path):
    """Save one NIfTI (qform = sform = affine, mm units) via a temporary name, then rename."""
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    tmp = path.with_name(".tmp_" + path.name)
    nib.save(image, tmp)
    os.replace(tmp, path)


def flip_axes(arrays, affine, axes):
    """Flip the arrays along each axis in axes and return the affine that keeps every voxel's world position:
    index j becomes n - 1 - j, so column a is negated and the origin moves by (n - 1) times the old column."""
    affine = np.array(affine, dtype=float)
    for axis in axes:
        arrays = [np.flip(a, axis) for a in arrays]
        affine[:3, 3] += affine[:3, axis] * (arrays[0].shape[axis] - 1)
        affine[:3, axis] *= -1
    return arrays, affine


def write_synthetic(out_dir, patients: int = 40, style: str = "mri", seed: int = 0) -> pathlib.Path:
    """Write an nnU-Net dataset: imagesTr/syn_XXX_0000.nii.gz, labelsTr/syn_XXX.nii.gz, dataset.json.

    Patient i is drawn from the i-th child of np.random.default_rng(seed), so it does not depend on the
    number of patients. Each volume is stored with randomly flipped axes and the matching affine
    (columns = spacing x direction, origin moved so that every voxel keeps its world position)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if isinstance(patients, bool) or int(patients) != patients or patients < 1:
        raise ValueError(f"patients must be an integer >= 1, got {patients!r}")
    out = pathlib.Path(out_dir)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # a folder with dataset.json is complete
    width, cases = max(3, len(str(patients - 1))), set()
    for i, prng in enumerate(np.random.default_rng(seed).spawn(int(patients))):
        image, label, spacing = make_patient(prng, style)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = prng.uniform(-150, 150, 3)  # world position of voxel (0, 0, 0): table offset
        (image, label), affine = flip_axes((image, label), affine, np.flatnonzero(prng.random(3) < 0.5))
        case = f"syn_{i:0{width}d}"
        cases.add(case)
        _save(image, affine, out / "imagesTr" / f"{case}_0000.nii.gz")
        _save(label, affine, out / "labelsTr" / f"{case}.nii.gz")
    for path in [*(out / "imagesTr").glob("syn_*_0000.nii.gz"), *(out / "labelsTr").glob("syn_*.nii.gz")]:
        if path.name.removesuffix(".nii.gz").removesuffix("_0000") not in cases:
            path.unlink()  # stale case of an earlier, larger run into the same folder
    meta = {"name": f"synthetic-{style}",
            "description": f"synthetic cardiac phantoms (synthetic.py), style={style}, seed={seed}",
            "channel_names": {"0": "MRI" if style == "mri" else "CT"}, "labels": dict(LABELS),
            "numTraining": int(patients), "file_ending": ".nii.gz"}
    (out / ".dataset.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / ".dataset.json.tmp", out / "dataset.json")
    return out


def _display(plane):
    """Radiological view of an (X, Y) slice: anterior at the top, the patient's right on the left."""
    return plane[::-1, ::-1].T


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw the synthetic-phantom figure.")
    parser.add_argument("--figure", default="docs/synthetic.png", help="output PNG")
    parser.add_argument("--style", choices=(*STYLES, "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    styles = list(STYLES) if args.style == "both" else [args.style]
    rows = [(style, make_patient(child, style)) for style in styles
            for child in np.random.default_rng(args.seed).spawn(2)]
    positions = (0.1, 0.3, 0.45, 0.6, 0.72, 0.92)
    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1, 0.45), (0.2, 0.9, 0.2, 0.45), (1, 0.25, 0.2, 0.45)])
    fig, axes = plt.subplots(len(rows), len(positions), figsize=(1.75 * len(positions), 1.85 * len(rows)),
                             squeeze=False)
    for row, (style, (image, label, spacing)) in enumerate(rows):
        n = image.shape[2]
        low, high = (-300, 450) if style == "ct" else np.percentile(image, (0.5, 99.5))
        for col, p in enumerate(positions):
            k = int(np.clip(round(p * n) - 1, 0, n - 1))  # slice whose position (k + 1) / N is nearest to p
            ax = axes[row, col]
            ax.imshow(_display(image[:, :, k]), cmap="gray", vmin=low, vmax=high)
            ax.imshow(_display(label[:, :, k]), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(f"p = {(k + 1) / n:.2f}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(f"{style.upper()}, N = {n}\n{spacing[0]:.1f} x {spacing[2]:.1f} mm", fontsize=8)
    fig.legend([Patch(color=colours(i)) for i in (1, 2, 3)], ["RV", "MYO", "LV"], loc="lower center", ncol=3,
               fontsize=8, frameon=False)
    fig.suptitle("Synthetic phantoms, feet to head: p = (i + 1) / N is the slice position PCL uses", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path = pathlib.Path(args.figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=76)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
