"""tables.py: a grid's results CSV (one row per method, M and fold) as the paper shows it.

    table(rows)        one line per method, mean (std) over folds of the Dice for each M
    paired(rows)       fold by fold, on the same test patients: PCL's Dice minus each other method's
    plot_curves(ax)    Dice against M for every method, mean and std over folds

A std over folds is the sample's, with n - 1 (a few folds estimate the spread of many).

reproduce.py writes the CSV a row at a time (append_row) and prints these; notebook 3 shows them
beside the paper's numbers (results/paper.csv).
"""
import csv
import fcntl
from collections import Counter
from pathlib import Path

import numpy as np

from runs import RunError

METHODS = ("random", "rotation", "pirl", "simclr", "gcl", "pcl")  # the paper's rows, in its order


def read_rows(path):
    """The rows of a results CSV as dicts of strings; none when it does not exist yet. A grid's cell
    (method, M, fold) twice would count twice in its mean: that is an error."""
    path = Path(path)
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    twice = sorted(c for c, n in Counter(cell(r) for r in rows if "fold" in r).items() if n > 1)
    if twice:
        raise RunError(f"{path}: {len(twice)} cell(s) have two rows, first {' '.join(twice[0])} (method, M, fold); "
                       f"delete one of each")
    return rows


def cell(row):
    """A row's grid cell, as the CSV spells it: (method, M, fold)."""
    return row["method"], str(row["M"]), str(row["fold"])


def append_row(path, row):
    """Add one cell's row, with the header when the file is new, unless the file holds that cell already:
    two grids run side by side can both finish one cell. Returns whether it was added. The row is written
    in the file's own column order (an older table may have another), and only with the same columns."""
    with open(path, "a+", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one writer at a time; released when the file is closed
        f.seek(0)
        reader = csv.DictReader(f)
        if cell(row) in {cell(r) for r in reader}:
            return False
        columns = reader.fieldnames or list(row)
        new, lacking = [k for k in row if k not in columns], [k for k in columns if k not in row]
        if new or lacking:
            raise RunError(f"{path}: its columns are not this grid's (not in the table: {', '.join(new) or '-'}; "
                           f"not in this row: {', '.join(lacking) or '-'}); give another --name, or move it aside")
        writer = csv.DictWriter(f, columns)
        if f.tell() == 0:  # read to its end: an empty file is a new one
            writer.writeheader()
        writer.writerow(row)
        return True


def spread(values):
    """The sample standard deviation (n - 1) of a few folds' values; NaN for a single one."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def table(rows, metric="pooled_dice"):
    """The paper's table: one line per method, mean (std) over folds for each M."""
    Ms = sorted({int(r["M"]) for r in rows})
    lines = [f"{'method':<10}" + "".join(f"{'M=' + str(M):>15}" for M in Ms)]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        cells = []
        for M in Ms:
            values = [float(r[metric]) for r in rows if r["method"] == method and int(r["M"]) == M]
            cells.append(f"{np.mean(values):.3f} ({spread(values):.3f})" if values else "-")
        lines.append(f"{method:<10}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def paired(rows, method="pcl", metric="pooled_dice"):
    """Fold by fold, on the same test patients: method's Dice minus each other method's, for each M."""
    lines = []
    for M in sorted({int(r["M"]) for r in rows}):
        ours = {r["fold"]: float(r[metric]) for r in rows if r["method"] == method and int(r["M"]) == M}
        for other in [m for m in METHODS if m != method]:
            theirs = {r["fold"]: float(r[metric]) for r in rows if r["method"] == other and int(r["M"]) == M}
            folds = sorted(set(ours) & set(theirs))
            if folds:
                diff = np.array([ours[k] - theirs[k] for k in folds])  # diff: (folds,)
                lines.append(f"M={M:<3} {method} - {other:<8} {diff.mean():+.3f} (std over folds {spread(diff):.3f}), "
                             f"{method} ahead in {int((diff > 0).sum())}/{len(folds)} folds")
    return "\n".join(lines)


def plot_curves(ax, rows, title, value="pooled_dice"):
    """Dice against M for every method of a results table: mean and std over folds."""
    for method in METHODS:
        Ms = sorted({int(r["M"]) for r in rows if r["method"] == method})
        scores = [[float(r[value]) for r in rows if r["method"] == method and int(r["M"]) == M] for M in Ms]
        if Ms:
            ax.errorbar(Ms, [np.mean(s) for s in scores], yerr=[spread(s) for s in scores], marker="o", capsize=3,
                        label=method, color=f"C{METHODS.index(method)}", lw=2.5 if method == "pcl" else 1.2)
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
