"""What users type: every bad value is one line and exit code 2 before anything is written; Ctrl-C,
killed saves and builds leave nothing half-written; two processes never share a run folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import benchmark
import checkpoints
import data
import evaluate
import finetune
import pretrain
import reproduce
import runs
import synthetic
from conftest import REPO
from losses import positives_of
from volumes import DataError

BAD_PRETRAIN = [["--batch-size", "0"], ["--batch-size", "-4"], ["--epochs", "0"], ["--epochs", "-1"],
                ["--threshold", "-0.5"], ["--threshold", "0"], ["--tau", "0"], ["--lr", "-1"], ["--image-size", "30"],
                ["--image-size", "0"], ["--width", "0"], ["--folds", "0"], ["--holdout-fold", "5"],
                ["--momentum", "1.5"], ["--partitions", "0"], ["--method", "byol"], ["--stop-after", "0"],
                ["--weight-decay", "-1e-5"], ["--negatives", "0"], ["--augment", "strong"], ["--epochs", "two"],
                ["--threshold", "1"], ["--threshold", "2.5"], ["--partitions", "1", "--method", "gcl"], ["--tau", "inf"], ["--lr", "nan"],
                ["--seed", "-1"], ["--split-seed", "-2"], ["--spacing", "0"], ["--spacing", "inf"], ["--batch-size", "1"],
                ["--augment", "none", "--method", "simclr"], ["--augment", "paper", "--method", "rotation"],
                ["--bank-momentum", "1"], ["--momentum", "-0.5"], ["--pirl-lambda", "-0.5"],
                ["--bank-momentum", "-0.5"]]
BAD_FINETUNE = [["--batch-size", "0"], ["--epochs", "0"], ["--patients", "0"], ["--fold", "5"], ["--folds", "0"],
                ["--val", "0"], ["--lr", "0"], ["--min-lr", "-1"], ["--image-size", "40"], ["--steps", "0"],
                ["--min-lr", "0.01"], ["--weight-decay", "inf"], ["--seed", "-1"], ["--spacing", "nan"],
                ["--epochs", "5", "--steps", "10"], ["--cine"], ["--batch-size", "1"]]


def one_line_exit(capsys, function, argv, code=2):
    with pytest.raises(SystemExit) as stop:
        function(argv)
    err = capsys.readouterr().err
    assert stop.value.code == code and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("bad", BAD_PRETRAIN, ids=" ".join)
def test_bad_pretraining_values_are_one_line_before_anything_is_written(bad, tmp_path, capsys):
    err = one_line_exit(capsys, pretrain.get_args, [*bad, "--out", str(tmp_path / "run")])
    assert bad[0] in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method,flags", [("pcl", dict(threshold=1.0)), ("gcl", dict(partitions=1)),
                                          ("gcl", dict(partitions=1, partition_rule="authors"))])
def test_the_refused_threshold_and_partitions_leave_no_negative(method, flags):
    """Why --threshold 1 and --partitions 1 are refused: with positions p = (i + 1) / N of any volumes,
    every pair of the batch (2B, 2B) is then a positive; just inside the limits, some pair is not."""
    N = torch.tensor([1, 2, 7, 13, 64, 64])  # (6,): volume sizes
    positions = torch.cat([torch.arange(1, n + 1) / n for n in N.tolist()])  # (B,), B = 151
    slices = torch.repeat_interleave(N, N)  # (B,)
    off_diagonal = ~torch.eye(2 * len(positions), dtype=torch.bool)
    assert torch.equal(positives_of(method, **flags)(positions, slices), off_diagonal)
    inside = dict(threshold=0.9) if method == "pcl" else dict(flags, partitions=2)
    assert not torch.equal(positives_of(method, **inside)(positions, slices), off_diagonal)


@pytest.mark.parametrize("method", ["simclr", "rotation", "pirl"])
def test_a_threshold_or_partitions_that_only_pcl_or_gcl_would_refuse_are_ignored_by_the_other_methods(method, tmp_path):
    args = pretrain.get_args(["--method", method, "--threshold", "1", "--partitions", "1", "--out", str(tmp_path)])
    assert (args.method, args.threshold, args.partitions) == (method, 1.0, 1)
    assert pretrain.get_args(["--method", "gcl", "--threshold", "1", "--out", str(tmp_path)]).threshold == 1.0


@pytest.mark.parametrize("bad", BAD_FINETUNE, ids=" ".join)
def test_bad_finetuning_values_are_one_line(bad, capsys):
    assert bad[0] in one_line_exit(capsys, finetune.get_args, ["--pretrained", "none", *bad])


@pytest.mark.parametrize("function,argv", [
    (data.main, ["make-synthetic", "never-written", "--patients", "0"]), (data.main, ["make-synthetic", "never-written", "--style", "ct"]),
    (data.main, ["make-synthetic", "never-written", "--variability", "-1"]), (data.main, []),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--patients", "two"]),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--fold-list", "9"]),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--methods", "byol"]),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--name", "../elsewhere"]),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--pretrain-set", "epochs"]),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--pretrain-set", "method=simclr"]),  # every row simclr
    (reproduce.get_args, ["--preset", "synthetic-chd", "--finetune-set", "patients=3"]),
    (reproduce.get_args, ["--preset", "synthetic-chd", "--finetune-set", "split_seed=1"]),  # the holdout's too
    (reproduce.get_args, ["--preset", "synthetic-chd", "--finetune-set", "val=3"]),  # the preset's would win, silently
    (evaluate.main, ["--checkpoint", "x.pt", "--amp", "fp8"]),
    (evaluate.main, ["--checkpoint", "x.pt", "--fold", "-1"]),
    (synthetic.main, ["--patients", "0"]), (synthetic.main, ["--patients", "-1"]), (synthetic.main, ["--seed", "-3"])],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_other_scripts_bad_values_are_one_line(function, argv, capsys):
    one_line_exit(capsys, function, argv)


def test_a_file_where_a_folder_should_be_is_one_line_that_says_so(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a dataset")
    with pytest.raises(SystemExit, match=r"^error: make-synthetic \S+: cannot write in \S+notes.txt \(not a folder\)$"):
        data.main(["make-synthetic", str(a_file / "synthetic")])
    with pytest.raises(SystemExit, match=r"^error: \S+notes.txt: a file, not a data folder$"):
        data.main(["check", str(a_file)])
    for main, argv in ((pretrain.main, ["--out", str(a_file)]),
                       (finetune.main, ["--pretrained", "none", "--out", str(a_file)]),
                       (evaluate.main, ["--checkpoint", "x.pt", "--figures", str(a_file)])):
        with pytest.raises(runs.RunError, match=r"^--(out|figures) \S+notes.txt: a file, not a folder$"):
            main(argv)
    with pytest.raises(runs.RunError, match=r"^--figure \S+notes.txt/x.png: cannot write in \S+notes.txt \(not a folder\)$"):
        synthetic.main(["--figure", str(a_file / "x.png")])  # before the drawing
    for flag in ("--results", "--runs"):
        with pytest.raises(runs.RunError, match=rf"^{flag} \S+/grid: cannot write in \S+notes.txt \(not a folder\)$"):
            reproduce.get_args(["--preset", "synthetic-chd", flag, str(a_file / "grid")])
    for main, argv in ((evaluate.main, ["--checkpoint", "x.pt"]), (benchmark.get_args, [])):
        with pytest.raises(runs.RunError, match=r"^--json \S+: a folder, not a file$"):  # before reading or timing
            main([*argv, "--json", str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unwritable_outputs_are_refused_before_any_work(tiny, pretrained, tmp_path, capsys):
    unwritable = "/proc/self/run"  # /proc takes no new file, even for root
    with pytest.raises(runs.RunError, match="--out /proc/self/run: cannot write"):
        pretrain.get_args(["--out", unwritable])
    with pytest.raises(runs.RunError, match="--out /proc/self/run: cannot write"):
        tiny.finetune(pretrained, unwritable)
    run = tiny.finetune(pretrained, tmp_path / "ft")
    capsys.readouterr()
    for flag in ("--json", "--figures"):
        with pytest.raises(runs.RunError, match=f"{flag} /proc/self/out: cannot write"):
            evaluate.main(["--checkpoint", str(run / "best.pt"), flag, "/proc/self/out"])
    assert "pooled Dice" not in capsys.readouterr().out  # refused before scoring: no work lost


def test_json_outputs_never_replace_a_file_they_did_not_write(tiny, pretrained, tmp_path, capsys):
    """evaluate.py --json on the run's checkpoint.pt, a results CSV or the run's config.json replaced it with
    the scores (exit 0; the run could not resume). Each is refused by name before any work and left as it
    was; a results JSON, or a new file, is written."""
    run = tiny.finetune(pretrained, tmp_path / "ft")
    table = tmp_path / "grid.csv"
    table.write_text("method,pooled_dice\nrandom,0.5\n")
    capsys.readouterr()
    refusals = ["exists, and is not a \\.json file; it would be replaced"] * 2 + ["the config of the run beside it"]
    for target, refusal in zip((run / "checkpoint.pt", table, run / "config.json"), refusals):
        before = target.read_bytes()
        with pytest.raises(runs.RunError, match=rf"^--json {target}: {refusal}"):
            evaluate.main(["--checkpoint", str(run / "best.pt"), "--json", str(target)])
        assert target.read_bytes() == before
    assert "pooled Dice" not in capsys.readouterr().out  # refused before scoring
    with pytest.raises(runs.RunError, match=r"--json \S+grid.csv: exists, and is not a \.json file"):
        benchmark.main(["--json", str(table), "--steps", "1"])
    result = tmp_path / "scores.json"
    for _ in range(2):  # new, then replaced: its own kind of file
        evaluate.main(["--checkpoint", str(run / "best.pt"), "--json", str(result)])
        assert json.loads(result.read_text())["pooled_dice"] >= 0


def test_an_unwritable_cache_is_one_line(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("PCL_CACHE", "/proc/self/cache")
    with pytest.raises(DataError, match="cache folder /proc/self/cache: not writable"):
        data.open_dataset(tiny.data, 16)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"cache folder \S+notes.txt: a file, not a folder; set --cache or \$PCL_CACHE"):
        data.open_dataset(tiny.data, 16, cache=tmp_path / "notes.txt")


def test_command_line_errors_have_no_traceback(tmp_path):
    for command in (["pretrain.py", "--batch-size", "0"], ["finetune.py", "--pretrained", str(tmp_path / "none.pt")],
                    ["evaluate.py", "--checkpoint", str(tmp_path / "none.pt")]):
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


# --------------------------------------------------------------------------- interrupts and races
def start_pretraining(tiny, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "pretrain.py", "--data", str(tiny.data), "--batch-size", "8", "--image-size", "32",
               "--width", "4", "--out", str(out), *extra]
    # A shell without job control starts background jobs with SIGINT ignored, and the child would inherit
    # that: restore the default, as in a terminal, so that the Ctrl-C tests test Ctrl-C.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path, process, seconds=120):
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.1)


@pytest.mark.parametrize("stop,said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted (SIGTERM)")])
def test_ctrl_c_is_one_line_that_says_how_to_resume(tiny, tmp_path, stop, said):
    """Ctrl-C, or the SIGTERM of a cluster's time limit (or of torchrun stopping its other processes, one
    having failed), which used to end the process at once, without a word and with the last write unfinished."""
    run = tmp_path / "run"
    process = start_pretraining(tiny, run, "--epochs", "1000")
    wait_for(run / "checkpoint.pt", process)
    process.send_signal(stop)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: {said};") and "continue with: python pretrain.py" in err
    assert err.rstrip().endswith("--resume") and str(run) in err
    assert not list(run.glob("*.tmp")) and checkpoints.load_checkpoint(run / "checkpoint.pt")["epoch"] >= 1


@pytest.mark.parametrize("argv,world,expected", [
    (["pretrain.py", "--out", "r", "--resume"], 1, "continue with: python pretrain.py --out r --resume"),
    (["pretrain.py", "--out", "r"], 2, "continue with torchrun as before (2 processes) and: pretrain.py --out r --resume"),
    (["reproduce.py", "--preset", "acdc"], 1, "continue with the same command: python reproduce.py --preset acdc")])
def test_ctrl_c_names_the_command_that_resumes(tmp_path, monkeypatch, argv, world, expected):
    """Under torchrun the hint was a one-process command, refused for its number of processes; inside
    reproduce.py it added --resume, which reproduce.py does not take (it resumes its cells by itself)."""
    monkeypatch.setattr(sys, "argv", argv)
    for main_process, said in ((True, f"interrupted; {tmp_path / 'checkpoint.pt'} holds epoch 0, {expected}"),
                               (False, "interrupted")):  # the other ranks: one word, not a wrong epoch
        (tmp_path / "checkpoint.pt").write_bytes(b"")
        run = checkpoints.Run(tmp_path, "pretrain", {"world_size": world}, ["epoch"], main_process=main_process)
        with pytest.raises(runs.RunError) as error:
            with run.interruptible():
                raise KeyboardInterrupt
        assert str(error.value) == said


def test_an_interrupted_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path / "checkpoint.pt", {"kind": "pretrain", "config": {}})
    assert list(tmp_path.iterdir()) == []


def test_a_save_reaches_the_disk_before_its_name_replaces_the_old_file(tmp_path, monkeypatch):
    """After a power cut the file is the old one or the new one: the new bytes are fsynced before the rename,
    and a missing parent folder is made (--json into a new folder)."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    synced = lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)  # which file
    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", str(a))) or real_replace(a, b))
    target = tmp_path / "new" / "folder" / "r.json"
    checkpoints.save_json(target, {"a": 1})
    assert calls == [("fsync", str(target) + ".tmp"), ("replace", str(target) + ".tmp")]
    assert target.read_text() == '{\n "a": 1\n}'


def test_a_killed_save_or_build_is_cleaned_up_by_the_next_run(tiny, tmp_path):
    run = tmp_path / "run"
    tiny.pretrain(run, "--stop-after", "1")
    leftovers = [run / name for name in ("checkpoint.pt.tmp", "log.csv.tmp", "config.json.tmp")]
    for leftover in leftovers:
        leftover.write_bytes(b"left by a killed save")
    tiny.pretrain(run, "--resume")
    assert [leftover.name for leftover in leftovers if leftover.exists()] == []
    folder = data.open_dataset(tiny.data, 48).folder
    shutil.rmtree(folder)
    orphan = folder.with_name(folder.name + ".tmp999999999")  # left by a killed build (no such process)
    orphan.mkdir()
    assert data.open_dataset(tiny.data, 48).folder == folder and not orphan.exists()


def test_two_processes_never_write_one_run_folder(tiny, tmp_path):
    run = tmp_path / "run"
    first = start_pretraining(tiny, run, "--epochs", "1000")
    wait_for(run / "config.json", first)
    second = start_pretraining(tiny, run, "--epochs", "1000", "--resume")
    _, err = second.communicate(timeout=120)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert second.returncode == 1 and "is being written by another process" in err and err.count("\n") == 1, err


def test_fractions_take_both_ends_of_0_to_1():
    """--pirl-lambda 1 (the jigsaw term alone) and 0 (the image term alone) are valid PIRL weights."""
    assert (runs.fraction("0"), runs.fraction("1"), runs.fraction("0.25")) == (0.0, 1.0, 0.25)
    assert pretrain.get_args(["--method", "pirl", "--pirl-lambda", "1"]).pirl_lambda == 1.0
    assert pretrain.get_args(["--method", "pirl", "--pirl-lambda", "0"]).pirl_lambda == 0.0


def test_device_cuda_is_refused_only_where_torch_sees_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(runs.RunError, match="--device cuda was asked for"):
        runs.pick_device("cuda")
    assert runs.pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs.pick_device("cuda") == torch.device("cuda") == runs.pick_device("auto")


def test_seed_everything_seeds_python_numpy_and_torch():
    """A library drawing from Python's, numpy's or torch's global generator gets the same numbers per seed."""
    import random
    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        runs.seed_everything(7)
        first = draws()
        runs.seed_everything(7)
        assert draws() == first
        runs.seed_everything(8)
        assert all(a != b for a, b in zip(draws(), first))
    finally:  # the other tests' global generators as they were
        random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_is_bf16_on_a_gpu_that_has_it_and_fp16_on_an_older_one(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert runs.amp_dtype(torch.device("cuda")) == expected
    assert runs.amp_dtype(torch.device("cpu")) is None  # float32 on the CPU whatever the GPU
    assert runs.amp_dtype(torch.device("cuda"), "off") is None


@pytest.mark.parametrize("error,said", [(runs.RunError("--fold 9: no such fold"), "error: --fold 9: no such fold"),
                                        (DataError("case0.nii.gz: not a NIfTI file"), "error: case0.nii.gz: not a NIfTI file"),
                                        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device"),
                                        (KeyboardInterrupt(), "interrupted")], ids=["run", "data", "disk", "ctrl-c"])
def test_cli_ends_every_expected_error_with_its_one_line_and_exit_code_1(error, said):
    """runs.cli: a RunError, a DataError, the machine's OSError and a Ctrl-C before any training loop each end
    the script with one line on stderr (SystemExit of a string: exit code 1), never a traceback or exit code 0."""
    def main():
        raise error
    with pytest.raises(SystemExit) as done:
        runs.cli(main)
    assert done.value.code == said


# --------------------------------------------------------------------------- what --json may replace
def test_a_json_output_named_in_capitals_is_still_a_json_file(tmp_path):
    """The suffix check is case-blind: an existing RESULTS.JSON is a .json file that --json may replace,
    and notes.txt is not."""
    (tmp_path / "RESULTS.JSON").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert runs.check_writable(tmp_path / "RESULTS.JSON", "--json", folder=False, suffix=".json") is None
    with pytest.raises(runs.RunError, match="exists, and is not a .json file"):
        runs.check_writable(tmp_path / "notes.txt", "--json", folder=False, suffix=".json")


def test_a_config_json_is_refused_only_beside_a_run_s_checkpoint(tmp_path):
    """--json config.json replaces a run's config only where checkpoint.pt lies beside it; any other file
    of that name is a .json file like the rest."""
    (tmp_path / "config.json").write_text("{}")
    assert runs.check_writable(tmp_path / "config.json", "--json", folder=False, suffix=".json") is None
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(runs.RunError, match="the config of the run beside it"):
        runs.check_writable(tmp_path / "config.json", "--json", folder=False, suffix=".json")
