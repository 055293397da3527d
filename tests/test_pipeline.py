"""pretrain.py, finetune.py, evaluate.py: end to end, resume, Dice, and refusals of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import finetune
import pretrain
from data import open_dataset
from evaluate import dice_counts, dice_from_counts
from model import UNet, load_encoder
from runs import RunError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--width", "4"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Eight small synthetic MRI patients, and a PCL pretraining run of two epochs on them."""
    from synthetic import write_synthetic
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic(root / "data", patients=8, style="mri", seed=3)
    return root


def run_pretrain(tiny_data, out, *extra):
    pretrain.main(["--data", str(tiny_data / "data"), "--epochs", "2", "--batch-size", "8",
                   "--out", str(out), *TINY, *extra])
    return out / "checkpoint.pt"


def run_finetune(tiny_data, pretrained, out, *extra):
    finetune.main(["--pretrained", str(pretrained), "--patients", "2", "--folds", "4", "--val", "1",
                   "--epochs", "2", "--batch-size", "8", "--out", str(out), *extra])
    return out


@pytest.fixture(scope="session")
def pretrained(tiny_data, tmp_path_factory):
    return run_pretrain(tiny_data, tmp_path_factory.mktemp("runs") / "pcl")


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------- end to end
def test_pretrain_finetune_evaluate(tiny_data, pretrained, tmp_path):
    state = load_checkpoint(pretrained, "pretrain")
    assert state["epoch"] == 2 and state["config"]["method"] == "pcl"
    log = (pretrained.parent / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,loss,pos_acc") and len(log) == 3
    run = run_finetune(tiny_data, pretrained, tmp_path / "ft")
    best = load_checkpoint(run / "best.pt", "finetune")
    assert best["config"]["width"] == 4 and best["config"]["image_size"] == 32  # from the pretrained run
    split = best["split"]
    assert not set(split["test"]) & set(split["val"]) and not set(best["train_patients"]) & set(split["test"])
    result = evaluate.main(["--checkpoint", str(run / "best.pt"), "--json", str(tmp_path / "r.json"),
                            "--figures", str(tmp_path / "fig")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {"mean_dice", "pooled_dice", "per_class"} <= set(saved)
    assert 0 <= saved["mean_dice"] <= 1 and len(saved["per_class"]) == 3
    assert saved["patients"] == sorted(split["test"]) and result["mean_dice"] == saved["mean_dice"]
    assert len(list((tmp_path / "fig").glob("*.png"))) == len(saved["per_volume"])


def test_finetuned_encoder_starts_equal_to_the_pretrained_one(pretrained):
    args = finetune.get_args(["--pretrained", str(pretrained)])
    encoder = finetune.pretrained_encoder(str(pretrained), args)
    unet = UNet(num_classes=4, width=args.width)
    fresh_decoder = {k: v.clone() for k, v in unet.decoder.state_dict().items()}
    load_encoder(unet, encoder)
    saved = weights(pretrained)
    for k, v in unet.encoder.state_dict().items():
        assert torch.equal(v, saved["encoder." + k])
    assert_same_weights(unet.decoder.state_dict(), fresh_decoder)  # the decoder starts random


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("method", ["pcl", "gcl", "simclr"])
def test_resumed_pretraining_equals_an_uninterrupted_run(tiny_data, tmp_path, method):
    whole = run_pretrain(tiny_data, tmp_path / "whole", "--method", method)
    run_pretrain(tiny_data, tmp_path / "cut", "--method", method, "--stop-after", "1")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    cut = run_pretrain(tiny_data, tmp_path / "cut", "--method", method, "--resume")
    assert_same_weights(weights(whole), weights(cut))
    assert (tmp_path / "whole" / "log.csv").read_text().count("\n") == (tmp_path / "cut" / "log.csv").read_text().count("\n")


def test_resumed_finetuning_equals_an_uninterrupted_run(tiny_data, pretrained, tmp_path):
    run_finetune(tiny_data, pretrained, tmp_path / "whole")
    run_finetune(tiny_data, pretrained, tmp_path / "cut", "--stop-after", "1")
    run_finetune(tiny_data, pretrained, tmp_path / "cut", "--resume")
    assert_same_weights(weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "cut" / "checkpoint.pt"))
    assert_same_weights(weights(tmp_path / "whole" / "best.pt"), weights(tmp_path / "cut" / "best.pt"))


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_an_old_folder(tiny_data, pretrained):
    with pytest.raises(RunError, match="--lr"):
        run_pretrain(tiny_data, pretrained.parent, "--resume", "--lr", "0.5")
    with pytest.raises(RunError, match="--resume"):
        run_pretrain(tiny_data, pretrained.parent)


# -------------------------------------------------------------------------------------- Dice
def dice(pred, truth, classes=3):
    return dice_from_counts(*dice_counts(np.array(pred), np.array(truth), classes))


def test_dice_against_hand_counted_cases():
    truth = [[0, 1, 1, 2], [0, 1, 1, 2]]
    np.testing.assert_allclose(dice(truth, truth), [1, 1, 1])  # perfect
    np.testing.assert_allclose(dice([[2, 2, 2, 1], [2, 2, 2, 1]], truth)[1:], [0, 0])  # disjoint
    # class 1: |P| = 2, |T| = 4, |P & T| = 2 -> 4 / 6; class 2: |P| = 4, |T| = 2, both 2 -> 4 / 6
    pred = [[0, 1, 2, 2], [0, 1, 2, 2]]
    np.testing.assert_allclose(dice(pred, truth), [1, 2 / 3, 2 / 3])
    # class 1 of one pixel found among three: 2 * 1 / (1 + 3) = 0.5
    np.testing.assert_allclose(dice([1, 0, 0, 0], [1, 1, 1, 0], 2), [0.5, 0.5])  # class 0: 2 * 1 / (3 + 1)


def test_dice_convention_for_an_absent_class():
    d = dice([0, 0, 1, 1], [0, 0, 1, 1], classes=3)
    assert d[1] == 1 and np.isnan(d[2])  # absent from both: undefined, left out of means
    assert dice([0, 2, 1, 1], [0, 0, 1, 1], classes=3)[2] == 0  # predicted but absent: 0


def test_pooled_dice_sums_over_slices_before_dividing(tiny_data, pretrained, tmp_path):
    """The paper's pooled Dice differs from the mean of per-volume Dice; check it by hand."""
    run = run_finetune(tiny_data, pretrained, tmp_path / "ft")
    model, config = evaluate.load_unet(run / "best.pt")
    cache = open_dataset(config["data"], config["image_size"])
    test = load_checkpoint(run / "best.pt")["split"]["test"]
    result = evaluate.evaluate_patients(model, cache, test, torch.device("cpu"))
    both = np.zeros(4), np.zeros(4), np.zeros(4)
    for v in (v for v in cache.volumes if v.patient in test):
        images = cache.array("images")[v.start:v.start + v.slices].astype(np.float32)[:, None]
        pred = evaluate.predict(model, images, torch.device("cpu"))
        truth = cache.array("labels")[v.start:v.start + v.slices]
        for c in range(1, 4):
            both[0][c] += ((pred == c) & (truth == c)).sum()
            both[1][c] += (pred == c).sum()
            both[2][c] += (truth == c).sum()
    expected = [2 * both[0][c] / (both[1][c] + both[2][c]) for c in range(1, 4)]
    np.testing.assert_allclose(result["pooled_per_class"], expected)
    assert result["pooled_dice"] == pytest.approx(np.mean(expected))


# ------------------------------------------------------------------------------- refusals
def test_wrong_checkpoints_are_refused(tiny_data, pretrained, tmp_path):
    with pytest.raises(RunError, match="is a pretrain checkpoint"):
        evaluate.main(["--checkpoint", str(pretrained)])
    with pytest.raises(RunError, match="no such checkpoint"):
        finetune.main(["--pretrained", str(tmp_path / "missing.pt")])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(pretrained.read_bytes()[:1000])
    with pytest.raises(RunError, match="not a readable checkpoint"):
        finetune.main(["--pretrained", str(corrupt)])
    with pytest.raises(RunError, match="--width 4"):
        finetune.main(["--pretrained", str(pretrained), "--width", "8"])


def test_bad_requests_are_refused(tiny_data, pretrained, tmp_path):
    with pytest.raises(RunError, match="fold 0 has 5 training patients"):
        run_finetune(tiny_data, pretrained, tmp_path / "a", "--patients", "6")
    with pytest.raises(RunError, match="unknown method"):
        pretrain.main(["--method", "byol"])
    unlabeled = tmp_path / "unlabeled"
    (unlabeled / "imagesTr").mkdir(parents=True)
    for f in (tiny_data / "data" / "imagesTr").glob("*"):
        (unlabeled / "imagesTr" / f.name).write_bytes(f.read_bytes())
    (unlabeled / "dataset.json").write_text((tiny_data / "data" / "dataset.json").read_text())
    with pytest.raises(RunError, match="no labeled volume"):
        finetune.main(["--pretrained", "none", "--data", str(unlabeled), *TINY])


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    run_pretrain(tiny_data, tmp_path / "run", "--stop-after", "1")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real = pretrain.pretext_loss
    monkeypatch.setattr(pretrain, "pretext_loss", lambda *a: (real(*a)[0] * float("nan"), 0.0))
    with pytest.raises(RunError, match="nan at epoch 2"):
        run_pretrain(tiny_data, tmp_path / "run", "--resume")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_command_line_errors_are_one_line(tmp_path):
    for command in (["pretrain.py", "--method", "byol"],
                    ["evaluate.py", "--checkpoint", str(tmp_path / "none.pt")]):
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
