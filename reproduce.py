"""reproduce.py: the paper's experiments, as a grid of pretrain -> finetune -> evaluate cells.

    python reproduce.py --preset synthetic-chd          # semi-supervised, on the embedded CHD-like data
    python reproduce.py --preset synthetic-transfer     # pretrain CHD-like CT, finetune ACDC-like MRI
    python reproduce.py --preset acdc --pretrain-data ACDC_DIR

A preset (presets.py) is the command line of each script, the data and the grid of M and folds; the flags
below change it (presets.resolve). For every pretrained method (rotation, pirl, simclr, gcl, pcl; random
starts from random weights) the encoder is pretrained on a pool without test patients: other patients (the
synthetic presets, the transfer setting) or, when the grid pretrains on the dataset it tests, every
patient outside the test fold, once per fold (`--pretrain-on-all` pretrains once on all patients, test
ones included, as the authors did, and the grid says so when it starts). Then for each fold and each M the
U-Net is finetuned on M labeled patients, its best epoch chosen on validation patients, and evaluated on
the fold's test patients. One row per cell goes to results/NAME.csv as soon as the cell is done, so a
killed grid resumes where it stopped; the settings go to results/NAME.json, and a rerun with other
settings under the same name is refused (check_flags and same_settings check before any cell). Runs live
in runs/reproduce/: pretrainings under pretrain/, named by their flags so that grids pretraining alike
share them, finetunings under NAME/. `--dry-run` prints the commands of the cells still to run.
"""
import contextlib
import io
import shlex
import sys
import time
from pathlib import Path

import data
import evaluate
import finetune
import pretrain
from checkpoints import Busy, load_checkpoint
from layouts import find_cases
from presets import OVERRIDES, PRESETS, evaluate_command, finetune_command, pretrain_command, resolve, same_settings
from runs import Parser, RunError, absolute, check_writable, cli, numbers, positive
from tables import METHODS, append_row, paired, read_rows, save_figure, table
from volumes import DataError

GRID_OWNS = {  # the flags each cell sets, not to be given by --pretrain-set / --finetune-set
    "pretrain": dict(method="--methods", data="--pretrain-data", folds="--folds", holdout_fold="--pretrain-on-all",
                     split_seed="--split-seed", out="--runs", resume=None, device="--device", seed=None),
    "finetune": dict(pretrained="--methods", patients="--patients", fold="--fold-list", folds="--folds", val=None,
                     split_seed="--split-seed", data="--finetune-data", out="--runs", resume=None, device="--device",
                     seed=None)}
SET_EXAMPLES = dict(pretrain="separate_views=true tau=0.2", finetune="augment=paper dice_weight=1")  # in -h


def get_args(argv=None):
    p = Parser(description="Run the paper's grid of experiments.")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--pretrain-data", type=data.dataset_name, default=None,
                   help="dataset to pretrain on (default: the preset's)")
    p.add_argument("--finetune-data", type=data.dataset_name, default=None,
                   help="dataset to finetune and test on (default: the preset's, else --pretrain-data)")
    p.add_argument("--pretrain-on-all", action="store_true",
                   help="real data, same dataset: pretrain once on all patients, test ones included")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--patients", type=numbers, default=None, help="comma-separated list of M (default: the preset's)")
    p.add_argument("--folds", type=positive(int), default=None, help="number of folds (default: the preset's)")
    p.add_argument("--fold-list", type=numbers, default=None, help="comma-separated folds (default: all)")
    p.add_argument("--name", default=None, help="results/NAME.csv (default: the preset's name)")
    p.add_argument("--results", type=absolute, default=str(data.REPO / "results"), help="folder of the CSV tables")
    p.add_argument("--runs", type=absolute, default=str(data.REPO / "runs" / "reproduce"), help="folder of the runs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dry-run", action="store_true",
                   help="check the grid and print the commands of the cells still to run; run and write nothing")
    for key, (_, _, kind) in OVERRIDES.items():
        p.add_argument("--" + key.replace("_", "-"), type=positive(kind), default=None, help="override the preset")
    for script, example in SET_EXAMPLES.items():
        p.add_argument(f"--{script}-set", nargs="+", default=[], metavar="KEY=VALUE",
                       help=f"any other flag of {script}.py, e.g. {example}")
    args = p.parse_args(argv)
    args.methods, args.name = args.methods.split(","), args.name or args.preset
    if set(args.methods) - set(METHODS):
        p.error(f"unknown methods {sorted(set(args.methods) - set(METHODS))}; choose among {', '.join(METHODS)}")
    if len(set(args.methods)) < len(args.methods):
        p.error(f"--methods {','.join(args.methods)}: a method given twice")
    folds = args.folds or PRESETS[args.preset]["folds"]
    if args.fold_list and max(args.fold_list) >= folds:
        p.error(f"--fold-list {max(args.fold_list)} must be below the {folds} folds")
    if Path(args.name).name != args.name or args.name in (".", ".."):
        p.error(f"--name {args.name} must be a plain name: it names results/NAME.csv and runs/reproduce/NAME/")
    for script, owned in GRID_OWNS.items():
        for item in getattr(args, f"{script}_set"):
            key = item.partition("=")[0].replace("-", "_")
            if not key or "=" not in item:
                p.error(f"--{script}-set {item}: give KEY=VALUE")
            if key in owned:  # the cell's own value would win, silently
                p.error(f"--{script}-set {item}: each cell sets --{key.replace('_', '-')} itself" +
                        (f"; use {owned[key]}" if owned[key] else ""))
    check_writable(args.results, "--results")
    check_writable(args.runs, "--runs")
    preset = resolve(args)
    try:
        check_flags(args, preset)
    except RunError as e:
        p.error(str(e))
    return args, preset


def quietly(function, argv, log):
    """Run a script's main() with its output in a log file; errors still reach the caller."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return function(argv)


def when_free(function, argv, log):
    """quietly(), waiting while another grid trains the same run (its folder is Busy), then resuming it: a
    no-op once that grid has finished it (a cell's row is then written once, by append_row)."""
    while True:
        try:
            return quietly(function, argv, log)
        except Busy:
            time.sleep(30)


def parsed(script, argv):
    """script.get_args(argv), a refused flag raised as a RunError that names the script."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return script.get_args(argv)
    except SystemExit:
        refusal = err.getvalue().strip().removeprefix("error: ")
        raise RunError(f"the grid's {script.__name__}.py flags: {refusal}") from None


def check_flags(args, preset):
    """Parse every cell's flags before the grid starts, so that a bad one is refused at once. Keep the folders
    the cells read, in preset["folders"], and each cell's finetune.py flags, in preset["finetunings"], for
    plan() to check first: a mistyped folder, the acdc preset's --cine on a folder without ACDC's 4D files, or
    an M larger than a fold's training patients stopped the grid at that cell, after the cells before it."""
    folders, finetunings = set(), []  # (folder or synthetic name, layout, cine); argparse namespaces
    for method in args.methods:
        for fold in preset["fold_list"]:
            pretraining = None
            if method != "random":
                pretraining = parsed(pretrain, pretrain_command(method, fold, preset, args)[1])
                folders.add((pretraining.data, pretraining.layout, pretraining.cine))
            for M in preset["patients"]:  # and how finetune.py would read the data after that pretraining
                finetuning = parsed(finetune, finetune_command(method, M, fold, preset, args)[1])
                finetune.reading(finetuning, pretraining and vars(pretraining))
                folders.add((finetuning.data, finetuning.layout, False))
                finetunings.append(finetuning)
    preset["folders"], preset["finetunings"] = sorted(folders, key=str), finetunings


def pretrained_already(out, argv):
    """Whether the pretraining in out has run all of its epochs."""
    checkpoint = out / "checkpoint.pt"
    return checkpoint.exists() and load_checkpoint(checkpoint)["epoch"] == parsed(pretrain, argv).epochs


def pretrain_cell(method, fold, preset, args):
    """The pretrained checkpoint for (method, fold), trained or resumed when missing; and its time."""
    out, argv = pretrain_command(method, fold, preset, args)
    if pretrained_already(out, argv):
        return out / "checkpoint.pt", 0.0
    tic = time.time()
    when_free(pretrain.main, argv, out / "stdout.txt")
    return out / "checkpoint.pt", time.time() - tic


def finetune_cell(method, M, fold, preset, args):
    """Finetune one cell (or resume it) and evaluate its best epoch; the test results and both times."""
    out, argv = finetune_command(method, M, fold, preset, args)
    tic = time.time()
    when_free(finetune.main, argv, out / "stdout.txt")
    seconds, tic = time.time() - tic, time.time()
    result = quietly(evaluate.main, evaluate_command(out, args), out / "stdout.txt")
    return result, seconds, time.time() - tic


def plan(args, preset):
    """The grid's checks before any cell (the folders its cells read, the settings of its table, saved unless
    --dry-run); the table's path and the grid's cells already in it."""
    for folder, layout, cine in preset["folders"]:  # as the cells will find them; synthetic data is made on use
        if folder not in data.SYNTHETIC:
            find_cases(folder, layout, cine)
    labeled = {}  # (data, layout) -> its labeled patients, found once
    for cell in preset["finetunings"]:  # each cell's M and folds: an M too large stopped the grid at its cell
        try:
            where = (cell.data, cell.layout)
            labeled[where] = labeled.get(where) or finetune.labeled_patients(*where)
            finetune.training_patients(labeled[where], cell)
        except (DataError, RunError) as e:
            raise RunError(f"the grid's finetune.py on {cell.data}: {e}") from None
    csv_path = Path(args.results) / f"{args.name}.csv"
    same_settings(csv_path, preset, save=not args.dry_run, runs=Path(args.runs) / args.name)
    grid = {(method, M, fold) for method in args.methods for M in preset["patients"] for fold in preset["fold_list"]}
    return csv_path, grid & {(r["method"], int(r["M"]), int(r["fold"])) for r in read_rows(csv_path)}


def cells_to_run(args, preset, done):
    """(method, fold, its M not yet done), in the grid's order."""
    for method in args.methods:
        for fold in preset["fold_list"]:
            todo = [M for M in preset["patients"] if (method, M, fold) not in done]
            if todo:
                yield method, fold, todo


def dry_run(args, preset):
    """--dry-run: after the grid's checks, the command of every pretraining, finetuning and evaluation it would
    run, in its order (a finished pretraining is not run again); nothing is run or written. Run by hand (a
    cluster's jobs), they leave the grid only the scoring of each cell: its row's times are then the scoring's."""
    csv_path, done = plan(args, preset)
    cells = list(cells_to_run(args, preset, done))
    lines, pretrainings = [f"# {args.name}: {sum(len(todo) for *_, todo in cells)} cells to run, {len(done)} "
                           f"already in {csv_path}; the commands run in {data.REPO}"], set()
    for method, fold, todo in cells:
        if method != "random":
            out, argv = pretrain_command(method, fold, preset, args)
            if out not in pretrainings and not pretrained_already(out, argv):
                lines.append(shlex.join(["python", "pretrain.py", *argv]))
            pretrainings.add(out)
        for M in todo:
            out, argv = finetune_command(method, M, fold, preset, args)
            lines.append(shlex.join(["python", "finetune.py", *argv]))
            lines.append(shlex.join(["python", "evaluate.py", *evaluate_command(out, args)]))
    try:
        print("\n".join(lines))
    except BrokenPipeError:  # piped into a reader that stopped reading (| head): end without a word
        sys.exit(1)


def run_grid(args, preset):
    csv_path, done = plan(args, preset)
    print(f"{args.name}: pretrain on {preset['pretrain_data']}, finetune on {preset['finetune_data']} "
          f"({preset['setting']}); M in {preset['patients']}; folds {preset['fold_list']} of {preset['folds']}; "
          f"{len(done)} cells already done", flush=True)
    if args.pretrain_on_all:
        print("NOTE: pretrained on all patients, test patients included (as the authors did)")
    for method, fold, todo in cells_to_run(args, preset, done):
        pre_seconds = 0.0 if method == "random" else pretrain_cell(method, fold, preset, args)[1]
        for M in todo:
            result, ft_seconds, ev_seconds = finetune_cell(method, M, fold, preset, args)
            row = dict(setting=preset["setting"], method=method, M=M, fold=fold,
                       **{f"dice_{c}": round(d, 4) for c, d in zip(result["classes"], result["per_class"])},
                       mean_dice=round(result["mean_dice"], 4), pooled_dice=round(result["pooled_dice"], 4),
                       pretrain_seconds=round(pre_seconds, 1), finetune_seconds=round(ft_seconds, 1),
                       eval_seconds=round(ev_seconds, 1), pretrain_data=preset["pretrain_data"],
                       finetune_data=preset["finetune_data"])
            if not append_row(csv_path, row):
                print(f"  {method:>8} M={M:<3} fold {fold}: added meanwhile by another process")
                continue
            pre_seconds = 0.0  # a pretraining's time is counted once, in its first cell
            print(f"  {method:>8} M={M:<3} fold {fold}: pooled Dice {row['pooled_dice']:.3f}, "
                  f"mean Dice {row['mean_dice']:.3f}  ({ft_seconds + ev_seconds:.0f} s)", flush=True)
    return csv_path


def finetuned_checkpoint(argv, method, M, fold=0):
    """The best.pt of one cell of a grid (pretrained and finetuned first if missing), for notebooks."""
    args, preset = get_args(argv)
    run = finetune_command(method, M, fold, preset, args)[0]
    state = load_checkpoint(run / "checkpoint.pt") if (run / "checkpoint.pt").exists() else None
    if state is None or state["epoch"] < state["config"]["epochs"]:
        if method != "random":
            pretrain_cell(method, fold, preset, args)
        finetune_cell(method, M, fold, preset, args)
    return run / "best.pt"


def pretrained_checkpoint(argv, method, fold=0):
    """The checkpoint of one pretraining of a grid (trained first if missing), for notebooks."""
    args, preset = get_args(argv)
    return pretrain_cell(method, fold, preset, args)[0]


def main(argv=None):
    args, preset = get_args(argv)
    if args.dry_run:
        return dry_run(args, preset)
    tic = time.time()
    csv_path = run_grid(args, preset)
    rows = read_rows(csv_path)
    folds = sorted({int(r["fold"]) for r in rows})
    print(f"\n{csv_path}: pooled Dice (the paper's), mean (std) over folds {folds}")
    print(table(rows, "pooled_dice"))
    print("\nmean 3D Dice per volume, mean (std) over folds")
    print(table(rows, "mean_dice"))
    if any(r["method"] == "pcl" for r in rows):
        print("\nper-fold differences, pooled Dice")
        print(paired(rows))
    save_figure(rows, csv_path.with_suffix(".png"), f"{args.name}: pooled Dice, mean and std over {len(folds)} folds")
    print(f"\nfigure: {csv_path.with_suffix('.png')}\ngrid time {time.time() - tic:.0f} s")


if __name__ == "__main__":
    cli(main)
