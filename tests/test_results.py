"""The numbers that README.md, results/README.md and the notebooks' words publish are those of the
committed CSVs and JSONs in results/.

Each table, and each number of a sentence that compares runs, is recomputed here from the rows with plain
Python, written from its definition (a mean, the sample standard deviation with n - 1, a per-fold
difference, a count of folds), not with tables.py, and looked for in the text. So a grid rerun without
its text, a table edited by hand, or a number typed from memory fails here. (And the README's line of contents
links every section.)"""
import csv
import json
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
README = (REPO / "README.md").read_text()
RESULTS_README = (RESULTS / "README.md").read_text()
METHODS = ("random", "rotation", "pirl", "simclr", "gcl", "pcl")  # the paper's order


def pooled(path):
    """{(method, M): {fold: pooled Dice}} of a grid's CSV."""
    cells = {}
    for row in csv.DictReader(path.open()):
        cells.setdefault((row["method"], int(row["M"])), {})[int(row["fold"])] = float(row["pooled_dice"])
    return cells


def mean(values):
    return sum(values) / len(values)


def std(values):
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def cell(values):
    """'mean (std)' over folds, as the tables print it."""
    return f"{mean(values):.3f} ({std(values):.3f})"


def paper(table, method, Ms):
    """The paper's means of one row, from results/paper.csv: '0.184, 0.508, 0.584'."""
    means = {int(r["M"]): r["mean"] for r in csv.DictReader((RESULTS / "paper.csv").open())
             if r["table"] == table and r["method"] == method}
    return ", ".join(f"{float(means[M]):.3f}" for M in Ms)


def folds(cells, key, keep=(0, 1, 2)):
    """One cell's pooled Dice on the folds kept, in fold order."""
    return [cells[key][fold] for fold in keep]


def compare(a, b):
    """a - b fold by fold: its mean, its std over folds, the folds where a is ahead, the folds."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return mean(d), std(d), sum(x > 0 for x in d), len(d)


GRIDS = [("synthetic-chd", "chd", (2, 6, 10)), ("synthetic-transfer", "acdc-hvsmr", (2, 6))]


@pytest.mark.parametrize("text", [README, RESULTS_README], ids=["README", "results-README"])
@pytest.mark.parametrize("grid, paper_table, paper_Ms", GRIDS, ids=[g[0] for g in GRIDS])
def test_the_grid_tables_are_the_csvs(text, grid, paper_table, paper_Ms):
    cells = pooled(RESULTS / f"{grid}.csv")
    assert len(cells) == 18 and {len(v) for v in cells.values()} == {5}, "6 methods x 3 M x 5 folds"
    for method in METHODS:
        name = f"**{method}**" if method == "pcl" else method
        row = " | ".join([name, *(cell(list(cells[(method, M)].values())) for M in (2, 6, 10)),
                          paper(paper_table, method, paper_Ms)])
        assert f"| {row} |" in text, f"not in the text: | {row} |"


def test_the_per_fold_differences_are_the_csvs():
    """results/README.md's blocks of 'M=2   pcl - random   +0.079 (std over folds 0.057), pcl ahead in
    5/5 folds', one per grid: every line recomputed, and no line that no grid gives."""
    expected = []
    for grid, _, _ in GRIDS:
        cells = pooled(RESULTS / f"{grid}.csv")
        for M in (2, 6, 10):
            for other in METHODS[:-1]:
                m, s, ahead, n = compare(*(folds(cells, (method, M), range(5)) for method in ("pcl", other)))
                expected.append(f"M={M:<3} pcl - {other:<8} {m:+.3f} (std over folds {s:.3f}), "
                                f"pcl ahead in {ahead}/{n} folds")
    published = [line for line in RESULTS_README.splitlines() if re.match(r"M=\d+ +pcl - ", line)]
    assert published == expected


def test_the_verdicts_in_words_are_the_csvs():
    """The sentences of README's 'What it shows' and results/README.md's verdict that count folds."""
    semi, transfer = pooled(RESULTS / "synthetic-chd.csv"), pooled(RESULTS / "synthetic-transfer.csv")
    prose = [" ".join(text.split()) for text in (README, RESULTS_README)]  # sentences run across lines

    def versus(cells, a, b, M):  # a - b over the 5 folds: mean, std, folds where a is ahead, folds
        return compare(folds(cells, (a, M), range(5)), folds(cells, (b, M), range(5)))
    over_random = [versus(semi, "pcl", "random", M) for M in (2, 6, 10)]
    assert [g[2] for g in over_random] == [5, 4, 4]  # "every fold at M = 2", "4 of 5 folds at M = 6 and 10"
    m2, m6, m10 = (f"{g[0]:+.3f}" for g in over_random)
    assert f"PCL is above Random in every fold at M = 2 ({m2})" in prose[0]
    assert f"in 4 of 5 folds at M = 6 and 10 ({m6}, {m10})" in prose[0]
    assert f"PCL is above Random in every fold at M = 2, by {m2} (per-fold spread {over_random[0][1]:.3f})" in prose[1]
    spreads = f"spreads {over_random[1][1]:.3f} and {over_random[2][1]:.3f}"
    assert f"ahead in 4 of 5 folds ({m6} and {m10}, {spreads})" in prose[1]
    # "above GCL and PIRL in every fold at every M"
    assert all(versus(semi, "pcl", other, M)[2] == 5 for M in (2, 6, 10) for other in ("gcl", "pirl"))
    over_gcl = [sum(versus(cells, "pcl", "gcl", M)[2] for M in (2, 6, 10)) for cells in (semi, transfer)]
    assert f"PCL is ahead of GCL in {over_gcl[1]} of its 15 fold-cells" in prose[1]
    assert f"GCL is below PCL in {sum(over_gcl)} of 30 fold-cells" in prose[0]
    assert f"PCL beats GCL in {sum(over_gcl)} of 30 fold-cells" in prose[1]
    # "In the transfer grid Random beats every pretrained encoder at M = 6 and 10 in every fold"
    assert all(versus(transfer, "random", method, M)[2] == 5 for M in (6, 10) for method in METHODS[1:])
    # "about half, a fifth and a half of the paper's (+0.172, +0.092, +0.077)"
    paper_gains = [float(paper("chd", "pcl", [M])) - float(paper("chd", "random", [M])) for M in (2, 6, 10)]
    quoted = ", ".join(f"{g:+.3f}" for g in paper_gains)
    assert f"about half, a fifth and a half of the paper's ({quoted})" in prose[0]
    assert [round(g[0] / p, 1) for g, p in zip(over_random, paper_gains)] == [0.5, 0.2, 0.5]
    # "SimCLR by 0.023 at M = 2 (PCL ahead in 2 of 5 folds) and by 0.009 at M = 10 (1 of 5), Rotation by 0.020
    # and 0.006 at M = 2 and 6 (1 of 5 each). Rotation falls behind at M = 10, by 0.080, in every fold."
    simclr2, simclr10 = (versus(semi, "simclr", "pcl", M) for M in (2, 10))
    rotation2, rotation6, rotation10 = (versus(semi, "rotation", "pcl", M) for M in (2, 6, 10))
    assert (f"SimCLR by {simclr2[0]:.3f} at M = 2 (PCL ahead in {5 - simclr2[2]} of 5 folds) and by {simclr10[0]:.3f} "
            f"at M = 10 ({5 - simclr10[2]} of 5), Rotation by {rotation2[0]:.3f} and {rotation6[0]:.3f} at M = 2 and 6 "
            f"({5 - rotation2[2]} of 5 each)") in prose[1] and rotation2[2] == rotation6[2]
    assert f"Rotation falls behind at M = 10, by {-rotation10[0]:.3f}, in every fold" in prose[1] and rotation10[2] == 0
    assert f"SimCLR is level with it or ahead at every M (by {simclr2[0]:.3f} at M = 2)" in prose[0]


def test_what_the_label_fix_moved_is_the_csvs():
    """before-label-fix/ against the grids' folds 0, 1, 2: how far the fix moved the cells, and PCL - Random."""
    moved = {}
    for grid in ("synthetic-chd", "synthetic-transfer"):
        before, after = (pooled(path / f"{grid}.csv") for path in (RESULTS / "before-label-fix", RESULTS))
        assert {fold for c in before.values() for fold in c} == {0, 1, 2}
        moved[grid] = {key: [after[key][fold] - x for fold, x in before[key].items()] for key in before}
    prose = [" ".join(text.split()) for text in (README, RESULTS_README)]
    changes = [x for d in moved["synthetic-chd"].values() for x in d]

    def size(method=None):  # the mean |change| of a CHD-like cell (of one method's cells)
        return f"{mean([abs(x) for (m, _), d in moved['synthetic-chd'].items() if method in (None, m) for x in d]):.3f}"
    assert (f"moved their finetuned cells by {size('simclr')} and {size('gcl')} of Dice on average "
            f"(every method's: {size()})") in prose[0]
    assert (f"moved by {size()} of pooled Dice on average (largest {max(map(abs, changes)):.3f}), with no direction "
            f"(mean change {mean(changes):+.3f}): SimCLR by {size('simclr')} per cell, GCL by {size('gcl')}, "
            f"Random by {size('random')}") in prose[1]
    transfer = [abs(x) for d in moved["synthetic-transfer"].values() for x in d]
    assert f"its cells moved by {mean(transfer):.3f} on average (largest {max(transfer):.3f})" in prose[1]

    semi, old = pooled(RESULTS / "synthetic-chd.csv"), pooled(RESULTS / "before-label-fix" / "synthetic-chd.csv")
    gains = {name: [compare(folds(c, ("pcl", M)), folds(c, ("random", M))) for M in (2, 6, 10)]
             for name, c in (("after", semi), ("before", old))}
    m2, m6, m10 = (f"{g[0]:+.3f}" for g in gains["after"])
    assert f"from {m2}, {m6}, {m10} (folds 0 to 2)" in prose[0]
    assert f"On folds 0, 1 and 2 alone, the differences with Random were {m2}, {m6} and {m10}" in prose[1]
    assert (f"before ({gains['before'][0][0]:+.3f}, {gains['before'][1][0]:+.3f}) and after "
            f"({gains['after'][0][0]:+.3f}, {gains['after'][1][0]:+.3f})") in prose[1]
    assert (f"PCL - Random went from {gains['before'][2][0]:+.3f} to {gains['after'][2][0]:+.3f} "
            f"(spread {gains['after'][2][1]:.3f})") in prose[1]


def calibration_cells(values):
    """A calibration cell: 'mean (std)', with '[n]' where fewer than 3 folds finished (no std of one)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} [1]"
    return cell(values) + (f" [{len(values)}]" if len(values) < 3 else "")


def test_the_calibration_table_is_its_csvs():
    """Every run of results/README.md's calibration table, from calibration/NAME.csv (or first-split/)."""
    # "| chd-v1.15-a2 (first split) | ...", "| **chd-v1.3-a2: chosen** | **...** |": name, label, cells
    runs = re.findall(r"^\| \**((?:chd|mri)-[^ :|*]+)([^|*]*)\** \| (.+) \|$", RESULTS_README, re.M)
    assert len(runs) == 12, "the table's 12 runs"
    for name, label, published in runs:
        folder = RESULTS / "calibration" / ("first-split" if "first split" in label else "")
        cells = pooled(folder / f"{name}.csv")
        assert {method for method, _ in cells} == {"random"}, f"{name}: a calibration run finetunes Random only"
        row = [calibration_cells(list(cells.get(("random", M), {}).values())) for M in (2, 6, 10)]
        if "chosen" in label:
            row = [f"**{c}**" for c in row]
        assert published.split(" | ") == row, name


@pytest.mark.parametrize("name, label, table", [("chd-v1.3-a2", "CHD-like CT (`synthetic-chd`)", "chd"),
                                                ("mri-v1.8", "ACDC-like MRI (`synthetic`)", "acdc")])
def test_readmes_random_table_is_the_chosen_calibration(name, label, table):
    """README's Random table: the chosen calibration runs, beside the paper's Random rows (in both READMEs)."""
    cells = pooled(RESULTS / "calibration" / f"{name}.csv")
    row = " | ".join([label, *(cell(list(cells[("random", M)].values())) for M in (2, 6, 10))])
    assert f"| {row} |" in README
    assert f"**{name}: chosen**" in RESULTS_README
    paper_row = paper(table, "random", (2, 6, 10)).replace(", ", " | ")
    assert f"| paper, {table.upper()} | {paper_row} |" in README
    assert f"| paper, {table.upper()} Random | {paper_row} |" in RESULTS_README


def test_the_first_benchmark_table_is_its_csvs():
    """The history's table (results/README.md), from first-benchmark/'s two grids."""
    semi, transfer = (pooled(RESULTS / "first-benchmark" / f"{g}.csv") for g in ("synthetic", "synthetic-transfer"))
    names = dict(random="Random", rotation="Rotation", pirl="PIRL", simclr="SimCLR", gcl="GCL", pcl="PCL")
    for method in METHODS:
        row = [names[method]] + [cell(list(cells[(method, M)].values())) for cells in (semi, transfer) for M in (2, 6)]
        assert "| " + " | ".join(row) + " |" in RESULTS_README


def test_the_first_benchmarks_pilots_are_their_csvs():
    """first-benchmark/pilots/README.md: one row per CSV, M = 2 over 5 folds, an empty cell where a method
    did not run."""
    folder = RESULTS / "first-benchmark" / "pilots"
    rows = re.findall(r"^\| (\S+\.csv) \| `[^`]+` \| (.*) \|$", (folder / "README.md").read_text(), re.M)
    assert sorted(name for name, _ in rows) == sorted(p.name for p in folder.glob("*.csv")), "a row per CSV"
    for name, published in rows:
        cells = pooled(folder / name)
        assert {M for _, M in cells} == {2}
        row = [cell(folds(cells, (method, 2), range(5))) if (method, 2) in cells else ""
               for method in ("random", "simclr", "gcl", "pcl")]
        assert [c.strip() for c in published.split("|")] == row, name


def test_the_cpu_benchmark_tables_are_its_jsons():
    """README's two CPU tables: the default run (benchmark-cpu.json) and the suite (benchmark-cpu-suite.json)."""
    run = json.loads((RESULTS / "benchmark-cpu.json").read_text())
    # the README: "the default CPU config: PCL, batch 32, 64 x 64 slices, width 16, 2 threads"
    assert (run["device"], run["threads"], run["config"]["image_size"], run["config"]["width"]) == ("cpu", 2, 64, 16)
    for line in [
        f"| matrix multiply (float32, 2048 x 2048): the peak | {run['matmul_flops'] / 1e9:.1f} GFLOP/s |",
        f"| loader alone: batches from the memory-mapped cache | {run['loader_slices_per_s']:,.0f} slices/s |",
        f"| model alone: forward + backward + step on a ready batch | {run['model_slices_per_s']:.1f} slices/s, "
        f"{run['model_flops'] / 1e9:.1f} GFLOP/s, MFU {run['mfu']:.0%} |",
        f"| full step: loader, augmentation on the device, forward, loss, backward, step | "
        f"{run['full_slices_per_s']:.1f} slices/s |",
        f"| overhead ratio (model alone / full step) | {run['overhead_ratio']:.3f} |",
        f"{run['per_sample_slices_per_s']:.1f} slices/s: the batched pipeline is "
        f"{run['speedup_over_per_sample']:.2f}x faster |",
        f"| the paper's CHD pretraining (300 epochs of 17,000 slices) at this size | "
        f"{run['chd_pretraining_hours']:.1f} hours |",
        f"| {run['save_held_ms']:.1f} ms of {run['save_ms']:.1f} ms |",
        f"| peak host memory | {run['peak_host_memory_mb']:.0f} MB |",
    ]:
        assert line in README, f"not in README: {line}"
    # the model's FLOP/s over the matmul peak is the MFU printed
    assert run["mfu"] == pytest.approx(run["model_flops"] / run["matmul_flops"])
    assert run["overhead_ratio"] == pytest.approx(run["model_slices_per_s"] / run["full_slices_per_s"])

    suite = json.loads((RESULTS / "benchmark-cpu-suite.json").read_text())
    labels = {"--threads 2": "`--threads 2` (the default)"}
    assert [r["flags"] for r in suite] == ["--threads 2", "--threads 2 --augment paper", "--threads 2 --image-size 128"]
    for r in suite:
        label = labels.get(r["flags"], f"`{r['flags']}`")
        row = (f"| {label} | {r['loader_slices_per_s']:,.0f} | {r['model_slices_per_s']:.0f} | "
               f"{r['full_slices_per_s']:.0f} | {r['model_slices_per_s'] / r['full_slices_per_s']:.2f} | "
               f"{r['mfu']:.0%} | {r['chd_pretraining_hours']:.1f} |")
        assert row in README, f"not in README: {row}"
        assert r["overhead_ratio"] <= 1.15, "the README: every overhead ratio is within the 1.15 the CPU must keep"


def test_the_investigations_tables_are_their_csvs():
    """'Why PCL loses the transfer grid': each run against the grid as it was then, folds 0, 1, 2."""
    before = pooled(RESULTS / "before-label-fix" / "synthetic-transfer.csv")
    run = {name: pooled(RESULTS / "investigations" / f"transfer-{name}.csv")
           for name in ("pcl-same-style", "finetune-100-epochs", "finetune-lr-3e-3", "pcl-60-epochs")}

    def per_fold(pcl, random, M):  # '-0.059 (0.051), 0/3'
        m, s, ahead, n = compare(folds(pcl, ("pcl", M)), folds(random, ("random", M)))
        return f"{m:+.3f} ({s:.3f}), {ahead}/{n}"

    def row(random, pcl):
        return " | ".join([*(cell(folds(c, (m, M))) for c, m in ((random, "random"), (pcl, "pcl")) for M in (2, 6)),
                           *(per_fold(pcl, random, M) for M in (2, 6))])
    for label, random, pcl in [("the grid before the label fix (CT pool, 50 epochs, lr 1e-3)", before, before),
                               ("100 finetuning epochs (the paper's number)", *[run["finetune-100-epochs"]] * 2),
                               ("finetuning lr 3e-3", *[run["finetune-lr-3e-3"]] * 2)]:
        assert f"| {label} | {row(random, pcl)} |" in RESULTS_README, label
    same_style = run["pcl-same-style"]
    line = "(the grid's) | | " + " | ".join([*(cell(folds(same_style, ("pcl", M))) for M in (2, 6)),
                                                   *(per_fold(same_style, before, M) for M in (2, 6))])
    assert f"| pretrained on the MRI pool (`synthetic-pool`): no change of style | {line} |" in RESULTS_README

    after, longer = pooled(RESULTS / "synthetic-transfer.csv"), run["pcl-60-epochs"]
    for label, pcl in [("the grid: 20 pretraining epochs", after), ("60 pretraining epochs", longer)]:
        cells = [cell(folds(pcl, ("pcl", M))) for M in (2, 6)]
        diffs = [per_fold(pcl, after, M) for M in (2, 6)]
        assert f"  | {label} | " + " | ".join(cells + diffs) + " |" in RESULTS_README, label
    random = [cell(folds(after, ("random", M))) for M in (2, 6)]
    assert f"Random: {random[0]} and {random[1]}." in RESULTS_README


def test_the_views_pilot_table_is_its_csvs():
    joint, separate = (pooled(RESULTS / "pilots" / f"views-{name}.csv") for name in ("joint", "separate"))
    for method, name in (("simclr", "SimCLR"), ("pcl", "PCL")):
        a, b = folds(separate, (method, 2)), folds(joint, (method, 2))
        m, s, ahead, n = compare(a, b)
        row = f"| {name} | {cell(b)} | {cell(a)} | {m:+.3f} (std {s:.3f}), ahead in {ahead}/{n} folds |"
        assert row in RESULTS_README, row
    random = pooled(RESULTS / "calibration" / "chd-v1.3-a2.csv")  # the chosen calibration: Random on these folds
    assert f"| Random (same folds) | {cell(folds(random, ('random', 2)))} | | |" in RESULTS_README


def test_the_refactor_and_scale_pilots_are_their_csvs():
    """The pilots "The refactor kept the results" and "The scale convention moves those cells" (PCL: the rows as stored,
    since 0.5185 is a tie at 3 decimals), against their CSVs."""
    refactor, scale = (pooled(RESULTS / "pilots" / f"{name}.csv") for name in ("refactor-check", "scale-convention"))
    first = pooled(RESULTS / "first-benchmark" / "synthetic.csv")
    prose = " ".join(RESULTS_README.split())
    every = range(5)
    assert (f"Random {cell(folds(refactor, ('random', 2), every))} against the published "
            f"{cell(folds(first, ('random', 2), every))}, PCL {cell(folds(refactor, ('pcl', 2), every))} against "
            f"{cell(folds(first, ('pcl', 2), every))}") in prose
    pcl = scale[("pcl", 2)]
    assert sorted(pcl) == [0, 1], "the run was stopped after fold 1"
    assert (f"gave {cell(folds(scale, ('random', 2), every))} "
            f"instead of {cell(folds(refactor, ('random', 2), every))}, "
            f"and PCL {pcl[0]:.4f} and {pcl[1]:.4f} on folds 0 and 1") in prose


def markdown(notebook):
    """A notebook's markdown cells as one line of prose."""
    cells = json.loads((REPO / "notebooks" / notebook).read_text())["cells"]
    return " ".join(" ".join("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")


def test_the_notebooks_words_are_the_csvs():
    """Notebook 3's 'What it means' and notebook 4's closing words quote the grids: the same numbers."""
    semi, transfer = pooled(RESULTS / "synthetic-chd.csv"), pooled(RESULTS / "synthetic-transfer.csv")
    three, four = markdown("3_results.ipynb"), markdown("4_qualitative.ipynb")
    grid_minus_paper = [[mean(folds(cells, ("random", M), range(5))) - float(paper(table, "random", [M]))
                         for M in (2, 6, 10)] for cells, table in ((semi, "chd"), (transfer, "acdc"))]
    chd, acdc = ([f"{d:+.3f}" for d in row] for row in grid_minus_paper)
    assert f"({chd[0]}, {chd[1]}, {chd[2]})" in three and max(map(abs, grid_minus_paper[0])) <= 0.04 + 5e-4
    assert f"({acdc[0]} at M = 2, then {acdc[1]} and {acdc[2]})" in three and max(map(abs, grid_minus_paper[1])) <= 0.10
    m, s, ahead, n = compare(folds(semi, ("pcl", 2), range(5)), folds(semi, ("random", 2), range(5)))
    assert f"by {m:.3f} on average (per-fold spread {s:.3f})" in three and ahead == n
    assert f"ahead by {m:.3f} at M = 2, in every fold" in four
    assert f"PCL's pooled Dice is {semi[('pcl', 2)][0]:.3f} against Random's {semi[('random', 2)][0]:.3f}" in four

    def classes(name):  # one class's Dice over every M = 2 cell of the CHD-like grid
        rows = csv.DictReader((RESULTS / "synthetic-chd.csv").open())
        return [float(r[f"dice_{name}"]) for r in rows if r["M"] == "2"]
    ra, ao, pa = classes("RA"), classes("AO"), classes("PA")
    assert len(ra) == 30 and not any(ra), "the RA scores 0 in every cell"
    assert (f"the aorta 0 in {sum(x == 0 for x in ao)} of {len(ao)} ({mean(ao):.2f} on average) and the PA "
            f"{mean(pa):.2f} on average") in four
    # the rest of 'What it means' says what README's 'What it shows' says: the same numbers
    gains = [compare(*(folds(semi, (method, M), range(5)) for method in ("pcl", "random"))) for M in (6, 10)]
    assert f"ahead in 4 of 5 folds ({gains[0][0]:+.3f}, {gains[1][0]:+.3f})" in three
    assert [g[2] for g in gains] == [4, 4]
    m, _, ahead, _ = compare(*(folds(semi, (method, 2), range(5)) for method in ("simclr", "pcl")))
    assert f"(by {m:.3f} at M = 2, PCL ahead in {5 - ahead} of 5 folds)" in three
    over_gcl = [sum(c[("pcl", M)][fold] > c[("gcl", M)][fold] for M in (2, 6, 10) for fold in range(5))
                for c in (semi, transfer)]
    assert f"ahead of GCL in {over_gcl[1]} of the 15 fold-cells" in three
    assert f"in {sum(over_gcl)} of the 30 fold-cells of the two grids" in three


def outputs(notebook):
    """The text a notebook printed when it was last run in full (its committed outputs), as one line."""
    cells = json.loads((REPO / "notebooks" / notebook).read_text())["cells"]
    return " ".join(" ".join("".join(o.get("text", "")).split()) for c in cells for o in c.get("outputs", []))


def test_what_the_texts_quote_from_the_notebooks_is_what_they_printed():
    """Numbers that results/README.md and the notebooks' words quote from a notebook's run are in its
    committed outputs, and notebook 3's printed tables are the CSVs'."""
    prose = " ".join(RESULTS_README.split())
    one, two, three, four = (outputs(n) for n in ("1_data_and_positions.ipynb", "2_what_pretraining_learns.ipynb",
                                                  "3_results.ipynb", "4_qualitative.ipynb"))
    centres = {name: rest for name, *rest in re.findall(  # mean, std, lowest, highest
        r"\((synthetic(?:-chd)?)\): heart centre p = (\S+), std over 40 patients (\S+), range (\S+) \.\. (\S+)", one)}
    mri, chd = centres["synthetic"], centres["synthetic-chd"]
    assert (f"centre lies at p = {mri[0]} with a spread of {mri[1]} over the 40 ACDC-like patients (range {mri[2]} "
            f"to {mri[3]}), close to PCL's threshold of 0.1, against {chd[0]} and {chd[1]} on the CHD-like CT") in prose
    growth = {m: [float(x) for x in g.split()] for m, g in re.findall(r"(simclr|pcl): ((?:[\d.]+ ?)+)", two)}
    assert (f"{min(growth['pcl']):.1f} to {max(growth['pcl']):.1f} times larger than at initialization for PCL "
            f"({min(growth['simclr']):.1f} to {max(growth['simclr']):.1f} for SimCLR; notebook 2)") in prose
    pa = dict(re.findall(r"syn_002 +(random|pcl): 3D Dice .*?PA (\S+)", four))
    assert f"pulmonary artery of syn_002 ({pa['pcl']} against {pa['random']})" in markdown("4_qualitative.ipynb")
    for grid, _, _ in GRIDS:
        cells = pooled(RESULTS / f"{grid}.csv")
        for method in METHODS:
            row = " ".join(cell(folds(cells, (method, M), range(5))) for M in (2, 6, 10))
            assert f"{method} {row}" in three, (grid, method)


def test_the_grids_times_are_their_csvs():
    """results/README.md's times of the grids: sums of the CSVs' seconds columns, folds 0 to 2 and 3 to 4."""
    prose = " ".join(RESULTS_README.split())

    def seconds(grid, keep, *columns):
        rows = [r for r in csv.DictReader((RESULTS / f"{grid}.csv").open()) if int(r["fold"]) in keep]
        return len(rows), f"{sum(float(r[c]) for r in rows for c in columns):,.0f} s"
    n, spent = seconds("synthetic-chd", (0, 1, 2), "finetune_seconds", "eval_seconds")
    pretraining = seconds("synthetic-chd", (0, 1, 2), "pretrain_seconds")[1]
    assert f"{n} cells took {spent} of finetuning and testing, and the five pretrainings {pretraining}" in prose
    n, spent = seconds("synthetic-chd", (3, 4), "finetune_seconds", "eval_seconds")
    assert f"Their {n} cells took {spent} and reused the same five pretrainings" in prose
    n, spent = seconds("synthetic-transfer", (0, 1, 2), "finetune_seconds", "eval_seconds")
    assert f"The {n} cells took {spent} of finetuning and testing" in prose
    n, spent = seconds("synthetic-transfer", (3, 4), "finetune_seconds", "eval_seconds")
    assert f"{n} cells in {spent}" in prose


def test_readmes_mutation_table_adds_up():
    """Each run: planted = caught + change nothing + now caught; the last row is the sum of the others."""
    rows = re.findall(r"^\| ([^|]+) \|[^|]*\|[^|]*\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", README, re.M)
    assert [run for run, *_ in rows][-1] == "in all" and len(rows) == 10, "9 rows of runs and their sum"
    counts = [[int(n) for n in numbers] for _, *numbers in rows]
    assert all(planted == caught + nothing + now for planted, caught, nothing, now in counts)
    assert [sum(column) for column in zip(*counts[:-1])] == counts[-1]


def test_readmes_contents_line_links_every_section():
    """The line of contents under the figure: a link per '## ' heading, by GitHub's anchor of its title."""
    headings = re.findall(r"^## (.+)$", README, re.M)
    anchors = ["#" + re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings]
    contents = " ".join(README.split("\nContents: ", 1)[1].split("\n\n", 1)[0].split())
    assert re.findall(r"\]\((#[^)]+)\)", contents) == anchors


def test_the_reading_order_counts_the_lines_of_its_four_files():
    """"Read it in this order" gives the four core files' length (every line) and their code (lines that are not
    blank, a comment or a docstring), about: both from the files themselves, so that an edit cannot leave them stale."""
    import ast
    section = README.split("## Read it in this order")[1].split("\n## ")[0]
    code, total = re.search(r"about ([\d,]+) lines of code\s+\(([\d,]+) lines in all", section).groups()
    files = re.findall(r"^\d\. `(\w+\.py)`", section, re.M)
    assert files == ["losses.py", "pretrain.py", "model.py", "augment.py"]
    lines = {name: (REPO / name).read_text().splitlines() for name in files}
    assert int(total.replace(",", "")) == sum(len(text) for text in lines.values())
    counted = 0
    for name, text in lines.items():
        docstrings = set()
        for node in ast.walk(ast.parse("\n".join(text))):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
        counted += sum(1 for k, line in enumerate(text, 1)
                       if line.strip() and not line.strip().startswith("#") and k not in docstrings)
    assert abs(counted - int(code.replace(",", ""))) <= 0.05 * counted, counted
