"""reproduce.py: a toy grid completes, its CSV has one row per cell, a rerun recomputes nothing;
and every notebook runs top to bottom in its fast mode."""
import csv
import io
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

import data
import finetune
import presets
import pretrain
import reproduce
import tables
from checkpoints import Busy
from runs import RunError
from volumes import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from synthetic import write_synthetic
    root = tmp_path_factory.mktemp("toy")
    write_synthetic(root / "pool", patients=6, style="mri", seed=11)
    write_synthetic(root / "target", patients=6, style="chd", seed=12)
    return root


def toy_grid(toy_data, tmp_path, *extra):
    return ["--preset", "synthetic-transfer", "--pretrain-data", str(toy_data / "pool"),
            "--finetune-data", str(toy_data / "target"), "--methods", "random,pcl,rotation",
            "--patients", "1,2", "--folds", "3", "--fold-list", "0,1", "--pretrain-epochs", "1",
            "--finetune-epochs", "1", "--image-size", "32", "--width", "4", "--name", "toy",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *extra]


def rows(path):
    return list(csv.DictReader(open(path)))


def test_toy_grid_completes_and_a_rerun_recomputes_nothing(toy_data, tmp_path, capsys, monkeypatch):
    real = reproduce.pretrain_cell  # a pretraining that ran takes 7 s here (a toy one can round to 0.0 s)
    monkeypatch.setattr(reproduce, "pretrain_cell", lambda *a: (lambda path, s: (path, 7.0 if s else 0.0))(*real(*a)))
    reproduce.main(toy_grid(toy_data, tmp_path))
    table = rows(tmp_path / "results" / "toy.csv")
    cells = {(r["method"], int(r["M"]), int(r["fold"])) for r in table}
    assert len(table) == 12 and cells == {(m, M, k) for m in ("random", "pcl", "rotation")
                                          for M in (1, 2) for k in (0, 1)}
    assert {r["setting"] for r in table} == {"transfer"}
    assert all(0 <= float(r["pooled_dice"]) <= 1 and "dice_LV" in r for r in table)
    for r in table:  # each row holds its own cell's scores
        scored = json.loads((tmp_path / "runs" / "toy" / f"finetune-{r['method']}-M{r['M']}-fold{r['fold']}" /
                             "test.json").read_text())
        assert (float(r["pooled_dice"]), float(r["mean_dice"])) == (round(scored["pooled_dice"], 4),
                                                                    round(scored["mean_dice"], 4))
    timed = [(r["method"], r["M"], r["fold"], r["pretrain_seconds"]) for r in table if r["pretrain_seconds"] != "0.0"]
    assert timed == [("pcl", "1", "0", "7.0"), ("rotation", "1", "0", "7.0")]  # once, in its first cell
    # one pretraining per method, shared by every fold and M in the transfer setting
    assert sorted(p.name for p in (tmp_path / "runs" / "pretrain").glob("pool-*/*")) == ["pcl", "rotation"]
    out = capsys.readouterr().out
    assert "M=1" in out and "rotation" in out

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")}
    reproduce.main(toy_grid(toy_data, tmp_path))  # everything is done: nothing runs again
    assert rows(tmp_path / "results" / "toy.csv") == table
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")} == stamps
    assert "12 cells already done" in capsys.readouterr().out


def test_a_dry_run_prints_the_commands_of_the_grid_and_the_grid_gathers_what_they_ran(toy_data, tmp_path, capsys,
                                                                                       monkeypatch):
    """--dry-run checks the grid and prints every command it would run, in its order, and writes nothing. Run by
    hand (a cluster's jobs, say), those commands leave the grid nothing to train: it only scores each cell and
    writes its row. A finished pretraining is not printed again, nor a cell already in the table."""
    grid = toy_grid(toy_data, tmp_path, "--methods", "random,pcl", "--patients", "1")
    table = tmp_path / "results" / "toy.csv"
    header = lambda todo, done: f"# toy: {todo} cells to run, {done} already in {table}; the commands run in {REPO}"
    reproduce.main([*grid, "--dry-run"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == header(4, 0) and len(printed) == 1 + 1 + 2 * 4
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    scripts = {"pretrain.py": pretrain, "finetune.py": finetune, "evaluate.py": reproduce.evaluate}
    for line in printed[1:]:  # by hand: each cell's two commands, PCL's pretraining (its folds share it) first
        python, script, *argv = shlex.split(line)
        scripts[script].main(argv)
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")}
    ran = []
    for script in scripts.values():  # record each main's command line, then run it
        monkeypatch.setattr(script, "main", lambda argv, name=script.__name__, real=script.main:
                            ran.append(shlex.join(["python", f"{name}.py", *argv])) or real(argv))
    reproduce.main(grid)
    assert ran == [line for line in printed[1:] if "pretrain.py" not in line]  # each cell resumed, nothing to train
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")} == trained
    for r in rows(table):
        scored = json.loads((tmp_path / "runs" / "toy" / f"finetune-{r['method']}-M1-fold{r['fold']}" /
                             "test.json").read_text())
        assert float(r["pooled_dice"]) == round(scored["pooled_dice"], 4)
    capsys.readouterr()
    reproduce.main([*grid, "--dry-run"])
    assert capsys.readouterr().out.splitlines() == [header(0, 4)]
    rows_of_random = [line for line in table.read_text().splitlines() if not line.startswith("transfer,pcl,")]
    table.write_text("\n".join(rows_of_random) + "\n")  # PCL's rows lost: its cells, not its pretraining, to run
    reproduce.main([*grid, "--dry-run"])
    pcl_cells = [line for line in printed if "finetune-pcl-" in line]
    assert capsys.readouterr().out.splitlines() == [header(2, 2), *pcl_cells]
    reproduce.main([*grid, "--methods", "pcl", "--dry-run"])  # the count is of this grid's cells, not the table's rows
    assert capsys.readouterr().out.splitlines()[0] == header(2, 0)


def test_relative_runs_and_results_folders_are_made_absolute(tmp_path, monkeypatch):
    """A dry run's commands run in the repository: a relative --runs printed as given wrote elsewhere than the grid,
    run from another folder, then looked (and so trained every cell again)."""
    monkeypatch.chdir(tmp_path)
    args, _ = reproduce.get_args(["--preset", "synthetic-chd", "--runs", "r", "--results", "t"])
    assert (args.runs, args.results) == (str(tmp_path / "r"), str(tmp_path / "t"))


def test_a_dry_run_piped_into_a_reader_that_stops_ends_without_a_word(toy_data, tmp_path, monkeypatch):
    """`reproduce.py --dry-run | head`: the reader stops, the next write fails; that ended with "error: [Errno
    32] Broken pipe". Any other broken pipe is still an error (runs.cli)."""
    class StoppedReader(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", StoppedReader())
    with pytest.raises(SystemExit) as stop:
        reproduce.main([*toy_grid(toy_data, tmp_path), "--dry-run"])
    assert stop.value.code == 1


def test_a_killed_grid_resumes_where_it_stopped(toy_data, tmp_path):
    reproduce.main(toy_grid(toy_data, tmp_path, "--methods", "random"))
    first = rows(tmp_path / "results" / "toy.csv")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")}
    reproduce.main(toy_grid(toy_data, tmp_path, "--methods", "random,pcl"))
    table = rows(tmp_path / "results" / "toy.csv")
    assert table[:len(first)] == first and len(table) == 8
    for path, stamp in stamps.items():  # the random cells were not run again
        assert path.stat().st_mtime_ns == stamp


def test_a_table_takes_no_rows_of_other_settings_but_may_grow(toy_data, tmp_path):
    """A rerun under the same --name with other flags would take the old rows as done and print
    them as its own: it is refused and the table is left as it was. More M (or methods, folds) adds rows."""
    small = ("--methods", "random", "--patients", "1", "--fold-list", "0")
    reproduce.main(toy_grid(toy_data, tmp_path, *small))
    table = (tmp_path / "results" / "toy.csv").read_text()
    with pytest.raises(RunError, match=r"toy.csv was computed with other settings \(finetune.epochs 1 -> 2\)"):
        reproduce.main(toy_grid(toy_data, tmp_path, *small, "--finetune-epochs", "2"))
    assert (tmp_path / "results" / "toy.csv").read_text() == table
    reproduce.main(toy_grid(toy_data, tmp_path, *small, "--patients", "1,2"))
    assert [r["M"] for r in rows(tmp_path / "results" / "toy.csv")] == ["1", "2"]


def test_runs_begun_with_other_settings_are_refused_by_the_grid_even_before_its_table(toy_data, tmp_path):
    """A grid stopped in its first cell has runs but no table yet: rerun under its --name with other flags, it
    saved the new settings and then finetune.py refused to resume with advice (--out) the grid does not take.
    The grid refuses first, naming its runs; once they are deleted too, it starts over."""
    small = ("--methods", "random", "--patients", "1", "--fold-list", "0")
    reproduce.main(toy_grid(toy_data, tmp_path, *small))
    (tmp_path / "results" / "toy.csv").unlink()  # as if stopped before the first row
    saved = (tmp_path / "results" / "toy.json").read_text()
    with pytest.raises(RunError, match=rf"^the runs in {tmp_path}/runs/toy were begun with other settings "
                                       rf"\(finetune.epochs 1 -> 2\): give another --name, or delete them and toy.json"):
        reproduce.main(toy_grid(toy_data, tmp_path, *small, "--finetune-epochs", "2"))
    assert (tmp_path / "results" / "toy.json").read_text() == saved
    shutil.rmtree(tmp_path / "runs" / "toy")
    reproduce.main(toy_grid(toy_data, tmp_path, *small, "--finetune-epochs", "2", "--dry-run"))


@pytest.mark.parametrize("flags,refusal", [
    (("--patients", "1,3"), r"--patients 3: fold 0 has only 2 training patients \(6 labeled, 3 folds, 2 validation\)"),
    (("--folds", "7", "--fold-list", "0"), r"fold 0 of 7 folds is impossible with 6 patients")])
def test_an_m_or_a_fold_count_the_data_cannot_supply_stops_the_grid_before_any_cell(toy_data, tmp_path, flags, refusal):
    """The dry run passed them and the grid stopped only at that cell, after pretraining and the cells before
    it. Both, and a synthetic dataset's count, are refused at once, naming the data; nothing is written."""
    for dry in (["--dry-run"], []):
        with pytest.raises(RunError, match=rf"^the grid's finetune.py on {toy_data}/target: {refusal}"):
            reproduce.main(toy_grid(toy_data, tmp_path, *flags, *dry))
        assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    with pytest.raises(RunError, match=r"^the grid's finetune.py on synthetic-chd: --patients 100: fold 0 has only 30 "
                                       r"training patients \(40 labeled, 5 folds, 2 validation\)"):
        reproduce.main(["--preset", "synthetic-chd", "--patients", "2,100", "--dry-run", "--name", "big",
                        "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])


REFUSED = [(["--image-size", "30"], "finetune", "--image-size"), (["--threshold", "1.5"], "pretrain", "--threshold"),
           (["--pretrain-set", "foo=1"], "pretrain", "--foo"),
           (["--finetune-set", "augment=strong"], "finetune", "--augment"),
           (["--patients", "1,0"], "finetune", "--patients")]


@pytest.mark.parametrize("bad,script,flag", REFUSED, ids=[" ".join(bad) for bad, _, _ in REFUSED])
def test_a_flag_a_script_would_refuse_stops_the_grid_before_any_cell(bad, script, flag, toy_data, tmp_path, capsys):
    """Each cell's script parses its own flags; the grid parses them all first (M = 0 is only the
    second M of each fold), and says which script refused what, on the terminal, not in a cell's log."""
    with pytest.raises(SystemExit) as stop:
        reproduce.main(toy_grid(toy_data, tmp_path, *bad))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"{script}.py" in err and flag in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("bad,said", [(("--methods", "random,random"), "--methods random,random: a method given twice"),
                                      (("--methods", "random,moco"), "unknown methods ['moco']; choose among random"),
                                      (("--patients", "2,2"), "--patients: lists a number twice: '2,2'"),
                                      (("--fold-list", "0,1,0"), "--fold-list: lists a number twice: '0,1,0'")])
def test_a_grid_list_naming_a_cell_twice_or_an_unknown_method_is_refused(bad, said, toy_data, tmp_path, capsys):
    """--methods random,random printed each command twice in a dry run, and the grid's second copy of each
    cell found its row 'added meanwhile by another process'."""
    with pytest.raises(SystemExit) as stop:
        reproduce.main(toy_grid(toy_data, tmp_path, *bad, "--dry-run"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said in err.splitlines()[-1], err


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_the_examples_of_set_in_the_help_are_taken(script, toy_data, tmp_path):
    """-h gave "separate_views=true augment=paper" for both --pretrain-set and --finetune-set: finetune.py has
    no --separate-views, and Rotation's cells refuse --augment paper. Each script's example must now pass the
    grid's check of every cell's flags."""
    items = reproduce.SET_EXAMPLES[script].split()
    args, preset = reproduce.get_args(toy_grid(toy_data, tmp_path, f"--{script}-set", *items))
    for key, _, value in (item.partition("=") for item in items):
        assert preset[script][key] == {"true": True}.get(value, value)


@pytest.mark.parametrize("extra,said", [(["--pretrain-set", "cine=true"], "--cine found no 4D cine file"),
                                        (["--pretrain-data", "typo"], "typo: no such data folder"),
                                        (["--finetune-data", "typo"], "typo: no such data folder")])
def test_a_folder_the_cells_cannot_read_stops_the_grid_before_any_cell(extra, said, toy_data, tmp_path):
    """The acdc preset's --cine on a folder without ACDC's 4D files (nnU-Net's conversion of ACDC, say), or a
    mistyped folder, stopped the grid at its first pretraining, after every Random cell had run."""
    extra = [str(tmp_path / e) if e == "typo" else e for e in extra]
    with pytest.raises(DataError, match=said):
        reproduce.main(toy_grid(toy_data, tmp_path, *extra))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_the_grid_parses_the_flags_of_every_cell_before_the_first(toy_data, tmp_path, monkeypatch):
    """Every method, fold and M: a flag refused only in a later fold's cell would stop the grid midway."""
    seen, real = [], reproduce.parsed

    def recording(script, argv):
        seen.append((script.__name__, real(script, argv)))
        return seen[-1][1]
    monkeypatch.setattr(reproduce, "parsed", recording)
    reproduce.get_args(toy_grid(toy_data, tmp_path))  # random, pcl, rotation; M = 1, 2; folds 0, 1
    finetuned = {("random" if a.pretrained == "none" else Path(a.pretrained).parent.name, a.patients, a.fold)
                 for script, a in seen if script == "finetune"}  # the encoder's run folder is named by its method
    assert finetuned == {(m, M, k) for m in ("random", "pcl", "rotation") for M in (1, 2) for k in (0, 1)}
    assert sorted(a.method for script, a in seen if script == "pretrain") == ["pcl", "pcl", "rotation", "rotation"]


def test_paired_differences_are_taken_fold_by_fold():
    """Hand-counted: PCL - Random = +0.1, -0.1, +0.2 on folds 0-2 (mean +0.067, ahead 2/3; sample std
    sqrt(((1/30)^2 + (1/6)^2 + (2/15)^2) / 2) = 0.153); a fold that only one method has is left out."""
    cells = [("pcl", 0, 0.5), ("pcl", 1, 0.6), ("pcl", 2, 0.7), ("pcl", 3, 0.9),
             ("random", 0, 0.4), ("random", 1, 0.7), ("random", 2, 0.5)]
    table = [dict(method=m, M="2", fold=str(k), pooled_dice=str(d)) for m, k, d in cells]
    assert tables.paired(table) == ("M=2   pcl - random   +0.067 (std over folds 0.153), pcl ahead in 2/3 folds")


def test_the_table_is_the_mean_and_sample_std_over_folds_of_each_m():
    """By hand: pcl M=2: 0.5, 0.6, 0.7 -> 0.600 (sqrt((0.01 + 0 + 0.01) / 2) = 0.100); M=6: 0.9, 0.8 -> 0.850
    (sqrt(2 * 0.0025 / 1) = 0.071)."""
    cells = [(2, 0, 0.5), (2, 1, 0.6), (2, 2, 0.7), (6, 0, 0.9), (6, 1, 0.8)]
    table = [dict(method="pcl", M=str(M), fold=str(k), pooled_dice=str(d)) for M, k, d in cells]
    assert tables.table(table).splitlines()[1] == f"{'pcl':<10}{'0.600 (0.100)':>15}{'0.850 (0.071)':>15}"


def test_a_tie_is_not_a_fold_ahead():
    cells = [("pcl", 0, 0.5), ("pcl", 1, 0.6), ("random", 0, 0.5), ("random", 1, 0.5)]
    assert tables.paired([dict(method=m, M="2", fold=str(k), pooled_dice=str(d)) for m, k, d in cells]).endswith(
        "pcl ahead in 1/2 folds")


@pytest.mark.filterwarnings("error")  # a single fold's std is NaN, without numpy's warning at the terminal
def test_the_table_reads_its_metric_and_lists_methods_in_the_paper_s_order():
    """By hand, mean_dice: pcl M=2 0.1, 0.2, 0.6 -> mean 0.300 (not the median 0.2), sample std sqrt((0.04 + 0.01 +
    0.09) / 2) = 0.265; random M=2 0.5 alone -> std nan; random's row first, as the paper's; pooled_dice is 0 throughout."""
    cells = [("pcl", 0, 0.1), ("pcl", 1, 0.2), ("pcl", 2, 0.6), ("random", 0, 0.5)]
    rows = [dict(method=m, M="2", fold=str(k), mean_dice=str(d), pooled_dice="0") for m, k, d in cells]
    assert tables.table(rows, "mean_dice").splitlines() == [
        f"{'method':<10}{'M=2':>15}", f"{'random':<10}{'0.500 (nan)':>15}", f"{'pcl':<10}{'0.300 (0.265)':>15}"]


def test_paired_differences_keep_each_m_apart_and_read_the_metric():
    """By hand, mean_dice: M=2 diffs +0.1, -0.3 -> -0.100 (std 0.283), ahead 1/2; M=6 +0.1, +0.3 -> +0.200 (std 0.141),
    ahead 2/2. Pairing across M (fold 0 of M=6 with fold 0 of M=2) or reading pooled_dice (0 here) changes them."""
    cells = [("pcl", 2, 0, 0.5), ("pcl", 2, 1, 0.4), ("random", 2, 0, 0.4), ("random", 2, 1, 0.7),
             ("pcl", 6, 0, 0.8), ("pcl", 6, 1, 0.9), ("random", 6, 0, 0.7), ("random", 6, 1, 0.6)]
    rows = [dict(method=m, M=str(M), fold=str(k), mean_dice=str(d), pooled_dice="0") for m, M, k, d in cells]
    assert tables.paired(rows, metric="mean_dice").splitlines() == [
        "M=2   pcl - random   -0.100 (std over folds 0.283), pcl ahead in 1/2 folds",
        "M=6   pcl - random   +0.200 (std over folds 0.141), pcl ahead in 2/2 folds"]


def test_the_curves_plot_the_metric_s_mean_against_m_with_the_sample_std():
    """By hand, mean_dice of pcl: M=2 0.1, 0.2, 0.6 -> 0.3 +- 0.2646; M=6 0.8, 0.9 -> 0.85 +- 0.0707 (n - 1)."""
    from matplotlib.figure import Figure
    cells = [(2, 0, 0.1), (2, 1, 0.2), (2, 2, 0.6), (6, 0, 0.8), (6, 1, 0.9)]
    rows = [dict(method="pcl", M=str(M), fold=str(k), mean_dice=str(d), pooled_dice="0") for M, k, d in cells]
    ax = Figure().subplots()
    tables.plot_curves(ax, rows, "title", value="mean_dice")
    (curve,) = ax.containers  # one errorbar: its line, and its bars as a LineCollection
    assert list(curve.lines[0].get_xdata()) == [2, 6]
    assert list(curve.lines[0].get_ydata()) == pytest.approx([0.3, 0.85])
    bars = [value for (x0, y0), (_, y1) in curve.lines[2][0].get_segments() for value in (x0, y0, y1)]
    assert bars == pytest.approx([2, 0.3 - 0.2646, 0.3 + 0.2646, 6, 0.85 - 0.0707, 0.85 + 0.0707], abs=1e-4)
    assert ax.get_ylabel() == "mean_dice"


def test_a_row_goes_under_the_table_s_own_columns_and_a_new_column_is_refused(tmp_path):
    """An older table may order its columns otherwise: each value still lands under its own name. A row with a column
    the table lacks (another dataset's classes, say) is one line naming the file, and the table is left as it was."""
    path = tmp_path / "grid.csv"
    path.write_text("method,M,fold,pooled_dice,mean_dice\npcl,2,0,0.5,0.4\n")
    assert tables.append_row(path, dict(method="pcl", M=2, fold=1, mean_dice=0.3, pooled_dice=0.6))
    assert tables.read_rows(path)[1] == dict(method="pcl", M="2", fold="1", pooled_dice="0.6", mean_dice="0.3")
    before = path.read_text()
    with pytest.raises(RunError, match=r"grid.csv: its columns are not this grid's \(not in the table: dice_LV; not in this row: -\); "):
        tables.append_row(path, dict(method="pcl", M=2, fold=2, mean_dice=0.3, pooled_dice=0.6, dice_LV=0.7))
    assert path.read_text() == before


def test_a_cell_finished_by_two_grids_is_one_row(tmp_path):
    """Two grids side by side can both finish a cell; its second row would count twice in the mean over folds."""
    path = tmp_path / "grid.csv"
    row = dict(setting="semi", method="pcl", M=2, fold=0, pooled_dice=0.5)
    assert tables.append_row(path, row) and tables.append_row(path, dict(row, fold=1))
    assert not tables.append_row(path, dict(row, pooled_dice=0.6))  # the same cell, from the other grid
    assert [(r["fold"], r["pooled_dice"]) for r in tables.read_rows(path)] == [("0", "0.5"), ("1", "0.5")]
    with path.open("a") as f:  # a duplicate written by an older version
        f.write("semi,pcl,2,1,0.7\n")
    with pytest.raises(RunError, match=r"grid.csv: 1 cell\(s\) have two rows, first pcl 2 1 \(method, M, fold\)"):
        tables.read_rows(path)


def test_real_presets_need_data():
    with pytest.raises(RunError, match="--pretrain-data"):
        reproduce.get_args(["--preset", "acdc"])
    with pytest.raises(RunError, match="--finetune-data"):
        reproduce.get_args(["--preset", "mmwhs", "--pretrain-data", "somewhere"])
    with pytest.raises(RunError, match="transfer setting"):  # the pool's folder, spelled as a path
        reproduce.get_args(["--preset", "synthetic-transfer", "--finetune-data", str(REPO / "data" / "synthetic-chd-pool")])


def test_the_grid_pretrains_without_a_fold_s_test_patients_whenever_it_tests_on_its_data(tmp_path):
    """Whether the pretraining holds out each fold comes from the data, not its name: a semi-supervised grid
    that pretrains on the dataset it tests holds the fold out (with the finetuning's split seed), unless
    --pretrain-on-all asks for the authors' way; one that pretrains on other patients has nothing to hold out."""
    base = ["--preset", "synthetic-chd", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]

    def pretraining_flags(*extra):
        args, preset = reproduce.get_args(base + list(extra))
        return presets.pretrain_command("pcl", 1, preset, args)[1], presets.finetune_command("pcl", 2, 1, preset, args)[1]
    assert "--holdout-fold" not in pretraining_flags()[0]  # the pool: other patients
    own, finetuning = pretraining_flags("--pretrain-data", "synthetic-chd", "--split-seed", "3")
    assert own[own.index("--holdout-fold") + 1] == "1" and own[own.index("--split-seed") + 1] == "3"
    assert finetuning[finetuning.index("--split-seed") + 1] == "3"
    assert "--holdout-fold" not in pretraining_flags("--pretrain-data", "synthetic-chd", "--pretrain-on-all")[0]
    with pytest.raises(RunError, match="--pretrain-on-all: the grid pretrains on synthetic-chd-pool, which holds none"):
        reproduce.get_args(base + ["--pretrain-on-all"])


def test_the_grid_runs_every_fold_or_the_listed_ones(tmp_path):
    base = ["--preset", "synthetic-chd", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    assert reproduce.get_args(base)[1]["fold_list"] == [0, 1, 2, 3, 4]  # the preset's 5 folds
    assert reproduce.get_args(base + ["--folds", "3"])[1]["fold_list"] == [0, 1, 2]  # no list: every fold
    assert reproduce.get_args(base + ["--fold-list", "3,1"])[1]["fold_list"] == [3, 1]
    with pytest.raises(SystemExit):  # a listed fold past --folds is refused, not dropped
        reproduce.get_args(base + ["--folds", "2", "--fold-list", "0,2"])


def grid_args(tmp_path, *argv):
    return reproduce.get_args([*argv, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])


def test_each_fold_pretrains_its_own_encoder_holding_out_the_fold_it_is_tested_on(tmp_path):
    """Per fold (a grid that tests on its pretraining data), fold k's encoder is a run of its own, and it
    holds out exactly the test fold its finetuning scores: the same folds, fold and split seed."""
    args, preset = grid_args(tmp_path, "--preset", "synthetic-chd", "--pretrain-data", "synthetic-chd", "--folds", "3")
    outs = set()
    for fold in (0, 1, 2):
        out, argv = presets.pretrain_command("pcl", fold, preset, args)
        outs.add(out)
        pre = pretrain.get_args(argv)
        fine = finetune.get_args(presets.finetune_command("pcl", 2, fold, preset, args)[1])
        assert (pre.folds, pre.holdout_fold, pre.split_seed) == (fine.folds, fine.fold, fine.split_seed) == (3, fold, 0)
        assert fine.pretrained == str(out / "checkpoint.pt")  # and fold k's finetuning starts from that encoder
    assert len(outs) == 3  # fold 1 never reuses fold 0's encoder, which saw fold 1's test patients


def test_grids_share_a_pretraining_only_when_it_is_the_same(tmp_path, monkeypatch):
    """Pretrainings are named by their flags: a grid that differs only in its finetuning shares them; other folds (fold 1
    of 3 holds out other patients than fold 1 of 5), another folder of the same name or a baseline's own lr is another run."""
    def out(*argv, method="pcl"):
        args, preset = grid_args(tmp_path, *argv, "--methods", method, "--fold-list", "1")
        return presets.pretrain_command(method, 1, preset, args)[0]
    own = ("--preset", "synthetic-chd", "--pretrain-data", "synthetic-chd")
    assert out(*own) == out(*own, "--name", "other", "--finetune-epochs", "3")
    assert out(*own) != out(*own, "--folds", "3")
    assert out("--preset", "synthetic-chd", "--pretrain-data", str(tmp_path / "a" / "pool")) != \
           out("--preset", "synthetic-chd", "--pretrain-data", str(tmp_path / "b" / "pool"))
    chd = ("--preset", "chd", "--pretrain-data", "D")
    before = out(*chd, method="pirl")
    monkeypatch.setitem(presets.BASELINES["pirl"], "lr", 0.02)
    assert out(*chd, method="pirl") != before


def test_a_transfer_grid_keeps_the_finetuning_s_own_patch_unless_image_size_is_given(tmp_path):
    """mmwhs finetunes at 256 what chd pretrains at 512: Random takes the encoder's shape from the pretraining, not its
    patch; --image-size sets both scripts'."""
    transfer = ("--preset", "mmwhs", "--pretrain-data", "P", "--finetune-data", "F", "--fold-list", "0")
    args, preset = grid_args(tmp_path, *transfer, "--methods", "random")
    random = finetune.get_args(presets.finetune_command("random", 2, 0, preset, args)[1])
    assert (random.image_size, random.width, random.bottleneck, random.init) == (256, 32, "plain", "he")
    args, preset = grid_args(tmp_path, *transfer, "--methods", "pcl", "--image-size", "128")
    assert pretrain.get_args(presets.pretrain_command("pcl", 0, preset, args)[1]).image_size == 128
    assert finetune.get_args(presets.finetune_command("pcl", 2, 0, preset, args)[1]).image_size == 128


def test_each_override_reaches_its_own_script(tmp_path):
    """--pretrain-epochs and --width, --threshold the pretraining only; --finetune-lr the finetuning only (its epochs
    stay the preset's 50, pretrain.py's lr its default 0.1)."""
    args, preset = grid_args(tmp_path, "--preset", "synthetic-chd", "--pretrain-epochs", "7",
                             "--finetune-lr", "0.002", "--width", "8", "--threshold", "0.2")
    pre = pretrain.get_args(presets.pretrain_command("pcl", 0, preset, args)[1])
    fine = finetune.get_args(presets.finetune_command("pcl", 2, 0, preset, args)[1])
    assert (pre.epochs, pre.lr, pre.width, pre.threshold) == (7, 0.1, 8, 0.2)
    assert (fine.epochs, fine.lr) == (50, 0.002)


def test_false_in_set_turns_a_preset_s_switch_off_and_the_presets_stay_as_they_are(tmp_path):
    """separate_views=false drops the preset's --separate-views; resolving copies the presets, never writes in them."""
    args, preset = grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D", "--width", "8",
                             "--pretrain-set", "separate_views=false", "tau=0.2")
    assert not pretrain.get_args(presets.pretrain_command("pcl", 0, preset, args)[1]).separate_views
    assert (presets.PRESETS["chd"]["pretrain"]["width"], presets.BASELINES["pirl"]["tau"]) == (32, 0.07)


LABELED = {"chd": 68, "acdc": 100, "chd-mmwhs": 20, "acdc-hvsmr": 10}  # labeled patients of each paper dataset
CAPS = {"acdc": 78, "chd-mmwhs": 15, "acdc-hvsmr": 7}  # the README: the largest M that leaves validation patients


def test_real_grids_run_the_paper_s_m_and_the_largest_fits_every_fold(tmp_path):
    paper = {}
    for row in csv.DictReader((REPO / "results" / "paper.csv").open()):
        paper.setdefault(row["table"], set()).add(int(row["M"]))
    for table, name in (("chd", "chd"), ("acdc", "acdc"), ("chd-mmwhs", "mmwhs"), ("acdc-hvsmr", "hvsmr")):
        expected = sorted({min(M, CAPS.get(table, M)) for M in paper[table]})
        transfer = [] if table in ("chd", "acdc") else ["--finetune-data", "F"]
        args, preset = grid_args(tmp_path, "--preset", name, "--pretrain-data", "P", *transfer)
        assert preset["patients"] == expected, name
        patients = [f"p{i:03d}" for i in range(LABELED[table])]
        for fold in range(preset["folds"]):  # the largest M fits every fold's training part, with the cell's --val
            cell = finetune.get_args(presets.finetune_command("random", max(expected), fold, preset, args)[1])
            split = data.split_patients(patients, cell.folds, cell.fold, cell.split_seed, cell.val)
            assert cell.patients <= len(split["train"]), (name, fold, cell.val)


def test_random_is_the_network_of_the_encoders_it_is_compared_with(tmp_path):
    args, preset = grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D")
    random = finetune.get_args(presets.finetune_command("random", 2, 0, preset, args)[1])
    finetune.pretrained_encoder(random, torch.device("cpu"))  # fills in Random's defaults
    pcl = pretrain.get_args(presets.pretrain_command("pcl", 0, preset, args)[1])
    assert [getattr(random, k) for k in ("image_size", "width", "bottleneck", "init")] == \
           [getattr(pcl, k) for k in ("image_size", "width", "bottleneck", "init")] == [512, 32, "plain", "he"]


def test_an_unfinished_pretraining_is_finished_not_taken_as_done(tmp_path, monkeypatch):
    args, preset = grid_args(tmp_path, "--preset", "synthetic-chd", "--pretrain-epochs", "3")
    out, argv = presets.pretrain_command("pcl", 0, preset, args)
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"")
    ran = []
    monkeypatch.setattr(reproduce, "quietly", lambda function, argv, log: ran.append(argv))
    for epoch, runs_again in ((2, True), (3, False)):  # stopped after 2 of 3 epochs; then whole
        monkeypatch.setattr(reproduce, "load_checkpoint", lambda path: {"epoch": epoch})
        ran.clear()
        assert reproduce.pretrain_cell("pcl", 0, preset, args)[0] == out / "checkpoint.pt"
        assert ran == ([argv] if runs_again else [])


def test_a_run_another_grid_is_training_is_waited_for_then_resumed(tmp_path, monkeypatch):
    """A cell's folder held by another grid (Busy) is waited for, 30 s at a time, then resumed; both kinds of cell."""
    calls, waits = [], []

    def busy_twice(function, argv, log):  # the other grid lets go of a training run after two tries
        calls.append(function)
        if function in (pretrain.main, finetune.main) and calls.count(function) < 3:
            raise Busy("being written by another process")
        return {"pooled_dice": 0.5}
    monkeypatch.setattr(reproduce, "quietly", busy_twice)
    monkeypatch.setattr(reproduce.time, "sleep", waits.append)
    args, preset = grid_args(tmp_path, "--preset", "synthetic-chd")
    reproduce.pretrain_cell("pcl", 0, preset, args)
    assert calls == [pretrain.main] * 3 and waits == [30, 30]
    calls.clear()
    waits.clear()
    assert reproduce.finetune_cell("pcl", 2, 0, preset, args)[0] == {"pooled_dice": 0.5}  # evaluated once it was free
    assert calls == [finetune.main] * 3 + [reproduce.evaluate.main] and waits == [30, 30]


def test_a_table_refuses_rows_pretrained_otherwise_or_with_a_flag_removed(tmp_path):
    """per_fold (the test patients held out of the pretraining, or not) and a --finetune-set flag given
    before and not now are other settings: their rows must not count as done."""
    base = ["--preset", "synthetic-chd", "--pretrain-data", "synthetic-chd"]
    csv_path = tmp_path / "grid.csv"
    csv_path.write_text("setting,method,M,fold\n")
    presets.same_settings(csv_path, grid_args(tmp_path, *base)[1])
    with pytest.raises(RunError, match=r"per_fold True -> False"):
        presets.same_settings(csv_path, grid_args(tmp_path, *base, "--pretrain-on-all")[1])
    csv_path.with_suffix(".json").unlink()
    presets.same_settings(csv_path, grid_args(tmp_path, *base, "--finetune-set", "dice_weight=1")[1])
    with pytest.raises(RunError, match=r"finetune.dice_weight '1' -> None"):
        presets.same_settings(csv_path, grid_args(tmp_path, *base)[1])


def test_a_table_refuses_rows_of_another_baseline_setting_unless_it_was_deleted(tmp_path, monkeypatch):
    """PIRL's own lr changed in presets.py: its rows are of other settings. A table deleted (its NAME.json left behind)
    has no rows to mistake: the grid starts over and saves the new settings."""
    csv_path = tmp_path / "grid.csv"
    csv_path.write_text("setting,method,M,fold\n")
    presets.same_settings(csv_path, grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D")[1])
    monkeypatch.setitem(presets.BASELINES["pirl"], "lr", 0.02)
    _, preset = grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D")
    with pytest.raises(RunError, match=r"pretrain.pirl.lr 0.01 -> 0.02"):
        presets.same_settings(csv_path, preset)
    csv_path.unlink()
    presets.same_settings(csv_path, preset)
    assert json.loads(csv_path.with_suffix(".json").read_text())["pretrain.pirl.lr"] == 0.02


def test_a_grid_begun_before_a_flag_existed_ran_with_the_flag_s_value_then(tmp_path):
    """--keep-last came after the first grids: a table saved without it was finetuned without it, so the
    chd preset (which keeps the last batch now) is another setting, and keep_last=false continues it."""
    csv_path = tmp_path / "grid.csv"
    csv_path.write_text("setting,method,M,fold\n")
    presets.same_settings(csv_path, grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D")[1])
    saved = json.loads(csv_path.with_suffix(".json").read_text())
    assert saved.pop("finetune.keep_last") is True
    csv_path.with_suffix(".json").write_text(json.dumps(saved))  # as a grid begun before the flag saved it
    with pytest.raises(RunError, match=r"finetune.keep_last False -> True"):
        presets.same_settings(csv_path, grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D")[1])
    presets.same_settings(csv_path, grid_args(tmp_path, "--preset", "chd", "--pretrain-data", "D",
                                              "--finetune-set", "keep_last=false")[1])
    synthetic = tmp_path / "synthetic.csv"  # a preset without the flag: its tables never name it, old or new
    synthetic.write_text("setting,method,M,fold\n")
    for _ in range(2):
        presets.same_settings(synthetic, grid_args(tmp_path, "--preset", "synthetic-chd")[1])
    assert "finetune.keep_last" not in json.loads(synthetic.with_suffix(".json").read_text())


def test_a_grid_runs_only_the_cells_its_table_lacks(tmp_path, monkeypatch):
    """The CSV spells M as text: (random, M=1, fold 0) is done, (random, M=2, fold 0) alone is finetuned."""
    args, preset = grid_args(tmp_path, "--preset", "synthetic-chd", "--methods", "random", "--patients", "1,2",
                             "--fold-list", "0", "--name", "toy")
    (tmp_path / "results").mkdir()
    tables.append_row(tmp_path / "results" / "toy.csv", dict(setting="semi", method="random", M=1, fold=0))
    ran, scores = [], dict(classes=[], per_class=[], mean_dice=0.5, pooled_dice=0.5)
    monkeypatch.setattr(reproduce, "finetune_cell", lambda method, M, fold, *_: ran.append((method, M, fold)) or (scores, 1, 1))
    monkeypatch.setattr(reproduce, "append_row", lambda path, row: True)
    reproduce.run_grid(args, preset)
    assert ran == [("random", 2, 0)]


def test_a_cell_is_scored_at_its_best_epoch(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(reproduce, "quietly", lambda function, argv, log: ran.append((function, argv)) or {})
    args, preset = grid_args(tmp_path, "--preset", "synthetic-chd")
    out = presets.finetune_command("pcl", 2, 0, preset, args)[0]
    reproduce.finetune_cell("pcl", 2, 0, preset, args)
    assert ran[1] == (reproduce.evaluate.main, ["--checkpoint", str(out / "best.pt"), "--device", "auto",
                                                "--json", str(out / "test.json")])


def test_the_grid_prints_both_dice_tables_and_the_paired_differences(tmp_path, capsys, monkeypatch):
    """By hand: pooled Dice random 0.4, 0.6 -> 0.500 (0.141), pcl 0.7, 0.9 -> 0.800 (0.141); mean Dice random 0.3, 0.5
    -> 0.400 (0.141), pcl 0.2, 0.4 -> 0.300 (0.141); pooled PCL - Random +0.3 on both folds."""
    csv_path = tmp_path / "toy.csv"
    for method, fold, pooled, mean in (("random", 0, 0.4, 0.3), ("random", 1, 0.6, 0.5), ("pcl", 0, 0.7, 0.2),
                                       ("pcl", 1, 0.9, 0.4)):
        tables.append_row(csv_path, dict(setting="semi", method=method, M=2, fold=fold, mean_dice=mean, pooled_dice=pooled))
    monkeypatch.setattr(reproduce, "run_grid", lambda args, preset: csv_path)
    reproduce.main(["--preset", "synthetic-chd", "--methods", "random,pcl", "--name", "toy", "--runs", str(tmp_path),
                    "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{'random':<10}{'0.500 (0.141)':>15}\n{'pcl':<10}{'0.800 (0.141)':>15}" in out  # pooled
    assert f"{'random':<10}{'0.400 (0.141)':>15}\n{'pcl':<10}{'0.300 (0.141)':>15}" in out  # mean
    assert "M=2   pcl - random   +0.300 (std over folds 0.000), pcl ahead in 2/2 folds" in out
    assert (tmp_path / "toy.png").exists()


def test_a_reading_flag_the_pretraining_would_refuse_stops_the_grid_before_any_cell(tmp_path, capsys):
    """On its own data finetune.py refuses another --intensity than the pretraining's: the grid says so at once,
    not after pretraining the encoders."""
    with pytest.raises(SystemExit) as stop:
        grid_args(tmp_path, "--preset", "synthetic-chd", "--pretrain-data", "synthetic-chd",
                  "--finetune-set", "intensity=zscore")
    assert stop.value.code == 2 and "--intensity zscore" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["synthetic-chd", "synthetic-transfer"])
def test_the_synthetic_presets_are_those_of_the_committed_tables(name, tmp_path):
    """results/NAME.json holds the settings the committed table was computed with: the preset must still
    resolve to them (else the README's numbers describe another recipe, and a rerun is refused)."""
    for suffix in (".csv", ".json"):
        (tmp_path / (name + suffix)).write_bytes((REPO / "results" / (name + suffix)).read_bytes())
    presets.same_settings(tmp_path / (name + ".csv"), grid_args(tmp_path, "--preset", name)[1])


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")))
def test_notebook_runs_in_fast_mode(notebook, monkeypatch):
    """Top to bottom in the fast mode: a cell that raises fails the test (nbclient raises)."""
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("PCL_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()


# -------------------------------------------------------- paired differences of a grid still running
def test_paired_differences_use_only_the_folds_both_methods_have():
    """A grid still running: random has folds 0-2, pcl 0-1, simclr only fold 0. Each pair is taken over the
    folds both have: pcl - random over folds 0, 1 (+0.1, -0.1: mean 0, sample std 0.141, ahead in 1 of 2);
    pcl - simclr over fold 0 alone (-0.1, no std, ahead in 0 of 1)."""
    cells = [("pcl", 0, 0.8), ("pcl", 1, 0.6), ("random", 0, 0.7), ("random", 1, 0.7), ("random", 2, 0.1),
             ("simclr", 0, 0.9)]
    rows = [dict(method=m, M="2", fold=str(k), pooled_dice=str(d)) for m, k, d in cells]
    assert tables.paired(rows).splitlines() == [
        "M=2   pcl - random   +0.000 (std over folds 0.141), pcl ahead in 1/2 folds",
        "M=2   pcl - simclr   -0.100 (std over folds nan), pcl ahead in 0/1 folds"]
