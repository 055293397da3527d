"""anatomy.py: one 3D anatomy for every synthetic patient, painted from the parameters of cohort.py.

World coordinates in mm: x toward the patient's Right, y Anterior, z toward the head, z = 0 at the LV base.

    body     superellipse outline, subcutaneous fat, muscle, sternum, spine (vertebral body with discs, canal,
             lamina), lungs rising from the diaphragm (just below the apex), liver and stomach below it, upper
             mediastinum and trachea above the heart
    LV       truncated prolate ellipsoid along the long axis (from the base to the left, anterior and down):
             cavity, myocardium (the LV wall, septum included), two papillary muscles
    RV       ellipsoid wrapped around the septum minus the LV, with its outflow tract up to the pulmonary valve
    atria    LA behind and above the LV base, reaching down to the mitral valve, with pulmonary veins; RA on the
             right with the venae cavae. The valve plane closes the LV base but for the mitral and aortic valves
    vessels  tubes: aortic root, ascending aorta, arch, descending aorta; pulmonary trunk, left and right PA
Blood spaces get a thin wall, the heart pericardial fat. Landmarks live in the heart frame (origin at the LV
base centre, the body's axes, mm at heart_scale 1), which is scaled, tilted and spun per patient. The anomalies
of cohort.py change sizes (factors in paint), swap the great vessels' origins or open the septum.
paint() returns a map of STRUCTURES; synthetic.py turns it into labels and intensities.
"""
import numpy as np

from cohort import SLICES

STRUCTURES = {  # painted structure: (its label's name, its tissue); from "wall" on: the heart and vessels
    "air": ("", "air"), "fat": ("", "fat"), "muscle": ("", "muscle"), "lung": ("", "lung"),
    "liver": ("", "liver"), "bone": ("", "bone"), "marrow": ("", "marrow"), "fluid": ("", "fluid"),
    "wall": ("", "myocardium"), "myo": ("MYO", "myocardium"), "papillary": ("LV", "myocardium"),
    "lv": ("LV", "blood"), "rv": ("RV", "blood"), "la": ("LA", "blood"), "ra": ("RA", "blood"),
    "ao": ("AO", "blood"), "pa": ("PA", "blood"), "vein": ("", "blood"), "pvein": ("", "blood")}
ID = {name: i for i, name in enumerate(STRUCTURES)}
# The heart frame: origin at the LV base centre, axes along the body's, mm at heart_scale 1.
APEX_DIR = np.array([-0.542, 0.542, -0.643])  # base -> apex: 45 deg to the left of anterior, 40 deg down
AV, PV = (5, 12, 6), (-10, 36, 20)  # aortic and pulmonary valves
ASC_TOP, BIFURCATION, LPA, RPA = (18, 18, 60), (-14, 10, 48), (-55, -8, 46), (50, -10, 42)
LA, RA, SVC, IVC = (3, -20, 16), (40, -2, 0), (38, 0, 22), (35, -8, -20)  # atria centres, cava ends


def _unit(v):
    return np.asarray(v, float) / np.linalg.norm(v)


def _rotation(ax, ay, az):
    """Rotation matrix Rz @ Ry @ Rx of the angles in degrees."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(np.radians([ax, ay, az])), np.sin(np.radians([ax, ay, az]))
    rx, ry = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]), np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ ry @ rx


def _effect(anomalies, **factors):
    """Product of the factors of the anomalies the patient has."""
    return float(np.prod([f for name, f in factors.items() if name in anomalies]))


def _ramp(t, t0, t1):
    """Smoothstep of t from 0 (t <= t0) to 1 (t >= t1)."""
    s = np.clip((t - t0) / (t1 - t0), 0, 1)
    return s * s * (3 - 2 * s)


def _ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1


def _capsule(P, a, b, radius):
    """Points of P (three arrays x, y, z) closer than radius to the segment from a to b."""
    d = np.subtract(b, a)
    rel = [P[i] - np.float32(a[i]) for i in range(3)]
    t = np.clip(sum(rel[i] * np.float32(d[i]) for i in range(3)) / d.dot(d), 0, 1)
    return sum((rel[i] - t * np.float32(d[i])) ** 2 for i in range(3)) < radius ** 2


def _dilate(mask, steps):
    """In-plane dilation by `steps` pixels (4-neighbourhood)."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def paint(p: dict) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Structure map uint8 (X, Y, N) (ids of STRUCTURES) and spacing (mm) of one patient's parameters.
    chd: axis 0 runs toward the patient's Right, 1 Anterior, 2 (slices) toward the head. mri: axis 2 runs along
    the canonical LV long axis from apex to base, 0 and 1 toward Right and Anterior as near as the short-axis
    plane allows. In-plane, both are turned by p["rotation"]."""
    # 1. sizes (mm) and landmarks (world) of this patient
    an, hs = p["anomalies"], p["heart_scale"]
    g = hs * p["body_scale"]  # body size
    A, D, fat = 140 * g, 105 * g, p["fat"]  # half width and depth of the body
    r_vb, y_v = 16 * g, -D + 60 * g  # vertebral body radius and centre
    R = _rotation(p["tilt_x"], p["tilt_y"], p["spin"])
    base = np.array([-12 * hs, y_v + r_vb + 6 * g + 48 * hs, 0.0])  # LV base centre, in front of the spine
    world = lambda q: base + hs * R @ np.asarray(q, float)  # heart frame -> world
    L = 85 * p["lv_length"] * _effect(an, dilated_lv=1.1)
    r_lv = 24 * p["lv_size"] * _effect(an, dilated_lv=1.3, thick_wall=0.8, single_ventricle=1.25)
    wall = 9 * p["wall"] * _effect(an, dilated_lv=0.75, thick_wall=1.6)
    rv = p["rv_size"] * _effect(an, rv_dilation=1.5, single_ventricle=0.4)
    r_ao = 13 * p["vessel_size"] * _effect(an, small_ao=0.55)
    r_pa = 11 * p["vessel_size"] * _effect(an, small_pa=0.5)
    ao_from, pa_from = (PV, AV) if "swapped_vessels" in an else (AV, PV)
    desc = np.array([-r_vb - 7 * g, y_v + 0.5 * r_vb, world(ASC_TOP)[2]])  # top of the descending aorta
    arch = (world(ASC_TOP) + desc) / 2 + [0, 0, 18 * hs]

    # 2. scan geometry: the stack axis e3 (mri: the canonical LV axis; chd: the body's), in-plane e1 ~ Right
    # and e2 ~ Anterior turned by `rotation`; coverage from below the apex to above the base / the arch.
    e3 = -APEX_DIR if p["style"] == "mri" else np.array([0.0, 0, 1])
    e1 = _unit([1, 0, 0] - e3[0] * e3)
    e2 = np.cross(e3, e1)
    turn = np.radians(p["rotation"])
    e1, e2 = np.cos(turn) * e1 + np.sin(turn) * e2, np.cos(turn) * e2 - np.sin(turn) * e1
    apex, top = world(L * APEX_DIR), (base if p["style"] == "mri" else arch + [0, 0, r_ao * hs])
    s0, s1 = (apex - base) @ e3 - p["below"], (top - base) @ e3 + p["above"]
    n = int(np.clip(round((s1 - s0) / p["dz"]), *SLICES[p["style"]]))
    dz, dxy, size = (s1 - s0) / n, p["dxy"], int(round(p["fov"] / p["dxy"]))
    middle = (apex - base) / 2
    centre = base + middle - (middle @ e3) * e3 + p["shift_x"] * e1 + p["shift_y"] * e2
    r = ((np.arange(size) - (size - 1) / 2) * dxy).reshape(-1, 1, 1)  # in-plane grid coordinate (mm)
    s = (s0 + (np.arange(n) + 0.5) * dz).reshape(1, 1, -1)  # slice centres along e3 (mm from the base)
    P = [(centre[i] + r * e1[i] + r.reshape(1, -1, 1) * e2[i] + s * e3[i]).astype(np.float32) for i in range(3)]
    X, Y, Z = P  # world position of every voxel
    cls = np.full(X.shape, ID["air"], np.uint8)
    corner, axes = np.array([X[0, 0, 0], Y[0, 0, 0], Z[0, 0, 0]]), np.array([e1, e2, e3])  # of the voxel grid
    step = np.array([dxy, dxy, dz])

    def put(mask, name, region=(slice(None),) * 3):
        np.copyto(cls[region], np.uint8(ID[name]), where=mask)

    def vessel(points, radius, name):
        """A tube through world points: one capsule per segment, evaluated in its bounding box only."""
        for a, b in zip(points[:-1], points[1:]):
            ends = (np.array([a, b]) - corner) @ axes.T / step  # voxel coordinates of the ends
            low = np.clip(np.floor(ends.min(0) - radius / step), 0, cls.shape).astype(int)
            high = np.clip(np.ceil(ends.max(0) + radius / step) + 1, 0, cls.shape).astype(int)
            region = tuple(slice(lo, hi) for lo, hi in zip(low, high))
            put(_capsule([w[region] for w in P], a, b, radius), name, region)

    # 3. body; the diaphragm lies just below the apex, the right dome (liver) higher than the left
    body = lambda shrink: (np.abs(X) / (A - shrink)) ** 2.4 + (np.abs(Y) / (D - shrink)) ** 2.4 < 1
    put(body(0), "fat"), put(body(fat), "muscle")
    z_dia = apex[2] - 5 * hs
    for side, lag in ((1, 15 * g), (-1, 0)):  # lungs: right (x > 0), left
        k = _ramp(Z, z_dia - 40 * g + lag, z_dia + 90 * g)
        put(body(fat + 12 * g) & _ellipse(X, Y, side * 0.4 * A, -D * (0.05 + 0.3 * (1 - k)), 0.37 * A * k + 1e-3,
                                          0.72 * D * k + 1e-3), "lung")
    put(_ellipse(X, Y, -5 * g, 0.1 * D, 22 * g, 0.7 * D) & (Z > z_dia + 40 * g), "fat")  # upper mediastinum
    h = np.sqrt(1 - _ramp(Z, z_dia - 35 * g, z_dia + 25 * g)) + 1e-3
    put(body(fat) & _ellipse(X, Y, 0.22 * A, -0.05 * D, 0.62 * A * h, 0.6 * D * h), "liver")
    h = np.sqrt(1 - _ramp(Z, z_dia - 30 * g, z_dia + 10 * g)) + 1e-3
    stomach = _ellipse(X, Y, -0.4 * A, 0.15 * D, 0.24 * A * h, 0.3 * D * h)
    put(stomach, "fluid"), put(stomach & (Y > D * (0.15 + 0.12 * h)), "air")
    put(_ellipse(X, Y, 0, y_v - r_vb - 9 * g, 20 * g, 7 * g), "bone")  # lamina and spinous process
    put(_ellipse(X, Y, 0, y_v - r_vb - 22 * g, 4 * g, 10 * g), "bone")
    put(_ellipse(X, Y, 0, y_v, r_vb + 2, r_vb + 2), "bone")
    put(_ellipse(X, Y, 0, y_v, r_vb, r_vb), "marrow")
    put(_ellipse(X, Y, 0, y_v, r_vb, r_vb) & (Z % 28 < 5), "muscle")  # intervertebral discs
    put(_ellipse(X, Y, 0, y_v - r_vb - 8 * g, 7 * g, 7 * g), "fluid")  # spinal canal
    put(_ellipse(X, Y, 0, D - fat - 12 * g, 14 * g, 6 * g), "bone")  # sternum
    put(_ellipse(X, Y, 0, D - fat - 12 * g, 10 * g, 3 * g), "marrow")
    put((Z > world(ASC_TOP)[2] - 10 * hs) & _ellipse(X, Y, 0, y_v + r_vb + 24 * g, 9 * g, 8 * g), "air")  # trachea

    # 4. heart: q in the heart frame; (u, v, c) in the LV's, c from the apex (0) to the base (L), u toward the RV
    q = [sum(R[j, i] * (P[j] - np.float32(base[j])) for j in range(3)) / np.float32(hs) for i in range(3)]
    w0, e_u = -APEX_DIR, _unit(np.subtract([1, 1, 0], (APEX_DIR @ [1, 1, 0]) * APEX_DIR))
    e_v = np.cross(w0, e_u)
    c, u, v = (sum(np.float32(e[i]) * q[i] for i in range(3)) for e in (w0, e_u, e_v))
    c += np.float32(L)
    ellipsoid = lambda centre, radii: sum(((q[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) < 1
    lv_point = lambda uu, vv, cc: (cc - L) * w0 + uu * e_u + vv * e_v  # LV frame -> heart frame
    for side in (1, -1):  # pulmonary veins
        vessel([world(LA), world(np.add(LA, (side * 45, -10, 3)))], 6 * hs, "pvein")
    vessel([world(SVC), world(SVC) + [0, 0, 500]], 9 * hs, "vein")
    vessel([world(IVC), world(IVC) - [0, 0, 500]], 11 * hs, "vein")
    put(ellipsoid(LA, np.multiply((30, 17, 19), p["la_size"])), "la")
    vessel([world(LA), world(lv_point(-0.35 * r_lv, 0, L))], 0.5 * r_lv * hs, "la")  # down to the mitral valve
    put(ellipsoid(RA, np.multiply((20, 22, 28), p["ra_size"])), "ra")
    vessel([world(pa_from), world(BIFURCATION), world(LPA)], r_pa * hs, "pa")
    vessel([world(BIFURCATION), world(RPA)], 0.75 * r_pa * hs, "pa")
    vessel([world(ao_from), world(ASC_TOP), arch, desc], r_ao * hs, "ao")
    vessel([desc, desc - [0, 0, 500]], 0.85 * r_ao * hs, "ao")
    r_epi, h_rv = r_lv + wall, 18 * rv
    u0 = 0.55 * r_epi
    epi = (u / r_epi) ** 2 + (v / r_epi) ** 2 + ((c - L) / L) ** 2 < 1
    rv_body = ((u - u0) / (r_epi - u0 + h_rv)) ** 2 + (v / (r_epi * (0.9 + 0.3 * rv))) ** 2  # wraps the septum,
    put((rv_body + ((c - L) / (0.8 * L)) ** 2 < 1) & (c < L) & ~epi, "rv")  # ends above the apex
    outflow = world(lv_point(r_epi + h_rv / 2, 0.3 * r_epi, 0.8 * L)), world(PV)
    vessel(outflow, 10 * rv ** 0.5 * hs, "rv")
    put(epi & (c < L), "myo")
    put(((u / r_lv) ** 2 + (v / r_lv) ** 2 + ((c - L) / (L - wall)) ** 2 < 1) & (c < L), "lv")
    valves = np.isin(cls, (ID["la"], ID["ao"], ID["pa"]))  # the valve plane closes the base, but for the valves
    put((u ** 2 + v ** 2 < r_epi ** 2) & (c >= L) & (c < L + wall / 2) & ~valves, "myo")
    inner = r_lv * np.sqrt(np.clip(1 - ((c - L) / (L - wall)) ** 2, 0, 1))  # cavity radius at c
    for angle in (np.pi - 0.9, np.pi + 0.9):  # papillary muscles on the free wall, mid-ventricle
        du, dv = u - 0.62 * inner * np.cos(angle), v - 0.62 * inner * np.sin(angle)
        near = du ** 2 + dv ** 2 < (0.18 * inner) ** 2
        put(near & (cls == ID["lv"]) & (c > 0.3 * L) & (c < 0.85 * L), "papillary")
    if "vsd" in an:  # a hole through the septum: blood on both sides
        hole = (u - r_lv - wall / 2) ** 2 + v ** 2 + (c - 0.65 * L) ** 2 < max(6, 0.8 * wall) ** 2
        put(hole & (cls == ID["myo"]) & (u < r_lv + wall / 2), "lv"), put(hole & (cls == ID["myo"]), "rv")
    # 5. a thin wall around blood spaces, pericardial fat around the heart (in-plane)
    heart = cls >= ID["wall"]
    put(_dilate(cls >= ID["lv"], 2) & ~heart & (cls != ID["bone"]) & (cls != ID["marrow"]), "wall")
    put(_dilate(cls >= ID["wall"], int(round(0.25 * fat / dxy))) & np.isin(cls, (ID["lung"], ID["muscle"])), "fat")
    return cls, (float(dxy), float(dxy), float(dz))
