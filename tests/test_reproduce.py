"""reproduce.py: a toy grid completes, its CSV has one row per cell, a rerun recomputes nothing;
and every notebook runs top to bottom in its fast mode."""
import csv
from pathlib import Path

import pytest

import reproduce
import tables
from runs import RunError

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


def test_toy_grid_completes_and_a_rerun_recomputes_nothing(toy_data, tmp_path, capsys):
    reproduce.main(toy_grid(toy_data, tmp_path))
    table = rows(tmp_path / "results" / "toy.csv")
    cells = {(r["method"], int(r["M"]), int(r["fold"])) for r in table}
    assert len(table) == 12 and cells == {(m, M, k) for m in ("random", "pcl", "rotation")
                                          for M in (1, 2) for k in (0, 1)}
    assert {r["setting"] for r in table} == {"transfer"}
    assert all(0 <= float(r["pooled_dice"]) <= 1 and "dice_LV" in r for r in table)
    # one pretraining per method, shared by every fold and M in the transfer setting
    assert sorted(p.name for p in (tmp_path / "runs" / "pretrain").glob("pool-*/*")) == ["pcl", "rotation"]
    out = capsys.readouterr().out
    assert "M=1" in out and "rotation" in out

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")}
    reproduce.main(toy_grid(toy_data, tmp_path))  # everything is done: nothing runs again
    assert rows(tmp_path / "results" / "toy.csv") == table
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.pt")} == stamps
    assert "12 cells already done" in capsys.readouterr().out


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


def test_paired_differences_are_taken_fold_by_fold():
    """Hand-counted: PCL - Random = +0.1, -0.1, +0.2 on folds 0-2 (mean +0.067, ahead 2/3; sample std
    sqrt(((1/30)^2 + (1/6)^2 + (2/15)^2) / 2) = 0.153); a fold that only one method has is left out."""
    cells = [("pcl", 0, 0.5), ("pcl", 1, 0.6), ("pcl", 2, 0.7), ("pcl", 3, 0.9),
             ("random", 0, 0.4), ("random", 1, 0.7), ("random", 2, 0.5)]
    table = [dict(method=m, M="2", fold=str(k), pooled_dice=str(d)) for m, k, d in cells]
    assert tables.paired(table) == ("M=2   pcl - random   +0.067 (std over folds 0.153), pcl ahead in 2/3 folds")


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
        return reproduce.pretrain_command("pcl", 1, preset, args)[1], reproduce.finetune_command("pcl", 2, 1, preset, args)[1]
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
