"""presets.py: the paper's experiments as command lines, one preset per table of the paper.

A preset names the data of a grid (reproduce.py), its setting (semi-supervised: pretrain and finetune on
one dataset's patients; transfer: pretrain on one dataset, finetune on another), the labeled patients M,
the folds, and the flags of each script: `pretrain` holds pretrain.py's, `finetune` finetune.py's. The
real-data presets follow the authors' code, row by row of the README's "Real data: the authors'
recipe" (tests/test_recipe.py checks each row); the synthetic ones are the embedded benchmark's.
reproduce.py's command line changes a preset (its data, grid and any flag of either script): resolve().
Each cell of the grid is then three command lines: pretrain_command, finetune_command, evaluate_command;
same_settings keeps a grid's table and runs to the settings they were made with.
"""
import json
from pathlib import Path

import data
from cache import digest
from checkpoints import Run, save_json
from runs import RunError

# The authors' pretraining: their loss carries a factor tau / 0.07, which we move into the learning rate
# and weight decay (SGD with lr, wd on c * L == lr * c, wd / c on L).
TAU_FACTOR = 0.1 / 0.07
AUTHORS_PRETRAIN = dict(epochs=300, batch_size=32, lr=0.1 * TAU_FACTOR, weight_decay=1e-5 / TAU_FACTOR, momentum=0.9,
                        tau=0.1, proj_dim=512, bottleneck="plain", init="he", separate_views=True, augment="paper",
                        partition_rule="authors", intensity="clip-zscore")
# The authors' code has no Rotation or PIRL: in the real-data grids they keep pretrain.py's own learning
# rate, weight decay and temperature (the tau / 0.07 factor is the contrastive loss's), and Rotation its
# upright views (`paper` turns slices by any angle, which would hide its labels).
BASELINES = {"rotation": dict(lr=0.1, weight_decay=1e-5, augment="upright"),
             "pirl": dict(lr=0.01, weight_decay=1e-5, tau=0.07)}
AUTHORS_FINETUNE = dict(epochs=100, batch_size=10, lr=5e-5, weight_decay=1e-5, keep_last=True)
# The embedded benchmark, sized for a 2-core CPU (results/README.md): this project's defaults, one forward
# per view as the authors (measured: results/README.md, "Pilots"), and the finetuning protocol its
# difficulty was calibrated under, on Random alone (results/calibration/).
SYNTHETIC_PRETRAIN = dict(epochs=20, batch_size=32, image_size=64, width=16, threshold=0.1, augment="upright",
                          separate_views=True)
SYNTHETIC_FINETUNE = dict(epochs=50, batch_size=10, lr=1e-3, augment="gentle")
PRESETS = {
    "synthetic-chd": dict(setting="semi", pretrain_data="synthetic-chd-pool", finetune_data="synthetic-chd",
                          patients=[2, 6, 10], folds=5, val=2,
                          pretrain=SYNTHETIC_PRETRAIN, finetune=SYNTHETIC_FINETUNE),
    "synthetic-transfer": dict(setting="transfer", pretrain_from="synthetic-chd", pretrain_data="synthetic-chd-pool",
                               finetune_data="synthetic", patients=[2, 6, 10], folds=5, val=2,
                               finetune=SYNTHETIC_FINETUNE),
    # The paper's settings, for real data on a GPU. M is capped where validation patients must come out
    # of the training part (the authors validated on the test fold).
    "chd": dict(setting="semi", patients=[2, 6, 10, 15, 20, 30, 51], folds=5, val=2,
                pretrain=dict(AUTHORS_PRETRAIN, image_size=512, width=32, threshold=0.1), baselines=BASELINES,
                finetune=dict(AUTHORS_FINETUNE, min_lr=1e-6, augment="none")),
    "acdc": dict(setting="semi", patients=[2, 6, 10, 15, 20, 30, 78], folds=5, val=2,
                 pretrain=dict(AUTHORS_PRETRAIN, image_size=352, width=48, threshold=0.35, spacing=1.25,
                               intensity="zscore", cine=True), baselines=BASELINES,
                 finetune=dict(AUTHORS_FINETUNE, min_lr=5e-6, augment="paper", spacing=1.25, intensity="zscore")),
    "mmwhs": dict(setting="transfer", pretrain_from="chd", patients=[2, 4, 6, 8, 10, 15], folds=5, val=1,
                  finetune=dict(AUTHORS_FINETUNE, image_size=256, spacing=1.0, min_lr=5e-6, augment="none")),
    "hvsmr": dict(setting="transfer", pretrain_from="acdc", patients=[2, 4, 6, 7], folds=5, val=1,
                  finetune=dict(AUTHORS_FINETUNE, image_size=352, spacing=0.7, min_lr=5e-6, augment="paper")),
}


# reproduce.py's flags that change a preset: flag -> (the script it is given to, or both; that script's flag; type)
OVERRIDES = dict(pretrain_epochs=("pretrain", "epochs", int), finetune_epochs=("finetune", "epochs", int),
                 split_seed=("both", "split_seed", int),  # both: the pretraining holds out the finetuning's test fold
                 image_size=("both", "image_size", int), width=("pretrain", "width", int),
                 threshold=("pretrain", "threshold", float), finetune_lr=("finetune", "lr", float))


def resolve(args):
    """The preset args.preset with reproduce.py's command line applied (args: its parsed flags): the data, the
    grid of M and folds, and the flags of both scripts; plus what follows from them ("tested": the grid tests
    patients of the pretraining data; "per_fold": pretrain once per fold, without its test patients)."""
    preset = dict(PRESETS[args.preset])
    source = PRESETS[preset.get("pretrain_from", args.preset)]
    preset["pretrain"], preset["finetune"] = dict(source["pretrain"]), dict(preset["finetune"])
    preset["baselines"] = {method: dict(own) for method, own in source.get("baselines", {}).items()}

    def put(script, key, value):  # the user's value; for pretraining it wins over a baseline's own too
        for settings in [preset[script]] + (list(preset["baselines"].values()) if script == "pretrain" else []):
            settings[key] = value
    for key, (script, flag, _) in OVERRIDES.items():
        if getattr(args, key) is not None:
            for part in (["pretrain", "finetune"] if script == "both" else [script]):
                put(part, flag, getattr(args, key))
    for script in ("pretrain", "finetune"):
        for item in getattr(args, f"{script}_set"):
            key, _, value = item.partition("=")
            put(script, key.replace("-", "_"), {"true": True, "false": False}.get(value.lower(), value))
    if "steps" in preset["finetune"]:  # --finetune-set steps=N replaces the preset's epochs
        preset["finetune"].pop("epochs", None)
    preset["pretrain_data"] = args.pretrain_data or preset.get("pretrain_data")
    preset["finetune_data"] = args.finetune_data or preset.get("finetune_data") or preset["pretrain_data"]
    if preset["pretrain_data"] is None:
        raise RunError(f"--preset {args.preset} needs --pretrain-data DIR")
    if preset["setting"] == "transfer" and data.same_data(preset["finetune_data"], preset["pretrain_data"]):
        raise RunError(f"--preset {args.preset} is a transfer setting: --finetune-data must name another dataset "
                       f"than --pretrain-data ({preset['pretrain_data']})")
    preset["patients"] = args.patients or preset["patients"]
    preset["folds"] = args.folds or preset["folds"]
    preset["fold_list"] = args.fold_list or list(range(preset["folds"]))  # the user's: reproduce.get_args checked them
    preset["tested"] = tested = preset["setting"] == "semi" and data.same_data(preset["pretrain_data"],
                                                                               preset["finetune_data"])
    if args.pretrain_on_all and not tested:
        raise RunError(f"--pretrain-on-all: the grid pretrains on {preset['pretrain_data']}, which holds none of the "
                       f"tested patients ({preset['finetune_data']}); there is nothing to include")
    preset["per_fold"] = tested and not args.pretrain_on_all  # pretrain without the fold's test patients
    return preset


def table_settings(preset):
    """The settings a grid's table is computed with, flat, as its NAME.json holds them (same_settings)."""
    settings = {k: preset[k] for k in ("setting", "pretrain_data", "finetune_data", "folds", "val", "per_fold")}
    settings.update({f"{script}.{flag}": value for script in ("pretrain", "finetune")
                     for flag, value in preset[script].items()})  # e.g. "finetune.epochs": 50
    settings.update({f"pretrain.{method}.{flag}": value for method, own in preset["baselines"].items()
                     for flag, value in own.items()})  # e.g. "pretrain.pirl.lr": 0.01
    return json.loads(json.dumps(settings, default=str))  # as NAME.json reads it back


def same_settings(csv_path, preset, save=True, runs=None):
    """Refuse to add rows to a table computed with other settings (its rows would count as done), or to
    resume the grid's runs (the folder `runs`) begun with them; save the settings beside the table, in
    NAME.json. Methods, M and folds may grow: they are its rows."""
    settings, saved = table_settings(preset), csv_path.with_suffix(".json")
    begun = runs is not None and runs.is_dir() and any(runs.iterdir())
    if saved.exists() and (csv_path.exists() or begun):
        added = {f"{script}.{k}": v for script in ("pretrain", "finetune") for k, v in Run.ADDED.items()}
        before, now = {**added, **json.loads(saved.read_text())}, {**added, **settings}  # a flag newer than the grid
        changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]
        if changed:
            what = f"{csv_path} was computed" if csv_path.exists() else f"the runs in {runs} were begun"
            raise RunError(f"{what} with other settings ({'; '.join(changed[:3])}): give another --name, or delete "
                           f"{'it' if csv_path.exists() else 'them'} and {saved.name} to start over")
    elif csv_path.exists():
        print(f"note: {csv_path} has no {saved.name} (an older table): its rows are taken as done")
    if save:
        save_json(saved, settings)


def flags(settings):
    """A script's settings as its command line: {"batch_size": 32, "separate_views": True} -> ["--batch-size",
    "32", "--separate-views"] (False and None: the flag is left out)."""
    out = []
    for key, value in settings.items():
        if value is not False and value is not None:
            out += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    return out


def pretrain_command(method, fold, preset, args):
    """The run folder of the pretraining of (method, fold), and pretrain.py's flags for it."""
    settings = dict(preset["pretrain"], **preset["baselines"].get(method, {}),  # Rotation, PIRL: their own lr, ...
                    data=preset["pretrain_data"], seed=0, folds=preset["folds"])
    root = Path(args.runs) / "pretrain" / f"{Path(str(preset['pretrain_data'])).name}-{digest(settings)[:10]}"
    out = root / (method + (f"-fold{fold}" if preset["per_fold"] else ""))
    argv = ["--method", method, "--out", str(out), "--resume", "--device", args.device, *flags(settings)]
    return out, argv + (["--holdout-fold", str(fold)] if preset["per_fold"] else [])


def finetune_command(method, M, fold, preset, args):
    """The run folder of one finetuning cell, and finetune.py's flags for it."""
    out = Path(args.runs) / args.name / f"finetune-{method}-M{M}-fold{fold}"
    settings = dict(preset["finetune"], patients=M, fold=fold, folds=preset["folds"], val=preset["val"],
                    data=preset["finetune_data"], seed=0)
    if method == "random":  # Random: the pretraining's network, from random weights, reading the data alike
        same = ("image_size", "width", "bottleneck", "init") + (tuple(data.READING) if preset["tested"] else ())
        settings = dict({k: preset["pretrain"].get(k) for k in same}, **settings)
    pretrained = "none" if method == "random" else pretrain_command(method, fold, preset, args)[0] / "checkpoint.pt"
    return out, ["--pretrained", str(pretrained), "--out", str(out), "--resume", "--device", args.device,
                 *flags(settings)]


def evaluate_command(out, args):
    """evaluate.py's flags for the finetuning in out: its best epoch, scored on its fold's test patients."""
    return ["--checkpoint", str(out / "best.pt"), "--device", args.device, "--json", str(out / "test.json")]
