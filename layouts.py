"""layouts.py: where a dataset's volumes are, whatever the folder layout it came in.

A dataset folder is a list of cases: one image file, its label file if it has one, and the patient
it belongs to (the unit that folds split: a patient's frames or scans never straddle two folds).
Known layouts: nnU-Net (a Medical Segmentation Decathlon task once nnU-Net has converted it with
nnUNetv2_convert_MSD_dataset), and the raw ACDC, CHD, MMWHS and HVSMR ones. One image channel is
read (nnU-Net's CASE_0000); `python data.py check` reports a dataset with more as a problem. Each
layout's stored label values map to class indices 0..K-1 (label_lookup); volumes.py reads the files.
Every problem with the user's folder is a DataError whose one-line message names the file.
"""
import json
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from volumes import DataError, header_shape


@dataclass
class Case:
    id: str            # one volume, e.g. "patient001_frame01"
    patient: str       # the unit of splitting: "patient001" for ACDC's two labeled frames (nnU-Net: _nnunet_cases)
    image: Path
    label: Path | None
    frame: int | None = None  # a time frame of a 4D cine file (ACDC's patientXXX_4d.nii.gz)


MMWHS_LABELS = {205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}
LAYOUT_CLASSES = {  # class names of the raw layouts (nnU-Net layouts read them from dataset.json)
    "acdc": ["background", "RV", "MYO", "LV"],
    "chd": ["background", "LV", "RV", "LA", "RA", "MYO", "AO", "PA"],
    "mmwhs": ["background", "MYO", "LA", "LV", "RA", "RV", "AO", "PA"],
    "hvsmr": ["background", "MYO", "BP"],
}
LAYOUTS = ("nnunet", "acdc", "chd", "mmwhs", "hvsmr")
NNUNET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
RAW_NAMES = {"acdc": "patient*_frame*.nii*", "hvsmr": "training_sa_crop_pat*.nii*", "mmwhs": "*_train_*_image.nii*",
             "chd": "ct_*_image.nii*"}  # a file of each raw layout, in the order they are tried


def files_below(root):
    """(folder, name) of every file below root, symlinked folders followed (Path.rglob skips them; a subset of
    patients linked from elsewhere is common), each real folder once (a link back up the tree ends there). A
    folder that cannot be read, or a link whose target is gone, is a DataError: its volumes would be left out."""
    def unreadable(error):
        raise DataError(f"{error.filename}: cannot be read ({error.strerror}); its volumes would be left out")
    seen = set()
    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not os.path.exists(path):  # a patient folder linked from a moved store, say
                raise DataError(f"{path}: a link to {os.readlink(path)}, which is gone; its volumes would be left out")
            yield folder, name


def detect_layout(root):
    """Guess the layout of a dataset folder from the files it holds."""
    root = Path(root)
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        return "nnunet"
    if root.name in NNUNET_FOLDERS and (root.parent / "dataset.json").exists():
        raise DataError(f"{root}: a folder of the nnU-Net dataset {root.parent}; point --data at that one")
    names, below = set(), []  # the file names, and the nnU-Net datasets (a dataset.json beside imagesTr or labelsTr)
    for folder, name in files_below(root):
        names.add(name)
        if name == "dataset.json" and any(os.path.isdir(os.path.join(folder, f)) for f in ("imagesTr", "labelsTr")):
            below.append(folder)
    if below:  # nnUNet_raw/ for nnUNet_raw/Dataset027_ACDC/: its labelsTr would pass for ACDC's images
        raise DataError(f"{root}: holds the nnU-Net dataset(s) {', '.join(sorted(below)[:3])}; point --data at one "
                        f"of them (or name this folder's own layout with --layout)")
    for layout, pattern in RAW_NAMES.items():
        if any(fnmatchcase(name, pattern) for name in names):
            return layout
    raise DataError(f"{root}: cannot tell the dataset layout (no dataset.json, no ACDC, CHD, MMWHS "
                    f"or HVSMR file names); pass --layout {{{','.join(LAYOUTS)}}}")


def find_cases(root, layout="auto", cine=False):
    """Return (layout, cases, class_names) for a dataset folder; with cine, ACDC's 4D files add one
    unlabeled case per time frame (the authors pretrain on every frame)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: " + ("a file, not a data folder" if root.exists() else "no such data folder"))
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "nnunet":
        cases, classes = _nnunet_cases(root)
    elif layout in LAYOUT_CLASSES:
        cases, classes = _raw_cases(root, layout), LAYOUT_CLASSES[layout]
    else:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)} or auto")
    if not cases:
        raise DataError(f"{root}: no images found for the {layout} layout")
    if layout == "mmwhs" and len({case.id[:3] for case in cases}) > 1:  # ct_train_1001_image, mr_train_1001_image
        ct, mr = (next(c.image.name for c in cases if c.id.startswith(m)) for m in ("ct_", "mr_"))
        raise DataError(f"{root}: holds MM-WHS's CT ({ct}) and MR ({mr}) volumes, which one dataset cannot mix; "
                        f"point --data at one modality's folder (the authors: ct_train)")
    first = {}
    for case in cases:  # a copy elsewhere in the folder, or CASE.nii beside CASE.nii.gz: trained twice, scored once
        if first.setdefault(case.id, case.image) != case.image:
            raise DataError(f"{case.image}: case {case.id} again (also {first[case.id]}); keep one of them")
    cine_files = [] if not cine or layout != "acdc" else \
        sorted(Path(folder) / name for folder, name in files_below(root) if fnmatchcase(name, "patient*_4d.nii*"))
    if cine and not cine_files:  # the acdc preset's --cine on nnU-Net's conversion, say: not the authors' recipe
        raise DataError(f"{root}: --cine found no 4D cine file (patientXXX_4d.nii.gz, in ACDC's own layout) in this "
                        f"{layout} dataset; without --cine, pretraining reads the labeled frames")
    for path in cine_files:
        shape = header_shape(path)
        frames = shape[3] if len(shape) == 4 else 0
        if not frames:
            raise DataError(f"{path}: expected a 4D cine volume (X, Y, Z, T), got shape {shape}")
        patient = path.name.split("_4d")[0]
        cases += [Case(f"{patient}_4d_t{k:02d}", patient, path, None, k) for k in range(frames)]
    return layout, sorted(cases, key=lambda c: c.id), classes


def _nnunet_cases(root):
    """The cases of imagesTr/CASE_0000.nii.gz (labels in labelsTr/CASE.nii.gz) and the class names.
    A case's patient is its id without a trailing _frame<digits>: nnU-Net's conversion of ACDC names
    the two frames of a patient patient001_frame01 and patient001_frame12, and both must share a fold."""
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: missing (an nnU-Net dataset needs it)")
    try:
        meta = json.loads(meta_path.read_text())
        ending = meta.get("file_ending", ".nii.gz")
        msd = bool(meta["labels"]) and all(k.isdigit() and not isinstance(v, int) for k, v in meta["labels"].items())
        unsupported = [k for k, v in meta["labels"].items() if k == "ignore" or isinstance(v, list)]
        labels = {} if msd or unsupported else {int(v): k for k, v in meta["labels"].items()}
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"{meta_path}: not a valid dataset.json ({e!r}); another layout's folder? pass --layout") \
            from None
    if unsupported:  # nnU-Net v2's partial annotation and regions: trained here as classes, they would be wrong
        raise DataError(f"{meta_path}: label {unsupported[0]!r} is " + ("nnU-Net's 'ignore' label" if unsupported[0] ==
                        "ignore" else "a region (several values)") + ", which this project does not support")
    if msd:  # {"0": "background", "1": "left atrium"}: values to names, where nnU-Net maps names to values
        raise DataError(f"{meta_path}: labels map values to names, as in a Medical Segmentation Decathlon task or an "
                        f"nnU-Net v1 dataset; convert it with nnUNetv2_convert_MSD_dataset or "
                        f"nnUNetv2_convert_old_nnUNet_dataset first")
    for name, value in meta["labels"].items():  # {"MYO": 2, "myocardium": 2}: one class, one of the names lost
        if labels[int(value)] != name:
            raise DataError(f"{meta_path}: labels {name!r} and {labels[int(value)]!r} share the value {value}; "
                            f"each class needs its own")
    if sorted(labels) != list(range(len(labels))):
        raise DataError(f"{meta_path}: label values must be 0..K-1, got {sorted(labels)}")
    if ending not in (".nii.gz", ".nii"):
        raise DataError(f"{meta_path}: file_ending is {ending!r}; only NIfTI files (.nii.gz or .nii) are read")
    for folder in ("imagesTr", "labelsTr"):
        misnamed = [p for p in root.iterdir() if p.name.lower() == folder.lower() and p.name != folder]
        if misnamed and not (root / folder).exists():  # labelsTR: on Linux its labels would never be found
            raise DataError(f"{misnamed[0]}: nnU-Net's folder is named {folder} (the case matters); rename it")
        stray = sorted(p for p in (root / folder).glob("[!.]*")
                       if p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.endswith(ending))
        if stray:  # a NIfTI file of another ending would be left out without a word
            raise DataError(f"{stray[0]}: not a {ending} file, the file_ending of {meta_path}; "
                            f"{len(stray)} such file(s) in {folder}, which would be left out")
    images = {p.name[:-len("_0000" + ending)]: p for p in (root / "imagesTr").glob(f"[!.]*_0000{ending}")}
    label_files = {p.name[:-len(ending)]: p for p in (root / "labelsTr").glob(f"[!.]*{ending}")}
    for case_id, path in label_files.items():
        if case_id not in images:
            raise DataError(f"{path}: label without its image (expected imagesTr/{case_id}_0000{ending})")
    cases = [Case(i, re.sub(r"_frame\d+$", "", i), p, label_files.get(i)) for i, p in images.items()]
    return cases, [labels[v] for v in range(len(labels))]


def nnunet_problems(root, cases):
    """Problems of an nnU-Net folder that still let it be read (`python data.py check` lists them, a
    cache build notes them): image channels other than 0000, which are not read, and fewer images in
    imagesTr than dataset.json's numTraining (a copy that missed files), or a numTraining that is not a count."""
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text())  # find_cases read it without error
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta.get("channel_names", meta.get("modality", {}))  # nnU-Net v2's name, v1's
    others = sorted(p for p in (root / "imagesTr").glob(f"*_[0-9][0-9][0-9][0-9]{ending}")
                    if not p.name.endswith("_0000" + ending))
    problems = []
    if isinstance(channels, dict) and len(channels) > 1:
        problems.append(f"{meta_path}: {len(channels)} image channels listed; only channel 0000 is read")
    if others:
        problems.append(f"{others[0]}: an image channel other than 0000, ignored (only channel 0000 is read); "
                        f"{len(others)} such files")
    listed = meta.get("numTraining", 0)
    if isinstance(listed, bool) or not isinstance(listed, int) or listed < 0:
        problems.append(f"{meta_path}: numTraining is {listed!r}, not a count of cases")
    elif len(cases) < listed:  # more is fine: images without labels, added to pretrain
        problems.append(f"{meta_path}: numTraining is {listed}, but imagesTr holds {len(cases)} images: "
                        f"files missing?")
    return problems


RAW_PATTERNS = {  # layout -> (image regex, label name from the image name, patient from the case id)
    "acdc": (r"(patient\d+)_frame\d+\.nii(\.gz)?", lambda n: n.replace(".nii", "_gt.nii")),
    "chd": (r"(ct_\d+)_image\.nii(\.gz)?", lambda n: n.replace("_image", "_label")),
    "mmwhs": (r"((ct|mr)_train_\d+)_image\.nii(\.gz)?", lambda n: n.replace("_image", "_label")),
    "hvsmr": (r"(training_sa_crop_pat\d+)\.nii(\.gz)?", None),
}


def _raw_cases(root, layout):
    pattern, label_name = RAW_PATTERNS[layout]
    cases = []
    for folder, name in files_below(root):
        match = re.fullmatch(pattern, name)
        if not match:
            continue
        image = Path(folder) / name
        if image.parent.name in NNUNET_FOLDERS and (image.parent.parent / "dataset.json").exists():
            continue  # --layout acdc over nnU-Net's ACDC: labelsTr/patient001_frame01.nii.gz is a label
        if layout == "hvsmr":  # the label beside its image, or in a sibling Ground_truth/ (authors') or Ground truth/
            file, above = image.name.replace(".nii", "-label.nii"), image.parent.parent
            named = [image.parent / file] + [above / truth / file for truth in ("Ground_truth", "Ground truth")]
            found = [label for path in named for label in (path, _other_ending(path)) if label.exists()]
            if found and found[0].parent != image.parent and image.parent == root:  # above --data: the cache's reach
                raise DataError(f"{found[0]}: the label of {image} lies outside {root}; point --data at the "
                                f"folder that holds both")
            label = found[0] if found else named[0]
        else:
            label = image.with_name(label_name(image.name))
            label = label if label.exists() else _other_ending(label)  # .nii.gz image, .nii label, or the reverse
        case_id = image.name.split(".nii")[0]
        cases.append(Case(case_id, match.group(1), image, label if label.exists() else None))
    return cases


def _other_ending(path):
    """The same file name with the other NIfTI ending: .nii for .nii.gz, .nii.gz for .nii."""
    return path.with_name(path.name[:-3] if path.name.endswith(".gz") else path.name + ".gz")


def label_lookup(layout, num_classes):
    """Map stored label values to class indices; None marks values that are errors."""
    if layout == "mmwhs":
        return lambda v: MMWHS_LABELS.get(v, 0 if v == 0 else None)
    if layout == "chd":  # as the authors did: labels above 7 (rare vessels) become background
        return lambda v: None if v < 0 else v if v <= 7 else 0
    return lambda v: v if 0 <= v < num_classes else None
