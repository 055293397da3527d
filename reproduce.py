"""reproduce.py: the paper's experiments, as a grid of pretrain -> finetune -> evaluate cells.

    python reproduce.py --preset synthetic            # semi-supervised, on the embedded data
    python reproduce.py --preset synthetic-transfer   # pretrain MRI-style, finetune CT-style
    python reproduce.py --preset acdc --pretrain-data ACDC_DIR

For every method (random, rotation, pirl, simclr, gcl, pcl) the encoder is pretrained on a pool
that holds no test patient: a separate set of patients (the synthetic presets, and the transfer
setting), or, on real data, every patient outside the test fold, once per fold
(`--pretrain-on-all` pretrains once on every patient, test ones included, as the authors did; the
table then says so). Then for each fold and each M, the U-Net is finetuned on M labeled patients
and evaluated on the fold's test patients. One row per cell goes to results/NAME.csv as soon as the
cell is done, so a killed grid resumes where it stopped. Runs live in runs/reproduce/: pretrainings
under pretrain/, named by their settings so that grids pretraining alike share them (the two
synthetic presets do), finetunings under NAME/.
The table printed at the end is the paper's: methods as rows, M as columns, mean (std) over folds.
"""
import argparse
import contextlib
import csv
import sys
import time
from pathlib import Path

import numpy as np

import data
import evaluate
import finetune
import pretrain
from runs import RunError, load_checkpoint

METHODS = ("random", "rotation", "pirl", "simclr", "gcl", "pcl")
COMMON = dict(folds=5, val=2, batch_size=32, partitions=4, augment="paper", weight_decay=1e-5, seed=0)
SMALL = dict(image_size=64, width=16, threshold=0.1, augment="upright", pretrain_epochs=20,
             finetune_steps=150, finetune_lr=1e-3, patients=[2, 6])
PRESETS = {
    # Sized for a 2-core CPU (each grid under 30 minutes; they share their pretrainings): 20
    # pretraining epochs, 150 finetuning steps whatever M, upright augmentation (measured: README).
    "synthetic": dict(COMMON, setting="semi", pretrain_data="synthetic-pool", finetune_data="synthetic",
                      **SMALL),
    "synthetic-transfer": dict(COMMON, setting="transfer", pretrain_data="synthetic-pool",
                               finetune_data="synthetic-chd", **SMALL),
    # The paper's settings, for real data on a GPU. M is capped where validation patients must
    # come out of the training part (the authors validated on the test fold).
    "chd": dict(COMMON, setting="semi", image_size=512, width=32, threshold=0.1, pretrain_epochs=300, finetune_epochs=100,
                finetune_lr=5e-5, patients=[2, 6, 10, 15, 20, 30, 51]),
    "acdc": dict(COMMON, setting="semi", image_size=224, width=48, threshold=0.35, pretrain_epochs=300,
                 finetune_epochs=100, finetune_lr=5e-5, patients=[2, 6, 10, 15, 20, 30, 78]),
    "mmwhs": dict(COMMON, setting="transfer", val=1, image_size=512, width=32, threshold=0.1, pretrain_epochs=300,
                  finetune_epochs=100, finetune_lr=5e-5, patients=[2, 4, 6, 8, 10, 15]),
    "hvsmr": dict(COMMON, setting="transfer", val=1, image_size=224, width=48, threshold=0.35, pretrain_epochs=300,
                  finetune_epochs=100, finetune_lr=5e-5, patients=[2, 4, 6, 7]),
}


OVERRIDES = dict(pretrain_epochs=int, finetune_epochs=int, finetune_steps=int, image_size=int, width=int, folds=int,
                 threshold=float, finetune_lr=float, augment=str, weight_decay=float)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Run the paper's grid of experiments.")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--pretrain-data", default=None, help="dataset to pretrain on (default: the preset's)")
    p.add_argument("--finetune-data", default=None,
                   help="dataset to finetune and test on (default: the preset's, else --pretrain-data)")
    p.add_argument("--pretrain-on-all", action="store_true",
                   help="real data, same dataset: pretrain once on all patients, test ones included")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--patients", default=None, help="comma-separated list of M (default: the preset's)")
    p.add_argument("--fold-list", default=None, help="comma-separated folds to run (default: all)")
    p.add_argument("--name", default=None, help="results/NAME.csv (default: the preset's name)")
    p.add_argument("--results", default=str(data.REPO / "results"), help="folder of the CSV tables")
    p.add_argument("--runs", default=str(data.REPO / "runs" / "reproduce"), help="folder of the runs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    for key, kind in OVERRIDES.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None, help="override the preset")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.finetune_epochs is not None:  # epochs asked for: no step budget
        preset["finetune_steps"] = None
    preset["pretrain_data"] = args.pretrain_data or preset.get("pretrain_data")
    preset["finetune_data"] = args.finetune_data or preset.get("finetune_data") or preset["pretrain_data"]
    if preset["pretrain_data"] is None:
        raise RunError(f"--preset {args.preset} needs --pretrain-data DIR")
    if preset["setting"] == "transfer" and preset["finetune_data"] == preset["pretrain_data"]:
        raise RunError(f"--preset {args.preset} is a transfer setting: give --finetune-data DIR too")
    if args.patients:
        preset["patients"] = [int(m) for m in args.patients.split(",")]
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise RunError(f"unknown methods {sorted(unknown)}; choose among {', '.join(METHODS)}")
    preset["folds_run"] = ([int(k) for k in args.fold_list.split(",")] if args.fold_list
                           else list(range(preset["folds"])))
    args.name = args.name or args.preset
    return args, preset


def per_fold_pretraining(preset, args):
    """Real data, same dataset for both steps: pretrain without the test fold, once per fold."""
    synthetic_pool = str(preset["pretrain_data"]) in data.SYNTHETIC
    return preset["setting"] == "semi" and not synthetic_pool and not args.pretrain_on_all


def quietly(function, argv, log):
    """Run a script's main() with its output in a log file; errors still reach the caller."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return function(argv)


PRETRAIN_KEYS = ("pretrain_data", "pretrain_epochs", "image_size", "width", "batch_size", "threshold",
                 "partitions", "augment", "weight_decay", "seed", "folds")


def pretrain_cell(method, fold, preset, args):
    """The pretrained checkpoint for (method, fold), trained or resumed when missing; and its time.
    Runs are kept by pretraining settings, so grids that pretrain alike share them."""
    settings = {k: str(preset[k]) for k in PRETRAIN_KEYS}
    root = Path(args.runs) / "pretrain" / f"{Path(str(preset['pretrain_data'])).name}-{data.digest(settings)[:10]}"
    out = root / (f"{method}" + (f"-fold{fold}" if per_fold_pretraining(preset, args) else ""))
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and load_checkpoint(checkpoint)["epoch"] == preset["pretrain_epochs"]:
        return checkpoint, 0.0
    argv = ["--method", method, "--data", str(preset["pretrain_data"]), "--out", str(out), "--resume",
            "--epochs", str(preset["pretrain_epochs"]), "--image-size", str(preset["image_size"]),
            "--width", str(preset["width"]), "--batch-size", str(preset["batch_size"]),
            "--threshold", str(preset["threshold"]), "--augment", preset["augment"],
            "--weight-decay", str(preset["weight_decay"]),
            "--partitions", str(preset["partitions"]), "--seed", str(preset["seed"]), "--device", args.device]
    if per_fold_pretraining(preset, args):
        argv += ["--holdout-fold", str(fold), "--folds", str(preset["folds"])]
    tic = time.time()
    quietly(pretrain.main, argv, out / "stdout.txt")
    return checkpoint, time.time() - tic


def finetune_cell(method, M, fold, pretrained, preset, args, root):
    out = root / f"finetune-{method}-M{M}-fold{fold}"
    argv = ["--pretrained", str(pretrained) if pretrained else "none", "--patients", str(M),
            "--fold", str(fold), "--folds", str(preset["folds"]), "--val", str(preset["val"]),
            "--data", str(preset["finetune_data"]),
            *(["--steps", str(preset["finetune_steps"])] if preset.get("finetune_steps")
              else ["--epochs", str(preset["finetune_epochs"])]),
            "--lr", str(preset["finetune_lr"]), "--image-size", str(preset["image_size"]),
            "--width", str(preset["width"]), "--seed", str(preset["seed"]), "--out", str(out),
            "--resume", "--device", args.device]
    tic = time.time()
    quietly(finetune.main, argv, out / "stdout.txt")
    seconds = time.time() - tic
    tic = time.time()
    result = quietly(evaluate.main, ["--checkpoint", str(out / "best.pt"), "--device", args.device,
                                     "--json", str(out / "test.json")], out / "stdout.txt")
    return result, seconds, time.time() - tic


def run_grid(args, preset):
    root = Path(args.runs) / args.name
    csv_path = Path(args.results) / f"{args.name}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], int(r["M"]), int(r["fold"])) for r in read_rows(csv_path)}
    print(f"{args.name}: pretrain on {preset['pretrain_data']}, finetune on {preset['finetune_data']}"
          f" ({preset['setting']}); M in {preset['patients']}; "
          f"folds {preset['folds_run']}; {len(done)} cells already done")
    if preset["setting"] == "semi" and args.pretrain_on_all:
        print("NOTE: pretrained on all patients, test patients included (as the authors did)")
    for method in args.methods:
        for fold in preset["folds_run"]:
            todo = [M for M in preset["patients"] if (method, M, fold) not in done]
            if not todo:
                continue
            pretrained, pre_seconds = None, 0.0
            if method != "random":
                pretrained, pre_seconds = pretrain_cell(method, fold, preset, args)
            for M in todo:
                result, ft_seconds, ev_seconds = finetune_cell(method, M, fold, pretrained, preset, args, root)
                row = dict(setting=preset["setting"], method=method, M=M, fold=fold,
                           **{f"dice_{c}": round(d, 4) for c, d in zip(result["classes"], result["per_class"])},
                           mean_dice=round(result["mean_dice"], 4), pooled_dice=round(result["pooled_dice"], 4),
                           pretrain_seconds=round(pre_seconds, 1), finetune_seconds=round(ft_seconds, 1),
                           eval_seconds=round(ev_seconds, 1), pretrain_data=preset["pretrain_data"],
                           finetune_data=preset["finetune_data"])
                append_row(csv_path, row)
                pre_seconds = 0.0  # a pretraining's time is counted once, in its first cell
                print(f"  {method:>8} M={M:<3} fold {fold}: pooled Dice {row['pooled_dice']:.3f}, "
                      f"mean Dice {row['mean_dice']:.3f}  ({ft_seconds + ev_seconds:.0f} s)", flush=True)
    return csv_path


def pretrained_checkpoint(argv, method, fold=0):
    """The checkpoint of one pretraining cell of a grid (trained first if missing), for notebooks:
    pretrained_checkpoint(["--preset", "synthetic"], "pcl")."""
    args, preset = get_args(argv)
    return pretrain_cell(method, fold, preset, args)[0]


def finetuned_checkpoint(argv, method, M, fold=0):
    """The best.pt of one finetuning cell of a grid (pretrained and finetuned first if missing)."""
    args, preset = get_args(argv)
    root = Path(args.runs) / args.name
    run = root / f"finetune-{method}-M{M}-fold{fold}"
    state = load_checkpoint(run / "checkpoint.pt") if (run / "checkpoint.pt").exists() else None
    if state is None or state["epoch"] < state["config"]["epochs"]:
        pretrained = None if method == "random" else pretrain_cell(method, fold, preset, args)[0]
        finetune_cell(method, M, fold, pretrained, preset, args, root)
    return run / "best.pt"


def read_rows(path):
    path = Path(path)
    return list(csv.DictReader(path.open())) if path.exists() else []


def append_row(path, row):
    new = not Path(path).exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def table(rows, metric="pooled_dice"):
    """The paper's table: one line per method, mean (std) over folds for each M."""
    Ms = sorted({int(r["M"]) for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [f"{'method':<10}" + "".join(f"{'M=' + str(M):>15}" for M in Ms)]
    for method in methods:
        cells = []
        for M in Ms:
            values = [float(r[metric]) for r in rows if r["method"] == method and int(r["M"]) == M]
            cells.append(f"{np.mean(values):.3f} ({np.std(values):.3f})" if values else "-")
        lines.append(f"{method:<10}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def plot_curves(ax, rows, title, value="pooled_dice"):
    """Dice against M for every method of a results table: mean and std over folds."""
    for method in METHODS:
        Ms = sorted({int(r["M"]) for r in rows if r["method"] == method})
        scores = [[float(r[value]) for r in rows if r["method"] == method and int(r["M"]) == M] for M in Ms]
        if Ms:
            ax.errorbar(Ms, [np.mean(s) for s in scores], yerr=[np.std(s) for s in scores], marker="o",
                        capsize=3, label=method, lw=2.5 if method == "pcl" else 1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(sorted({int(r["M"]) for r in rows}))
    ax.set_xlabel("labeled patients M")
    ax.set_ylabel("Dice" if value == "pooled_dice" else value)
    ax.legend(fontsize=8)


def save_figure(rows, path, title):
    from matplotlib.figure import Figure  # no pyplot: no display backend needed
    fig = Figure(figsize=(5, 3.8))
    plot_curves(fig.subplots(), rows, title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    args, preset = get_args(argv)
    tic = time.time()
    csv_path = run_grid(args, preset)
    rows = read_rows(csv_path)
    folds = sorted({int(r["fold"]) for r in rows})
    print(f"\n{csv_path}: pooled Dice (the paper's), mean (std) over folds {folds}")
    print(table(rows, "pooled_dice"))
    print("\nmean 3D Dice per volume, mean (std) over folds")
    print(table(rows, "mean_dice"))
    save_figure(rows, csv_path.with_suffix(".png"),
                f"{args.name}: pooled Dice, mean and std over {len(folds)} folds")
    print(f"\nfigure: {csv_path.with_suffix('.png')}\ngrid time {time.time() - tic:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except (RunError, data.DataError) as e:
        sys.exit(f"error: {e}")
