"""pretrain.py, finetune.py, evaluate.py: end to end, resume, Dice, logging, and what they refuse."""
import csv
import json
import math
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import data
import evaluate
import finetune
import pretrain
import runs
from checkpoints import load_checkpoint
from data import open_dataset
from dice import dice_counts, dice_from_counts, evaluate_patients, predict
from model import UNet, load_encoder
from runs import RunError


# --------------------------------------------------------------------------------- end to end
def test_pretrain_finetune_evaluate(tiny, pretrained, tmp_path):
    state = load_checkpoint(pretrained, "pretrain")
    assert state["epoch"] == 2 and state["config"]["method"] == "pcl"
    log = (pretrained.parent / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,loss,pos_acc") and len(log) == 3
    run = tiny.finetune(pretrained, tmp_path / "ft")
    best = load_checkpoint(run / "best.pt", "finetune")
    assert best["config"]["width"] == 4 and best["config"]["image_size"] == 32  # from the pretrained run
    split = best["split"]
    assert not set(split["test"]) & set(split["val"]) and not set(best["train_patients"]) & set(split["test"])
    result = evaluate.main(["--checkpoint", str(run / "best.pt"), "--json", str(tmp_path / "r.json"),
                            "--figures", str(tmp_path / "fig")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= saved["mean_dice"] <= 1 and len(saved["per_class"]) == 3
    assert saved["patients"] == sorted(split["test"]) and result["mean_dice"] == saved["mean_dice"]
    assert len(list((tmp_path / "fig").glob("*.png"))) == len(saved["per_volume"])


def test_the_best_epoch_is_chosen_on_validation_patients_only(tiny, pretrained, tmp_path, monkeypatch):
    """The protocol of the benchmark: every epoch is scored on the validation patients, never on a test
    patient, and best.pt is the epoch with the highest validation Dice (scripted here: epoch 2 of 4)."""
    scores, asked = iter([0.1, 0.5, 0.3, 0.2]), []

    def scripted(net, cache, patients, device, amp):
        asked.append(list(patients))
        return {"mean_dice": next(scores)}
    monkeypatch.setattr(finetune, "evaluate_patients", scripted)
    run = tiny.finetune(pretrained, tmp_path / "ft", "--epochs", "4")
    best = load_checkpoint(run / "best.pt", "finetune")
    assert best["epoch"] == 2 and best["val_dice"] == 0.5
    assert len(asked) == 4 and all(patients == best["split"]["val"] for patients in asked)
    assert not set(best["split"]["val"]) & set(best["split"]["test"])


def test_finetuned_encoder_starts_equal_to_the_pretrained_one(tiny, pretrained):
    args = finetune.get_args(["--pretrained", str(pretrained)])
    encoder, pretraining = finetune.pretrained_encoder(args, torch.device("cpu"))
    assert pretraining == load_checkpoint(pretrained)["config"]
    unet = UNet(num_classes=4, width=args.width)
    fresh_decoder = {k: v.clone() for k, v in unet.decoder.state_dict().items()}
    load_encoder(unet, encoder)
    saved = tiny.weights(pretrained)
    for k, v in unet.encoder.state_dict().items():
        assert torch.equal(v, saved["encoder." + k])
    tiny.assert_same_weights(unet.decoder.state_dict(), fresh_decoder)  # the decoder starts random


def test_finetuning_starts_from_the_pretrained_encoder(tiny, pretrained, tmp_path):
    """finetune.py itself, one epoch at a learning rate of 1e-12: its encoder's convolutions are still the
    pretrained ones (to 1e-9), and Random's are not."""
    saved = tiny.weights(pretrained)
    for checkpoint, loaded in ((pretrained, True), ("none", False)):
        run = tiny.finetune(checkpoint, tmp_path / str(loaded), "--epochs", "1", "--lr", "1e-12", "--width", "4",
                            "--image-size", "32", "--data", str(tiny.data))
        weights = tiny.weights(run / "checkpoint.pt")
        convolutions = [k for k, v in weights.items() if k.startswith("encoder.") and v.ndim == 4]
        assert len(convolutions) >= 10
        assert all(torch.allclose(weights[k], saved[k], atol=1e-9) for k in convolutions) == loaded


def test_finetuning_reads_the_pretraining_dataset_as_the_pretraining_did(tiny, tmp_path, capsys):
    """An encoder pretrained on the tiny data read with --intensity zscore: finetuning on that data, with no
    --data or with its folder spelled otherwise, reads it alike and says the encoder saw the test patients;
    another --intensity there is refused; a copy of the data elsewhere (another dataset) gets the defaults."""
    pre = tiny.pretrain(tmp_path / "pre", "--intensity", "zscore", "--epochs", "1")
    other = shutil.copytree(tiny.data, tmp_path / "other")
    for k, (extra, intensity, seen) in enumerate((([], "zscore", True), (["--data", f"{tiny.data}/"], "zscore", True),
                                                   (["--data", str(other)], "clip-zscore", False))):
        capsys.readouterr()
        run = tiny.finetune(pre, tmp_path / f"ft{k}", "--epochs", "1", *extra)
        assert load_checkpoint(run / "best.pt")["config"]["intensity"] == intensity
        assert ("note: the encoder was pretrained on 2 of this fold's 2 test patients" in capsys.readouterr().out) == seen
        if seen:
            with pytest.raises(RunError, match=r"--intensity clip-zscore: the encoder was pretrained on .* read with "
                                               r"--intensity zscore; finetuning reads it alike"):
                tiny.finetune(pre, tmp_path / f"refused{k}", "--intensity", "clip-zscore", *extra)


def test_random_gets_the_sizes_pretraining_would_have_on_its_device():
    for device, sizes in (("cpu", (64, 16)), ("cuda", (256, 32))):  # the README's defaults
        args = finetune.get_args(["--pretrained", "none"])
        assert finetune.pretrained_encoder(args, torch.device(device)) == (None, None)
        assert (args.image_size, args.width) == sizes == runs.default_sizes(torch.device(device))  # as pretrain.py
    args = finetune.get_args(["--pretrained", "none", "--image-size", "96", "--width", "8"])
    finetune.pretrained_encoder(args, torch.device("cuda"))
    assert (args.image_size, args.width) == (96, 8)  # the flags win


def test_random_is_the_network_pretrain_py_builds_by_default(tmp_path):
    random = finetune.get_args(["--pretrained", "none"])
    finetune.pretrained_encoder(random, torch.device("cpu"))
    default = pretrain.get_args(["--out", str(tmp_path / "p")])
    assert (random.bottleneck, random.init) == (default.bottleneck, default.init) == ("batchnorm", "default")


@pytest.fixture(scope="module")
def fold1(tiny, pretrained, tmp_path_factory):
    """A finetuning of fold 1 of the tiny data (4 folds, M = 2, 1 validation patient): its best.pt."""
    return tiny.finetune(pretrained, tmp_path_factory.mktemp("fold1") / "ft", "--fold", "1") / "best.pt"


def test_the_m_training_patients_are_the_first_m_of_the_fold_s_training_part(tiny, fold1):
    labeled = open_dataset(tiny.data, 32).patients(labeled=True)
    assert load_checkpoint(fold1)["train_patients"] == data.split_patients(labeled, 4, 1, 0, 1)["train"][:2]


def test_the_labeled_patients_of_a_folder_are_those_with_a_label_file(tiny, tmp_path):
    """reproduce.py checks each cell's M against them before anything runs: an image without its label
    file (kept for pretraining) is not a labeled patient."""
    copy = shutil.copytree(tiny.data, tmp_path / "data")
    unlabeled = sorted((copy / "labelsTr").glob("*.nii.gz"))[3]
    unlabeled.unlink()
    patients = sorted(p.name[:-len("_0000.nii.gz")] for p in (copy / "imagesTr").glob("*.nii.gz"))
    assert len(patients) == 8 and unlabeled.name[:-len(".nii.gz")] in patients
    expected = [p for p in patients if p != unlabeled.name[:-len(".nii.gz")]]
    assert finetune.labeled_patients(str(copy), "auto") == expected
    assert finetune.labeled_patients("synthetic", "auto") == list(range(data.SYNTHETIC["synthetic"][1]))


def test_no_labeled_patient_is_said_before_any_split():
    """reproduce.py checks each cell's M with training_patients: "fold 0 of 5 folds is impossible with 0 patients"
    hid that the folder had no label at all."""
    with pytest.raises(RunError, match=r"^no labeled volume, nothing to finetune on$"):
        finetune.training_patients([], finetune.get_args(["--pretrained", "none"]))


def test_the_fold_asked_is_the_fold_scored(tiny, fold1):
    """--fold 0 of a model finetuned on fold 1 is fold 0: scored, or refused for fold 0's own patients."""
    state = load_checkpoint(fold1)
    used = set(state["train_patients"]) | set(state["split"]["val"])
    test = set(data.split_patients(open_dataset(tiny.data, 32).patients(labeled=True), 4, 0, 0, 1)["test"])
    if test & used:
        with pytest.raises(RunError, match=rf"^--fold 0: {len(test & used)} of its 2 test patients"):
            evaluate.main(["--checkpoint", str(fold1), "--fold", "0"])
    else:
        assert evaluate.main(["--checkpoint", str(fold1), "--fold", "0"])["fold"] == 0


def test_evaluating_on_a_folder_without_labels_says_so(tiny, fold1, tmp_path):
    """A copy of the data without its labelsTr: nothing to score, said as such (it was "fold 1 of 4 folds is
    impossible with 0 patients")."""
    copy = shutil.copytree(tiny.data, tmp_path / "data")
    shutil.rmtree(copy / "labelsTr")
    with pytest.raises(RunError, match=rf"^{copy}: no labeled volume, nothing to score$"):
        evaluate.main(["--checkpoint", str(fold1), "--data", str(copy)])


def test_evaluation_scores_in_the_checkpoint_s_amp_unless_told(fold1, tmp_path, monkeypatch):
    state = load_checkpoint(fold1)
    state["config"] = dict(state["config"], amp="bf16")
    checkpoints.save_checkpoint(tmp_path / "bf16.pt", {k: v for k, v in state.items() if k != "digest"})
    asked, real = [], evaluate.evaluate_patients
    monkeypatch.setattr(evaluate, "evaluate_patients", lambda *a: asked.append(a[4]) or real(*a))
    evaluate.main(["--checkpoint", str(tmp_path / "bf16.pt")])
    evaluate.main(["--checkpoint", str(tmp_path / "bf16.pt"), "--amp", "off"])  # the flag wins
    assert asked == ["bf16", "off"]


def test_the_held_out_fold_is_the_one_of_the_pretraining_s_split_seed():
    labeled = [f"p{i}" for i in range(8)]
    pretraining = dict(data="synthetic", holdout_fold=0, folds=4, split_seed=1)
    args = finetune.get_args(["--pretrained", "none", "--data", "synthetic"])
    held = data.split_patients(labeled, 4, 0, 1)["test"]  # what the pretraining left out
    other = data.split_patients(labeled, 4, 0, 0)["test"]  # fold 0 of another split seed
    assert set(held) != set(other)
    assert finetune.pretrained_on_test(pretraining, args, labeled, held) == []
    assert finetune.pretrained_on_test(pretraining, args, labeled, other) == [p for p in other if p not in held]


def test_finetuning_says_which_test_patients_the_encoder_was_pretrained_on(tiny, pretrained, tmp_path, capsys):
    """8 patients in 4 folds: 2 test patients each. Pretrained on every patient (the authors' way), the
    encoder saw both of any fold, unlabeled; pretrained without fold 0, none of fold 0's and both of fold 1's."""
    held = tiny.pretrain(tmp_path / "held", "--holdout-fold", "0", "--folds", "4")
    for k, (checkpoint, fold, seen) in enumerate(((pretrained, 0, 2), (held, 0, 0), (held, 1, 2), ("none", 0, 0))):
        capsys.readouterr()
        tiny.finetune(checkpoint, tmp_path / f"finetune{k}", "--fold", str(fold))
        out = capsys.readouterr().out
        note = (f"note: the encoder was pretrained on {seen} of this fold's 2 test patients (unlabeled); "
                f"pretrain.py --holdout-fold {fold} --folds 4 --split-seed 0 keeps them out")
        assert (note in out) == (seen > 0) and ("note: the encoder" in out) == (seen > 0), out


def test_another_fold_is_scored_only_if_none_of_its_patients_trained_or_validated_the_model(tiny, pretrained, tmp_path,
                                                                                             capsys):
    """best.pt records the patients it was trained and validated on (fold 0, M = 2, 1 validation patient):
    evaluating fold k refuses exactly when fold k's test patients include one of them."""
    best = tiny.finetune(pretrained, tmp_path / "ft") / "best.pt"
    state = load_checkpoint(best)
    used = set(state["train_patients"]) | set(state["split"]["val"])
    labeled = open_dataset(tiny.data, 32).patients(labeled=True)
    refused = 0
    for fold in range(4):
        test = set(data.split_patients(labeled, 4, fold, 0, 1)["test"])
        if test & used:
            for spelled in ([], ["--data", f"{tiny.data}/"]):  # the same folder, however spelled
                with pytest.raises(RunError, match=rf"--fold {fold}: {len(test & used)} of its 2 test patients trained"):
                    evaluate.main(["--checkpoint", str(best), "--fold", str(fold), *spelled])
            refused += 1
            if refused == 1:  # a copy of the dataset is another folder: scored, with a note naming those patients
                shutil.copytree(tiny.data, tmp_path / "copy")
                capsys.readouterr()
                evaluate.main(["--checkpoint", str(best), "--fold", str(fold), "--data", str(tmp_path / "copy")])
                assert (f"note: {len(test & used)} of the 2 test patients ({', '.join(sorted(test & used))}) have the "
                        f"names of patients that trained or validated this model in {tiny.data}") in capsys.readouterr().out
        else:
            assert evaluate.main(["--checkpoint", str(best), "--fold", str(fold)])["fold"] == fold
    assert refused >= 1 and not used & set(state["split"]["test"])  # 3 used patients among the 6 outside fold 0


def test_a_relative_data_folder_is_saved_whole(tiny, pretrained, tmp_path, monkeypatch):
    """--data relative to the working directory is saved absolute: run from another directory, evaluate.py
    took the saved "data" for another folder, and scored a fold of the model's own training patients."""
    monkeypatch.chdir(tiny.data.parent)
    assert pretrain.get_args(["--data", tiny.data.name, "--out", str(tmp_path / "p")]).data == str(tiny.data)
    best = tiny.finetune(pretrained, tmp_path / "ft", "--data", tiny.data.name) / "best.pt"
    state = load_checkpoint(best)
    assert state["config"]["data"] == str(tiny.data) and state["config"]["pretrained"] == str(pretrained)
    used = set(state["train_patients"]) | set(state["split"]["val"])
    labeled = open_dataset(tiny.data, 32).patients(labeled=True)
    fold = next(k for k in range(4) if set(data.split_patients(labeled, 4, k, 0, 1)["test"]) & used)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match=rf"--fold {fold}: \d of its 2 test patients trained or validated this model"):
        evaluate.main(["--checkpoint", str(best), "--data", str(tiny.data), "--fold", str(fold)])


def test_the_authors_variants_train_and_finetune_alike(tiny, tmp_path):
    run = tiny.pretrain(tmp_path / "pre", "--separate-views", "--bottleneck", "plain", "--init", "he",
                        "--proj-dim", "512", "--augment", "paper", "--method", "gcl", "--partition-rule", "authors")
    assert tiny.weights(run)["head.mlp.2.weight"].shape == (512, 64)
    ft = tiny.finetune(run, tmp_path / "ft", "--augment", "none", "--min-lr", "1e-4", "--lr", "1e-3")
    config = load_checkpoint(ft / "best.pt")["config"]
    assert (config["bottleneck"], config["init"], config["min_lr"]) == ("plain", "he", 1e-4)
    assert evaluate.load_unet(ft / "best.pt")[0].encoder.bottleneck.body[1].__class__ is torch.nn.ReLU


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("extra", [["--method", "pcl"], ["--method", "gcl", "--partition-rule", "authors"],
                                   ["--method", "simclr", "--separate-views"]])
def test_resumed_pretraining_equals_an_uninterrupted_run(tiny, tmp_path, extra):
    whole = tiny.pretrain(tmp_path / "whole", *extra)
    tiny.pretrain(tmp_path / "cut", *extra, "--stop-after", "1")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    cut = tiny.pretrain(tmp_path / "cut", *extra, "--resume")
    tiny.assert_same_weights(tiny.weights(whole), tiny.weights(cut))
    assert (tmp_path / "whole" / "log.csv").read_text() .count("\n") == (tmp_path / "cut" / "log.csv").read_text().count("\n")


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "lr_scheduler.step() before optimizer.step()" included
def test_a_resumed_fp16_run_continues_its_loss_scale(tiny, tmp_path):
    """Under fp16 the checkpoint carries the GradScaler: its scale, lowered by the first steps'
    overflows, and its count of good steps since then go on from where the cut run stopped (more than
    the 12 steps of one epoch), as in an uninterrupted run. The skipped steps raise no warning."""
    whole = load_checkpoint(tiny.pretrain(tmp_path / "whole", "--amp", "fp16"))["scaler"]
    tiny.pretrain(tmp_path / "cut", "--amp", "fp16", "--stop-after", "1")
    cut = load_checkpoint(tiny.pretrain(tmp_path / "cut", "--amp", "fp16", "--resume"))["scaler"]
    assert whole["scale"] < 65536 and whole["_growth_tracker"] > 12 and cut == whole
    assert load_checkpoint(tiny.pretrain(tmp_path / "float32"))["scaler"] == {}  # nothing to scale without fp16


def test_resumed_finetuning_equals_an_uninterrupted_run(tiny, pretrained, tmp_path):
    tiny.finetune(pretrained, tmp_path / "whole")
    tiny.finetune(pretrained, tmp_path / "cut", "--stop-after", "1")
    tiny.finetune(pretrained, tmp_path / "cut", "--resume")
    for name in ("checkpoint.pt", "best.pt"):
        tiny.assert_same_weights(tiny.weights(tmp_path / "whole" / name), tiny.weights(tmp_path / "cut" / name))


def test_a_finetuning_resumes_after_its_pretraining_checkpoint_is_gone(tiny, pretrained, tmp_path, capsys):
    """The encoder's sizes and the data's reading come from the run's own checkpoint: the resumed run equals an
    uninterrupted one (it needed the pretraining checkpoint, deleted or moved meanwhile, only for them)."""
    gone = Path(shutil.copy(pretrained, tmp_path / "gone.pt"))
    tiny.finetune(pretrained, tmp_path / "whole")
    tiny.finetune(gone, tmp_path / "cut", "--stop-after", "1")
    gone.unlink()
    with pytest.raises(RunError, match=rf"^{gone}: no such checkpoint; to resume a finetuning without it, give its --out$"):
        finetune.main(["--pretrained", str(gone), "--resume", "--patients", "2", "--folds", "4", "--val", "1"])
    capsys.readouterr()
    tiny.finetune(gone, tmp_path / "cut", "--resume")
    assert f"note: {gone} is gone; resuming with the sizes and data reading that {tmp_path / 'cut'} saved" in \
        capsys.readouterr().out
    for name in ("checkpoint.pt", "best.pt"):
        tiny.assert_same_weights(tiny.weights(tmp_path / "whole" / name), tiny.weights(tmp_path / "cut" / name))


def test_a_resume_without_its_pretraining_checkpoint_keeps_the_settings_given(tiny, pretrained, tmp_path):
    """Only the settings not given come from the run's checkpoint: --intensity zscore given to a run read with
    clip-zscore is refused as on any resume, not silently replaced by the saved one."""
    gone = Path(shutil.copy(pretrained, tmp_path / "gone.pt"))
    tiny.finetune(gone, tmp_path / "cut", "--stop-after", "1")
    gone.unlink()
    with pytest.raises(RunError, match=r"^cannot resume with other settings \(--intensity 'clip-zscore' -> 'zscore'\)"):
        tiny.finetune(gone, tmp_path / "cut", "--resume", "--intensity", "zscore")


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_an_old_folder(tiny, pretrained):
    with pytest.raises(RunError, match="--lr"):
        tiny.pretrain(pretrained.parent, "--resume", "--lr", "0.5")
    with pytest.raises(RunError, match="--resume"):
        tiny.pretrain(pretrained.parent)


def test_resume_may_move_the_cache(tiny, tmp_path):
    """--cache names where the preprocessed data lies, not how it is read: a resume may point elsewhere."""
    tiny.pretrain(tmp_path / "p", "--stop-after", "1")
    assert load_checkpoint(tiny.pretrain(tmp_path / "p", "--resume", "--cache", str(tmp_path / "c")))["epoch"] == 2


def test_the_epoch_log_is_the_mean_of_the_steps(tiny, tmp_path, monkeypatch):
    """The loop keeps the losses on the device and reads them once per epoch: the log must hold the
    mean of what each step returned, as reading every step did."""
    steps, real = [], pretrain.contrastive_step

    def recorded(*args, **kwargs):
        loss, acc = real(*args, **kwargs)
        steps.append((loss.item(), acc.item()))
        return loss, acc
    monkeypatch.setattr(pretrain, "contrastive_step", recorded)
    tiny.pretrain(tmp_path / "run")
    rows = [line.split(",") for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    per_epoch = len(steps) // 2
    for epoch, row in enumerate(rows):
        mine = steps[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert float(row[1]) == pytest.approx(sum(s[0] for s in mine) / per_epoch, rel=1e-6)
        assert float(row[2]) == pytest.approx(sum(s[1] for s in mine) / per_epoch, rel=1e-6)


def logged(run, column):
    return [float(row[column]) for row in csv.DictReader((run / "log.csv").open())]


def test_the_learning_rate_follows_the_cosine_in_both_loops(tiny, pretrained, tmp_path):
    """lr_t = lr * (1 + cos(pi * t / T)) / 2 after t of T steps, every epoch the same number of steps:
    after epoch e of E the log holds lr * (1 + cos(pi * e / E)) / 2."""
    cosine = [0.5 * (1 + math.cos(math.pi * e / 2)) for e in (1, 2)]  # [0.5, 0.0]
    assert logged(pretrained.parent, "lr") == pytest.approx([0.1 * c for c in cosine], abs=1e-12)  # pretrain's lr 0.1
    run = tiny.finetune(pretrained, tmp_path / "ft")
    assert logged(run, "lr") == pytest.approx([1e-3 * c for c in cosine], abs=1e-12)  # finetune's lr 1e-3


def test_the_cosine_stops_at_min_lr():
    """lr_t = max(min_lr, lr * (1 + cos(pi t / T)) / 2): lr 0.5 and floor 0.1 over T = 10 steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule, lrs = runs.cosine_schedule(optimizer, 10, min_lr=0.1), []
    for _ in range(10):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([max(0.1, 0.25 * (1 + math.cos(math.pi * t / 10))) for t in range(1, 11)])
    assert lrs[-1] == pytest.approx(0.1)


def recording_loader(patch, module):
    """Make module's data.make_loader record the slice indices of every batch, in order."""
    seen, real = [], data.make_loader

    def make_loader(*args, **kwargs):
        loader, sampler = real(*args, **kwargs)

        class Recorded:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for batch in loader:
                    seen.append(batch["index"].tolist())
                    yield batch
        return Recorded(), sampler
    patch.setattr(module.data, "make_loader", make_loader)
    return seen


def test_every_epoch_reshuffles_the_slices(tiny, pretrained, tmp_path, monkeypatch):
    """Both loops draw a new order each epoch (the sampler's set_epoch): the same batches every epoch
    would be a silently weaker run."""
    for module, train in ((pretrain, lambda: tiny.pretrain(tmp_path / "pcl")),
                          (finetune, lambda: tiny.finetune(pretrained, tmp_path / "ft"))):
        with monkeypatch.context() as patch:  # undone after each loop (the test's cache folder stays)
            seen = recording_loader(patch, module)
            train()
        steps = len(seen) // 2
        first, second = sum(seen[:steps], []), sum(seen[steps:], [])  # the slice indices of epochs 1 and 2
        assert len(set(first)) == len(first) and len(set(second)) == len(second)  # each slice at most once
        assert first != second, f"{module.__name__}: the same batches in both epochs"


def test_a_held_out_fold_s_test_patients_are_left_out_of_pretraining(tiny, tmp_path, monkeypatch, capsys):
    """--holdout-fold K (of --folds, --split-seed) pretrains on every patient but fold K's test patients, found
    here from split_patients' rule written out: a seeded permutation of the sorted patients, cut in folds."""
    given, real = [], pretrain.data.SliceDataset
    monkeypatch.setattr(pretrain.data, "SliceDataset", lambda cache, patients, **kw: given.append(patients) or
                        real(cache, patients, **kw))
    everyone = sorted(f"syn_{i:03d}" for i in range(8))
    test = {seed: {everyone[i] for i in np.array_split(np.random.default_rng(seed).permutation(8), 4)[0]}
            for seed in (0, 1)}
    assert test[0] != test[1] and len(test[1]) == 2  # so that a split seed ignored would show
    tiny.pretrain(tmp_path / "held", "--holdout-fold", "0", "--folds", "4", "--split-seed", "1", "--epochs", "1")
    assert sorted(given[0]) == sorted(set(everyone) - test[1])
    assert f"slices of 6 patients ({tiny.data})" in capsys.readouterr().out  # the start line counts them too


def test_pretraining_batches_are_whole_and_drawn_by_the_seed(tiny, tmp_path, monkeypatch, capsys):
    """Every pretraining batch holds B slices (a short last batch would change the number of negatives and
    the BatchNorm statistics), so an epoch is floor(n / B) steps, n counted from the files; and the order is
    the DistributedSampler's documented one: torch.randperm(n) from a generator seeded with seed + epoch."""
    n = sum(tiny.volume_sizes())
    assert n % 7, "a batch size that does not divide the slices, so that a short batch would show"
    seen = recording_loader(monkeypatch, pretrain)
    tiny.pretrain(tmp_path / "run", "--batch-size", "7", "--epochs", "1", "--seed", "1")
    assert [len(batch) for batch in seen] == [7] * (n // 7)
    assert f"{n // 7} steps per epoch" in capsys.readouterr().out
    assert seen[0] == torch.randperm(n, generator=torch.Generator().manual_seed(1))[:7].tolist()


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_stop_after_counts_from_where_a_resumed_run_starts(tiny, pretrained, tmp_path, script):
    """--stop-after N ends an invocation N epochs after it started: 3 epochs in three invocations."""
    train = (lambda *extra: tiny.pretrain(tmp_path / "run", "--epochs", "3", *extra)) if script == "pretrain" else \
        (lambda *extra: tiny.finetune(pretrained, tmp_path / "run", "--epochs", "3", *extra))
    for epoch, extra in enumerate([[], ["--resume"], ["--resume"]], start=1):
        train("--stop-after", "1", *extra)
        assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == epoch
        assert len(logged(tmp_path / "run", "epoch")) == epoch


def test_the_step_gets_each_slice_s_volume_size_and_the_method_s_settings(tiny, tmp_path, monkeypatch):
    """What pretrain.py hands contrastive_step: positions p = (i + 1) / N with N the slice's own volume
    size (so p * N is a whole number from 1 to N), the temperature and --separate-views as given, and
    positives that follow GCL's authors' rule: N = 10, 4 partitions of round_half_up(10 / 4) = 3 slices,
    so slices 1 and 3 (p = 0.1 and 0.3) share partition 0, where the balanced rule puts p = 0.3 in the second."""
    sizes = set(tiny.volume_sizes())
    calls, real = [], pretrain.contrastive_step
    monkeypatch.setattr(pretrain, "contrastive_step", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    tiny.pretrain(tmp_path / "run", "--method", "gcl", "--partition-rule", "authors", "--separate-views",
                  "--tau", "0.3", "--epochs", "1")
    (model, x, positions, slices, generator, positives, augmentation, tau, separate_views), _ = calls[0]
    assert set(slices.tolist()) <= sizes and len(set(slices.tolist())) > 1
    i = positions.double() * slices  # (B,): i + 1
    assert torch.allclose(i, i.round()) and bool((i >= 1).all() and (i <= slices).all())
    assert (tau, separate_views) == (0.3, True)
    mask = positives(torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([10, 10]))  # (4, 4)
    assert bool(mask[0, 1]) and bool(mask[0, 3])  # the two slices and their other views: one partition


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_the_optimizer_gets_the_weight_decay_and_momentum_asked(tiny, pretrained, tmp_path, script):
    if script == "pretrain":
        state = load_checkpoint(tiny.pretrain(tmp_path / "run", "--epochs", "1", "--weight-decay", "0.25",
                                              "--momentum", "0.5", "--lr", "0.03"))
        expected = dict(weight_decay=0.25, momentum=0.5, initial_lr=0.03)
    else:
        state = load_checkpoint(tiny.finetune(pretrained, tmp_path / "run", "--epochs", "1", "--weight-decay", "0.25",
                                              "--lr", "0.003") / "checkpoint.pt")
        expected = dict(weight_decay=0.25, initial_lr=0.003)
    group = state["optimizer"]["param_groups"][0]
    assert {k: group[k] for k in expected} == expected


def test_the_finetuning_loss_is_taken_on_the_augmented_labels(tiny, pretrained, tmp_path, monkeypatch):
    """Images and labels are warped together (augment.py); the loss must then see those warped labels."""
    returned, targets, real_augment, real_loss = [], [], finetune.augment, finetune.F.cross_entropy

    def augment(x, config, generator, labels=None):
        x, y = real_augment(x, config, generator, labels=labels)
        returned.append(y.clone())
        return x, y

    def cross_entropy(logits, y, *args, **kwargs):
        targets.append(y.clone())
        return real_loss(logits, y, *args, **kwargs)
    monkeypatch.setattr(finetune, "augment", augment)
    monkeypatch.setattr(finetune.F, "cross_entropy", cross_entropy)
    tiny.finetune(pretrained, tmp_path / "ft", "--augment", "paper")  # turns by any angle: labels move a lot
    assert len(targets) == len(returned) > 0 and all(torch.equal(a, b) for a, b in zip(returned, targets))


def test_an_epoch_leaves_out_its_partial_batch_unless_kept_and_never_keeps_one_slice_a_process():
    """Hand-counted: 38 slices in batches of 10 are 3 steps, or 4 with --keep-last (the authors'); 31 are 3
    either way (a last batch of 1 slice); under 2 processes each takes ceil(N / 2) slices in batches of 5."""
    assert [finetune.drops_last(38, 10, 1, keep) for keep in (False, True)] == [True, False]
    assert [finetune.drops_last(31, 10, 1, keep) for keep in (False, True)] == [True, True]
    assert [finetune.drops_last(8, 10, 1, keep) for keep in (False, True)] == [False, False]  # no whole batch
    assert finetune.drops_last(37, 10, 2, True) is False  # 19 slices a process: 5, 5, 5, 4
    assert finetune.drops_last(19, 10, 2, True) is False  # 10 a process: 5, 5 (left out: nothing)
    assert finetune.drops_last(31, 10, 2, True) is True  # 16 a process: 5, 5, 5, 1


@pytest.mark.parametrize("keep", [False, True])
def test_keep_last_trains_each_epoch_s_partial_batch(tiny, pretrained, tmp_path, monkeypatch, keep):
    sizes, real_augment = [], finetune.augment
    monkeypatch.setattr(finetune, "augment", lambda x, *args, **kw: sizes.append(len(x)) or real_augment(x, *args, **kw))
    run = tiny.finetune(pretrained, tmp_path / "ft", "--epochs", "1", *(["--keep-last"] if keep else []))
    cache = open_dataset(tiny.data, image_size=32)
    slices = len(data.SliceDataset(cache, load_checkpoint(run / "best.pt")["train_patients"], labeled=True))
    assert slices % 8 > 1, "the tiny patients must leave a partial batch of 2 or more slices for this test"
    assert sizes == [8] * (slices // 8) + ([slices % 8] if keep else [])


# -------------------------------------------------------------------------------------- Dice
def dice(pred, truth, classes=3):
    return dice_from_counts(*dice_counts(np.array(pred), np.array(truth), classes))


def test_the_logged_pretraining_loss_is_the_mean_over_the_processes(tiny, tmp_path, monkeypatch):
    """Under torchrun, Rotation's processes have losses of their own, and rank 0 logged its own alone: the
    epoch's sums now go through distributed.average (here made to double them, to see that they do)."""
    import distributed
    sums, average = [], distributed.average
    monkeypatch.setattr(distributed, "average", lambda x: sums.append(x.clone()) or 2 * average(x))
    tiny.pretrain(tmp_path / "rot", "--method", "rotation", "--augment", "upright")
    steps = load_checkpoint(tmp_path / "rot" / "checkpoint.pt")["scheduler"]["last_epoch"] // 2  # per epoch
    logged = [float(r.split(",")[1]) for r in (tmp_path / "rot" / "log.csv").read_text().splitlines()[1:]]
    assert logged == pytest.approx([2 * s[0].item() / steps for s in sums])


def test_dice_against_hand_counted_cases():
    truth = [[0, 1, 1, 2], [0, 1, 1, 2]]
    np.testing.assert_allclose(dice(truth, truth), [1, 1, 1])  # perfect
    np.testing.assert_allclose(dice([[2, 2, 2, 1], [2, 2, 2, 1]], truth)[1:], [0, 0])  # disjoint
    # class 1: |P| = 2, |T| = 4, |P & T| = 2 -> 4 / 6; class 2: |P| = 4, |T| = 2, both 2 -> 4 / 6
    np.testing.assert_allclose(dice([[0, 1, 2, 2], [0, 1, 2, 2]], truth), [1, 2 / 3, 2 / 3])
    np.testing.assert_allclose(dice([1, 0, 0, 0], [1, 1, 1, 0], 2), [0.5, 0.5])  # class 1: 2 * 1 / (1 + 3)


def test_dice_convention_for_an_absent_class():
    d = dice([0, 0, 1, 1], [0, 0, 1, 1], classes=3)
    assert d[1] == 1 and np.isnan(d[2])  # absent from both: undefined, left out of means
    assert dice([0, 2, 1, 1], [0, 0, 1, 1], classes=3)[2] == 0  # predicted but absent: 0


def test_soft_dice_loss_against_a_loop_over_classes_and_pixels():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 4, 5), generator=g)
    probs, terms = logits.softmax(dim=1), []
    for c in (1, 2):  # the foreground classes
        both = sum(float(probs[b, c, i, j]) * (int(labels[b, i, j]) == c) for b in range(2) for i in range(4) for j in range(5))
        terms.append(2 * both / (float(probs[:, c].sum()) + int((labels == c).sum()) + 1e-6))
    assert finetune.soft_dice_loss(logits, labels).item() == pytest.approx(1 - sum(terms) / 2, rel=1e-5)


def test_pooled_and_per_volume_dice_by_hand(tiny, pretrained, tmp_path):
    """The paper's pooled Dice sums the counts of every test slice before dividing; the per-volume mean takes
    each volume's mean over its classes (NaN where a class is absent from both), then the mean over volumes."""
    run = tiny.finetune(pretrained, tmp_path / "ft")
    model, config = evaluate.load_unet(run / "best.pt")
    cache = open_dataset(config["data"], config["image_size"])
    test = load_checkpoint(run / "best.pt")["split"]["test"]
    result = evaluate_patients(model, cache, test, torch.device("cpu"))
    both, per_volume = np.zeros((3, 4)), []  # both: the counts |P & T|, |P|, |T| of each class, over all volumes
    for v in (v for v in cache.volumes if v.patient in test):
        images = cache.array("images")[v.start:v.start + v.slices].astype(np.float32)[:, None]
        pred = predict(model, images, torch.device("cpu"))
        truth = cache.array("labels")[v.start:v.start + v.slices]
        counts = np.array([[((pred == c) & (truth == c)).sum(), (pred == c).sum(), (truth == c).sum()]
                           for c in range(4)]).T  # (3, 4)
        both += counts
        per_volume.append([2 * counts[0, c] / (counts[1, c] + counts[2, c]) if counts[1, c] + counts[2, c] else math.nan
                           for c in range(1, 4)])
    expected = [2 * both[0][c] / (both[1][c] + both[2][c]) for c in range(1, 4)]
    np.testing.assert_allclose(result["pooled_per_class"], expected)
    assert result["pooled_dice"] == pytest.approx(np.mean(expected))
    scores = np.array(per_volume)  # (volumes, 3)
    volume_means = [np.mean([d for d in row if not math.isnan(d)]) for row in per_volume]
    assert result["mean_dice"] == pytest.approx(np.mean(volume_means))
    assert result["std_dice"] == pytest.approx(np.std(volume_means))
    for c in range(3):
        column = [d for d in scores[:, c] if not math.isnan(d)]
        assert result["per_class"][c] == pytest.approx(np.mean(column))
        assert result["per_class_std"][c] == pytest.approx(np.std(column))


# ------------------------------------------------------------------------------- refusals
def test_wrong_missing_and_corrupt_checkpoints_are_refused(tiny, pretrained, tmp_path):
    with pytest.raises(RunError, match="is a pretrain checkpoint"):
        evaluate.main(["--checkpoint", str(pretrained)])
    with pytest.raises(RunError, match="no such checkpoint"):
        finetune.main(["--pretrained", str(tmp_path / "missing.pt")])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pretrained.read_bytes()[:1000])
    with pytest.raises(RunError, match=f"{truncated}: corrupt or truncated checkpoint"):
        finetune.main(["--pretrained", str(truncated)])
    with pytest.raises(RunError, match="--width 4"):
        finetune.main(["--pretrained", str(pretrained), "--width", "8"])
    with pytest.raises(RunError, match=rf"^{pretrained.parent}: a run folder, not a checkpoint; it holds checkpoint.pt$"):
        evaluate.main(["--checkpoint", str(pretrained.parent)])
    copy = tmp_path / "copy.pt"
    copy.write_bytes(pretrained.read_bytes())
    with pytest.raises(RunError, match=r"--json \S+copy.pt is the checkpoint itself"):
        evaluate.main(["--checkpoint", str(copy), "--json", str(tmp_path / "." / "copy.pt")])
    assert copy.read_bytes() == pretrained.read_bytes()


def test_positional_methods_refuse_volumes_of_a_single_slice(tmp_path, capsys):
    """2D images saved as (X, Y, 1): every position is 1, so PCL and GCL made every pair a positive (pos_acc 1.0
    from the first epoch) without a word. SimCLR uses no positions and still trains; where only some volumes are a
    single slice, PCL says how many."""
    import nibabel as nib
    rng, images = np.random.default_rng(0), tmp_path / "d" / "imagesTr"
    images.mkdir(parents=True)
    for i in range(8):
        nib.save(nib.Nifti1Image(rng.normal(size=(32, 32, 1)).astype(np.float32), np.eye(4)),
                 str(images / f"case{i}_0000.nii.gz"))
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "file_ending": ".nii.gz"}))
    argv = ["--data", str(tmp_path / "d"), "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--width", "4"]
    for method in ("pcl", "gcl"):
        with pytest.raises(RunError, match=rf"^{tmp_path}/d: every volume is a single slice, so every position is 1 "
                                           rf"and every pair a positive; {method} needs 3D volumes"):
            pretrain.main([*argv, "--method", method, "--out", str(tmp_path / method)])
        assert not (tmp_path / method).exists()
    pretrain.main([*argv, "--method", "simclr", "--out", str(tmp_path / "simclr")])
    assert load_checkpoint(tmp_path / "simclr" / "checkpoint.pt")["epoch"] == 1
    volume = nib.Nifti1Image(rng.normal(size=(32, 32, 6)).astype(np.float32), np.eye(4))  # one of 6 slices
    nib.save(volume, str(images / "case0_0000.nii.gz"))
    capsys.readouterr()
    pretrain.main([*argv, "--method", "pcl", "--out", str(tmp_path / "mixed")])  # 7 of 8 volumes a single slice
    assert "note: 7 volumes are a single slice, at position 1: pcl pairs them with every volume's last slices" in \
        capsys.readouterr().out


def test_one_volume_of_a_single_slice_gets_its_note(tmp_path, capsys):
    """1 volume of a single slice, 1 of two and 6 of six: PCL says so (1 volume), as it does for 7 of 8."""
    import nibabel as nib
    rng, images = np.random.default_rng(0), tmp_path / "d" / "imagesTr"
    images.mkdir(parents=True)
    for i in range(8):
        nib.save(nib.Nifti1Image(rng.normal(size=(32, 32, {0: 1, 1: 2}.get(i, 6))).astype(np.float32), np.eye(4)),
                 str(images / f"case{i}_0000.nii.gz"))
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "file_ending": ".nii.gz"}))
    pretrain.main(["--data", str(tmp_path / "d"), "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                   "--width", "4", "--method", "pcl", "--out", str(tmp_path / "pcl")])
    assert "note: 1 volumes are a single slice, at position 1: pcl pairs them with every volume's last slices" in \
        capsys.readouterr().out


def test_flipped_bytes_inside_a_weight_are_caught_by_the_digest(tiny, pretrained, tmp_path):
    run = tiny.finetune(pretrained, tmp_path / "ft")
    raw = bytearray((run / "best.pt").read_bytes())
    weight = load_checkpoint(run / "best.pt")["model"]["decoder.blocks.0.body.0.weight"]  # (32, 64, 3, 3)
    stored = weight.permute(0, 2, 3, 1).contiguous().numpy().tobytes()  # its channels_last storage order
    start = raw.find(stored[:64])  # tensors are stored uncompressed in the zip
    assert start > 0
    raw[start:start + 5000] = bytes(b ^ 0xFF for b in raw[start:start + 5000])
    (tmp_path / "flipped.pt").write_bytes(raw)
    with pytest.raises(RunError, match=r"flipped.pt: corrupt checkpoint \(its contents do not match the digest"):
        evaluate.main(["--checkpoint", str(tmp_path / "flipped.pt")])


def test_a_model_with_non_finite_outputs_is_an_error_not_a_score(tiny, pretrained, tmp_path):
    model, config = evaluate.load_unet(tiny.finetune(pretrained, tmp_path / "ft") / "best.pt")
    with torch.no_grad():
        model.final.bias.fill_(float("nan"))
    with pytest.raises(RunError, match="not finite"):
        predict(model, np.zeros((2, 1, 32, 32), np.float32), torch.device("cpu"))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    tiny.pretrain(tmp_path / "run", "--stop-after", "1")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real = pretrain.contrastive_step
    monkeypatch.setattr(pretrain, "contrastive_step", lambda *a: (real(*a)[0] * math.nan, real(*a)[1]))
    with pytest.raises(RunError, match="nan at epoch 2; the checkpoint of epoch 1 in .* is intact"):
        tiny.pretrain(tmp_path / "run", "--resume")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(RunError, match="nan at epoch 1; no checkpoint was written"):  # there is none to keep
        tiny.pretrain(tmp_path / "first")
    assert not (tmp_path / "first" / "checkpoint.pt").exists()


def saving_run(tmp_path):
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a momentum buffer to save
    scheduler, scaler = runs.cosine_schedule(optimizer, 10), runs.grad_scaler(torch.device("cpu"), "off")
    run = checkpoints.Run(tmp_path / "run", "pretrain", {"epochs": 2}, ["epoch"])
    run.start(False, net, optimizer, scheduler, scaler)
    return run, (net, optimizer, scheduler, scaler)


def test_finetuning_from_an_unfinished_pretraining_says_so(tiny, tmp_path, capsys):
    checkpoint = tiny.pretrain(tmp_path / "pcl", "--stop-after", "1")

    def says_unfinished():
        capsys.readouterr()
        finetune.pretrained_encoder(finetune.get_args(["--pretrained", str(checkpoint)]), torch.device("cpu"))
        return f"note: {checkpoint} holds epoch 1 of 2: an unfinished pretraining" in capsys.readouterr().out
    assert says_unfinished()
    tiny.pretrain(tmp_path / "pcl", "--resume")  # now all of its 2 epochs
    assert not says_unfinished()


def test_finetuning_at_another_image_size_says_so(tiny, pretrained, capsys):
    for size, said in (("48", True), ("32", False), (None, False)):  # pretrained at 32 px
        args = finetune.get_args(["--pretrained", str(pretrained)] + (["--image-size", size] if size else []))
        capsys.readouterr()
        finetune.pretrained_encoder(args, torch.device("cpu"))
        assert ("note: finetuning at 48 px; the encoder was pretrained at 32 px" in capsys.readouterr().out) == said
        assert args.image_size == int(size or 32)


def test_resume_says_when_there_is_nothing_to_resume(tmp_path, capsys):
    run, objects = saving_run(tmp_path)
    assert "--resume" not in capsys.readouterr().out  # a fresh run, not asked to resume
    again = checkpoints.Run(tmp_path / "mistyped", "pretrain", {"epochs": 2}, ["epoch"])
    assert again.start(True, *objects) is None and again.epoch == 0
    assert f"--resume: no checkpoint in {tmp_path / 'mistyped'}, starting a new run" in capsys.readouterr().out


def test_a_run_folder_has_one_writer_at_a_time(tmp_path):
    """A second Run on a folder whose writer is still at work is Busy, at once; it starts once the first ends."""
    run, objects = saving_run(tmp_path)
    second = checkpoints.Run(run.out, "pretrain", {"epochs": 2}, ["epoch"])
    with pytest.raises(checkpoints.Busy, match=r"run is being written by another process; wait for it or use another --out$"):
        second.start(True, *objects)
    with run.interruptible():  # the first run ends, releasing the folder
        run.save(1, *objects)
    with second.interruptible():
        assert second.start(True, *objects)["epoch"] == 1


def test_resume_lets_only_the_free_settings_change(tmp_path):
    """Where a run reads its data from, or on what, may change on resume; any other setting, one the checkpoint
    does not have included, is refused."""
    run, objects = saving_run(tmp_path)
    with run.interruptible():
        run.save(1, *objects)
    for key in ("resume", "device", "workers", "stop_after", "compile", "out", "cache"):
        again = checkpoints.Run(run.out, "pretrain", {"epochs": 2, key: "other"}, ["epoch"])
        with again.interruptible():  # which releases the folder
            assert again.start(True, *objects)["epoch"] == 1
    again = checkpoints.Run(run.out, "pretrain", {"epochs": 2, "seed": 1}, ["epoch"])
    with pytest.raises(RunError, match=r"^cannot resume with other settings \(--seed None -> 1\)"):
        with again.interruptible():
            again.start(True, *objects)
    again = checkpoints.Run(run.out, "pretrain", {"epochs": 2, "keep_last": False}, ["epoch"])
    with again.interruptible():  # a setting added since: a run saved before it ran as its value then
        assert again.start(True, *objects)["epoch"] == 1
    again = checkpoints.Run(run.out, "pretrain", {"epochs": 2, "keep_last": True}, ["epoch"])
    with pytest.raises(RunError, match=r"^cannot resume with other settings \(--keep-last False -> True\)"):
        with again.interruptible():
            again.start(True, *objects)


def test_resume_restores_the_global_torch_and_cuda_generators(tmp_path, monkeypatch):
    """The generators go on from their state at the checkpoint; CUDA's is faked here (no GPU needed)."""
    cuda = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in cuda])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: cuda.__setitem__(slice(None), states))
    run, objects = saving_run(tmp_path)
    with run.interruptible():
        run.save(1, *objects)
    after_the_save = torch.rand(3)
    cuda[:] = [torch.tensor([9], dtype=torch.uint8)]  # both generators move on
    again = checkpoints.Run(run.out, "pretrain", {"epochs": 2}, ["epoch"])
    with again.interruptible():
        again.start(True, *objects)
    assert torch.equal(torch.rand(3), after_the_save)
    assert torch.equal(cuda[0], torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_resume_keeps_the_log_up_to_its_checkpoint_and_refuses_a_broken_one_before_rewriting_it(tmp_path, capsys):
    run, objects = saving_run(tmp_path)
    with run.interruptible():
        run.save(1, *objects)
    log = run.out / "log.csv"
    log.write_text("epoch\n1\n2\n")  # epoch 2 was trained after the checkpoint of epoch 1
    again = lambda: checkpoints.Run(run.out, "pretrain", {"epochs": 2}, ["epoch"]).start(True, *objects)
    assert again()["epoch"] == 1 and log.read_text().split() == ["epoch", "1"]
    log.write_text("epoch\n1\nnot a number\n")
    with pytest.raises(RunError, match=r"log.csv: not a log of this project \(ValueError: .*\); mend it, or delete it"):
        again()
    assert log.read_text() == "epoch\n1\nnot a number\n"  # as it was: nothing is rewritten before it is read
    log.unlink()
    capsys.readouterr()
    assert again()["epoch"] == 1 and log.read_text().split() == ["epoch"]
    assert f"note: {log} is missing; the resumed log starts at epoch 2" in capsys.readouterr().out


class Killed(BaseException):
    """A kill, as far as the code can tell: nothing catches it."""


@pytest.mark.parametrize("killed_in", ["config.json", "log.csv"])
def test_a_kill_while_a_run_restarts_leaves_its_config_and_log_whole(tmp_path, monkeypatch, killed_in):
    """A resumed run rewrites config.json and log.csv as it starts. Each rewrite used to empty the file, then
    write it, so that a kill in between left it empty (and the log's epochs were lost for good). Now the file
    is written aside and renamed: the kill comes as the file being written is opened."""
    run, objects = saving_run(tmp_path)
    with run.interruptible():
        run.save(1, *objects)
    (run.out / "log.csv").write_text("epoch\n1\n")
    before = {name: (run.out / name).read_text() for name in ("config.json", "log.csv")}
    real_open = Path.open

    def open_then_die(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if path.name.startswith(killed_in) and "w" in mode:  # opened for writing: emptied, and nothing written yet
            f.close()
            raise Killed
        return f
    with monkeypatch.context() as m:
        m.setattr(Path, "open", open_then_die)
        dead = checkpoints.Run(run.out, "pretrain", {"epochs": 2}, ["epoch"])
        with pytest.raises(Killed):
            dead.start(True, *objects)
    dead.lock.close()  # the killed process's end releases its folder
    assert {name: (run.out / name).read_text() for name in before} == before
    again = checkpoints.Run(run.out, "pretrain", {"epochs": 2}, ["epoch"])
    assert again.start(True, *objects)["epoch"] == 1 and (run.out / "log.csv").read_text() == "epoch\n1\n"


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_a_run_killed_as_an_epoch_ends_resumes_with_every_row_of_its_log(tiny, pretrained, tmp_path, monkeypatch,
                                                                         script):
    """An epoch ends with its log row and its checkpoint. The checkpoint came first: a kill between the two
    resumed after that epoch, and its row was missing from the log for good. The row now comes first."""
    train = (lambda out, *extra: tiny.pretrain(out, *extra)) if script == "pretrain" else \
        (lambda out, *extra: tiny.finetune(pretrained, out, *extra))
    train(tmp_path / "whole")
    real_log = checkpoints.Run.log

    def die_at_epoch_2(run, **row):
        if row["epoch"] == 2:
            raise Killed
        real_log(run, **row)
    with monkeypatch.context() as m:
        m.setattr(checkpoints.Run, "log", die_at_epoch_2)
        with pytest.raises(Killed):
            train(tmp_path / "cut")
    train(tmp_path / "cut", "--resume")
    rows = {run: [{k: v for k, v in row.items() if k != "seconds"}
                  for row in csv.DictReader((tmp_path / run / "log.csv").open())] for run in ("whole", "cut")}
    assert [row["epoch"] for row in rows["cut"]] == ["1", "2"] and rows["cut"] == rows["whole"]


def test_a_checkpoint_holds_its_epoch_while_training_goes_on_beside_the_background_write(tmp_path, monkeypatch):
    go, real = threading.Event(), checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *a: go.wait(10) and real(*a))  # the write waits for go
    run, parts = saving_run(tmp_path)
    net, optimizer = parts[:2]
    weight, momentum = net.weight.detach().clone(), optimizer.state[net.weight]["momentum_buffer"].clone()
    with run.interruptible():
        run.save(1, *parts)
        with torch.no_grad():  # the next epoch changes everything in place before the write starts
            net.weight.add_(1.0)
            optimizer.state[net.weight]["momentum_buffer"].mul_(-1.0)
        go.set()
    state = load_checkpoint(run.checkpoint)  # on disk, whole, once the run's loop is left
    assert torch.equal(state["model"]["weight"], weight)
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], momentum)


def test_a_ctrl_c_while_waiting_for_a_write_waits_for_it_and_says_the_epoch_it_holds(tmp_path, monkeypatch):
    """Ctrl-C lands while save(2) waits for epoch 1's write, still going: the run must wait for that write
    again and say that the checkpoint holds epoch 1, not that there is nothing to resume (and then release
    the folder with the write half done)."""
    go, real = threading.Event(), checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *a: go.wait(10) and real(*a))  # the write waits for go

    class CutOnce:  # a write whose first wait is cut by Ctrl-C; the write itself goes on
        def __init__(self, future):
            self.future, self.cut = future, False

        def result(self):
            if not self.cut:
                self.cut = True
                threading.Timer(0.3, go.set).start()  # the write ends a little after the Ctrl-C
                raise KeyboardInterrupt
            return self.future.result()

        def exception(self):
            return self.future.exception()
    run, parts = saving_run(tmp_path)
    submit = run.writer.submit
    monkeypatch.setattr(run.writer, "submit", lambda *a: CutOnce(submit(*a)))
    with pytest.raises(RunError, match=r"^interrupted; \S+checkpoint\.pt holds epoch 1, continue with"):
        with run.interruptible():
            run.save(1, *parts)
            run.save(2, *parts)  # waits for epoch 1's write first
    assert load_checkpoint(run.checkpoint)["epoch"] == 1


def test_the_cpu_copy_of_a_checkpoint_shares_no_tensor_with_training():
    """Tensors in lists and tuples are copied too (CUDA's generator states are a list of them)."""
    t = torch.ones(2)
    copy = checkpoints.cpu_copy({"a": [t, 1], "b": (t,), "c": {"d": t}})
    t.add_(1)
    assert type(copy["a"]) is list and type(copy["b"]) is tuple and copy["a"][1] == 1
    assert all(torch.equal(x, torch.ones(2)) for x in (copy["a"][0], copy["b"][0], copy["c"]["d"]))


def test_a_failed_background_write_is_one_line_that_keeps_the_checkpoint_before(tmp_path, monkeypatch):
    def full(path, state):
        raise OSError(28, "No space left on device")
    run, parts = saving_run(tmp_path / "first")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_checkpoint", full)
        with pytest.raises(RunError, match=r"checkpoint.pt: cannot be written \(No space left on device\); there is none "
                                           r"before it$"):  # the first epoch's: no checkpoint to keep
            with run.interruptible():
                run.save(1, *parts)
    run, parts = saving_run(tmp_path)
    with run.interruptible():
        run.save(1, *parts)
    before = run.checkpoint.read_bytes()
    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    with pytest.raises(RunError, match=r"checkpoint.pt: cannot be written \(No space left on device\); the one before"):
        with run.interruptible():
            run.save(2, *parts)
    assert run.checkpoint.read_bytes() == before
    monkeypatch.undo()

    def torch_save_on_a_full_disk(state, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 55040 vs 54936")
    monkeypatch.setattr(checkpoints.torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(RunError, match=r"checkpoint.pt: cannot be written \(torch.save failed with [\d,]+ MB free on "
                                       r"its disk: \[enforce fail .* unexpected pos 55040 vs 54936\); the one before"):
        with run.interruptible():
            run.save(3, *parts)
    assert run.checkpoint.read_bytes() == before and not list(tmp_path.rglob("*.tmp"))


def test_bad_requests_are_refused(tiny, pretrained, tmp_path):
    with pytest.raises(RunError, match="fold 0 has only 5 training patients"):
        tiny.finetune(pretrained, tmp_path / "a", "--patients", "6")
    unlabeled = tmp_path / "unlabeled"
    (unlabeled / "imagesTr").mkdir(parents=True)
    for f in (tiny.data / "imagesTr").glob("*"):
        (unlabeled / "imagesTr" / f.name).write_bytes(f.read_bytes())
    (unlabeled / "dataset.json").write_text((tiny.data / "dataset.json").read_text())
    with pytest.raises(RunError, match="no labeled volume"):
        finetune.main(["--pretrained", "none", "--data", str(unlabeled), "--image-size", "32", "--width", "4",
                       "--out", str(tmp_path / "b")])


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.touch, (Path(self.marker),))


def test_the_digest_covers_every_value_and_a_tensor_s_shape_and_dtype_and_loading_runs_no_code(tmp_path):
    """The digest hashes every value with its name, and a tensor with its dtype and shape: a weight viewed in
    another shape with the same bytes, or a changed epoch or setting, is refused. And torch.load runs with
    weights_only: a pickle that would run code is refused before it can."""
    path = tmp_path / "c.pt"
    checkpoints.save_checkpoint(path, dict(kind="pretrain", config={"lr": 0.1}, epoch=3, w=torch.arange(6.0)))
    for change in (lambda s: s.update(w=s["w"].view(2, 3)), lambda s: s.update(w=s["w"].view(torch.int32)),
                   lambda s: s.update(epoch=4), lambda s: s["config"].update(lr=0.2),
                   lambda s: s["w"][5].add_(1), lambda s: s.update(v=s.pop("w"))):  # a value; another name
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, tmp_path / "changed.pt")
        with pytest.raises(RunError, match="corrupt checkpoint"):
            load_checkpoint(tmp_path / "changed.pt")
    checkpoints.save_checkpoint(tmp_path / "foreign.pt", {"kind": "pretrain"})  # its digest matches; it has no config
    with pytest.raises(RunError, match=r"foreign.pt: not a checkpoint of this project \(no 'kind' and 'config'\)$"):
        load_checkpoint(tmp_path / "foreign.pt")
    marker = tmp_path / "ran"
    torch.save(dict(kind="pretrain", config={}, payload=RunsCode(str(marker))), tmp_path / "evil.pt")
    with pytest.raises(RunError, match="corrupt or truncated checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_leftovers_of_killed_saves_go_when_a_run_starts_even_a_refused_one(tmp_path):
    """Each *.pt.tmp (best.pt's too) and the log's and config's leftovers go at start, before any save; a resume
    refused for its settings writes nothing and leaves none."""
    run, objects = saving_run(tmp_path)
    with run.interruptible():
        run.save(1, *objects)
    names = ("checkpoint.pt.tmp", "best.pt.tmp", "log.csv.tmp", "config.json.tmp")
    for name in names:
        (run.out / name).write_bytes(b"left by a killed save")
    again = checkpoints.Run(run.out, "pretrain", {"epochs": 3}, ["epoch"])  # another setting: refused
    with pytest.raises(RunError, match="cannot resume with other settings"):
        again.start(True, *objects)
    again.lock.close()
    assert [name for name in names if (run.out / name).exists()] == []


def slow_save(seconds, fails=0):
    """save_checkpoint taking this long, its first `fails` calls failing as on a full disk."""
    real, calls = checkpoints.save_checkpoint, []

    def save(path, state):
        time.sleep(seconds)
        calls.append(path)
        if len(calls) <= fails:
            raise OSError(28, "No space left on device")
        real(path, state)
    return save


def test_the_write_in_flight_ends_before_the_run_says_where_it_stands(tmp_path, monkeypatch):
    """Ctrl-C, or another error, while a checkpoint is being written: the write ends first, so the message
    names the epoch that is on the disk, and a failed write is said, not hidden; the next save waits for the
    one before, whose failure is not lost."""
    run, objects = saving_run(tmp_path)
    monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save(0.5))
    with pytest.raises(RunError, match=r"interrupted; .*checkpoint.pt holds epoch 3, "):
        with run.interruptible():
            run.save(3, *objects)
            raise KeyboardInterrupt
    assert load_checkpoint(run.checkpoint)["epoch"] == 3
    run, objects = saving_run(tmp_path / "other")
    with pytest.raises(ValueError):
        with run.interruptible():
            run.save(1, *objects)
            raise ValueError("a bug in the loop")
    assert load_checkpoint(run.checkpoint)["epoch"] == 1  # written whole before the error went up
    for interrupt in (False, True):
        run, objects = saving_run(tmp_path / f"full{interrupt}")
        monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save(0.2, fails=1))  # epoch 2's would succeed
        with pytest.raises(RunError, match="cannot be written"):
            with run.interruptible():
                run.save(1, *objects)
                if interrupt:
                    raise KeyboardInterrupt
                run.save(2, *objects)


def test_the_sigterm_handler_is_the_loop_s_alone(tmp_path):
    """Outside the training loop (reproduce.py's evaluation, a notebook), SIGTERM is handled as before."""
    before = signal.getsignal(signal.SIGTERM)
    run, objects = saving_run(tmp_path)
    with run.interruptible():
        assert signal.getsignal(signal.SIGTERM) is not before
    with pytest.raises(RunError):
        with run.interruptible():
            raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is before
    own = lambda *a: None  # a handler of the caller's own comes back too
    signal.signal(signal.SIGTERM, own)
    try:
        with run.interruptible():
            pass
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_loss_that_is_not_finite_is_refused(value, tmp_path):
    with pytest.raises(RunError, match=f"the loss became {value} at epoch 2"):
        checkpoints.check_finite(value, 1, tmp_path)
    checkpoints.check_finite(1e30, 1, tmp_path)


# ------------------------------------------------------------------ finetune.py's settings reach the loop
def test_init_given_to_finetuning_is_the_decoder_s_whatever_the_pretraining_s(pretrained):
    """--init he on an encoder pretrained with the default init: the decoder is drawn the way asked; with no
    --init, the pretraining's."""
    for extra, init in ((["--init", "he"], "he"), ([], "default")):
        args = finetune.get_args(["--pretrained", str(pretrained), *extra])
        finetune.pretrained_encoder(args, torch.device("cpu"))
        assert args.init == init


def test_a_min_lr_equal_to_lr_is_a_constant_rate_and_allowed():
    """--min-lr must not exceed --lr: equal is a constant learning rate, a fair request, and is not refused."""
    assert finetune.get_args(["--pretrained", "none", "--lr", "1e-3", "--min-lr", "1e-3"]).min_lr == 1e-3


def test_finetuning_in_fp16_scales_its_loss(tiny, pretrained, tmp_path):
    """--amp fp16 (here on the CPU) gets a GradScaler whose state is saved: small fp16 gradients would
    flush to zero unscaled. In float32 there is nothing to scale."""
    for amp, scaled in (("fp16", True), ("off", False)):
        state = load_checkpoint(tiny.finetune(pretrained, tmp_path / amp, "--amp", amp, "--epochs", "1") / "checkpoint.pt")
        assert ("scale" in state["scaler"]) == scaled, amp


def test_finetuning_on_a_cpu_loads_in_its_own_process_unless_told(tiny, pretrained, tmp_path, monkeypatch):
    """--workers defaults to 0 on a CPU (4 only on CUDA): loader processes on a CPU take the cores that train."""
    asked, real = [], data.make_loader
    monkeypatch.setattr(finetune.data, "make_loader", lambda *a, **kw: asked.append(kw["workers"]) or real(*a, **kw))
    tiny.finetune(pretrained, tmp_path / "ft", "--epochs", "1")
    assert asked == [0]


def test_steps_rounds_the_epochs_up_and_every_batch_is_whole(tiny, pretrained, tmp_path, monkeypatch):
    """--steps L + 1 with L whole batches of 8 per epoch (n slices of the two training patients, counted from the
    cache): ceil((L + 1) / L) = 2 epochs, and no short batch (n is not a multiple of 8)."""
    cache = open_dataset(tiny.data, 32)
    train = data.split_patients(cache.patients(labeled=True), 4, 0, 0, 1)["train"][:2]
    n = sum(v.slices for v in cache.volumes if v.patient in train and v.labeled)
    assert n % 8 and n // 8 >= 2
    seen = recording_loader(monkeypatch, finetune)
    finetune.main(["--pretrained", str(pretrained), "--patients", "2", "--folds", "4", "--val", "1", "--batch-size", "8",
                   "--steps", str(n // 8 + 1), "--out", str(tmp_path / "ft")])
    assert logged(tmp_path / "ft", "epoch") == [1, 2]
    assert [len(batch) for batch in seen] == [8] * (2 * (n // 8))


def test_finetuning_runs_100_epochs_unless_told(tiny, pretrained, tmp_path):
    """The paper's 100 epochs by default: the cosine of the first epoch's end is that of 1 / 100."""
    finetune.main(["--pretrained", str(pretrained), "--patients", "2", "--folds", "4", "--val", "1", "--batch-size", "8",
                   "--stop-after", "1", "--out", str(tmp_path / "ft")])
    assert load_checkpoint(tmp_path / "ft" / "checkpoint.pt")["config"]["epochs"] == 100
    assert logged(tmp_path / "ft", "lr") == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi / 100))], abs=1e-12)


def test_the_finetuning_cosine_stops_at_min_lr(tiny, pretrained, tmp_path):
    """--min-lr reaches the schedule: lr 1e-3 over 2 epochs would end the epochs at 5e-4 and 0; a floor of 6e-4
    holds both at 6e-4."""
    run = tiny.finetune(pretrained, tmp_path / "ft", "--lr", "1e-3", "--min-lr", "6e-4")
    assert logged(run, "lr") == pytest.approx([6e-4, 6e-4], abs=1e-12)


def scripted_validation(monkeypatch, scores):
    """Make finetune.py's validation return these mean Dice, one per epoch."""
    scores = iter(scores)
    monkeypatch.setattr(finetune, "evaluate_patients", lambda *a: {"mean_dice": next(scores)})


def test_a_resumed_run_keeps_the_best_epoch_of_before_its_cut(tiny, pretrained, tmp_path, monkeypatch):
    """Validation Dice 0.5, 0.1 (then cut), 0.3: best.pt stays at epoch 1, as in an uninterrupted run; the
    resumed run must compare with the best of before the cut, not with nothing or with the last epoch."""
    scripted_validation(monkeypatch, [0.5, 0.1, 0.3])
    tiny.finetune(pretrained, tmp_path / "ft", "--epochs", "3", "--stop-after", "2")
    tiny.finetune(pretrained, tmp_path / "ft", "--epochs", "3", "--resume")
    best = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert (best["epoch"], best["val_dice"]) == (1, 0.5) and logged(tmp_path / "ft", "epoch") == [1, 2, 3]


def test_an_epoch_that_only_ties_the_best_does_not_replace_it(tiny, pretrained, tmp_path, monkeypatch):
    """best.pt is the first epoch that reached the best validation Dice: 0.5 then 0.5 keeps epoch 1."""
    scripted_validation(monkeypatch, [0.5, 0.5])
    best = load_checkpoint(tiny.finetune(pretrained, tmp_path / "ft") / "best.pt")
    assert (best["epoch"], best["val_dice"]) == (1, 0.5)


def test_each_epoch_augments_as_asked_with_new_random_draws(tiny, pretrained, tmp_path, monkeypatch):
    """--augment paper reaches augment(), and no generator seed of epoch 1 comes back in epoch 2 (the seed is a
    function of the epoch): the same draws every epoch would warp each slice the same way throughout."""
    calls, real = [], finetune.augment
    monkeypatch.setattr(finetune, "augment", lambda x, config, generator, labels=None:
                        calls.append((config, generator.initial_seed())) or real(x, config, generator, labels=labels))
    tiny.finetune(pretrained, tmp_path / "ft", "--augment", "paper")
    assert len(calls) >= 4 and all(config == finetune.AUGMENTATIONS["paper"] for config, _ in calls)
    half = len(calls) // 2
    first, second = {seed for _, seed in calls[:half]}, {seed for _, seed in calls[half:]}
    assert not first & second


def test_the_logged_finetuning_loss_is_the_mean_of_cross_entropy_plus_weighted_soft_dice(tiny, pretrained, tmp_path,
                                                                                          monkeypatch):
    """Each step's loss is CE + w * soft Dice (--dice-weight w = 0.5), and an epoch's row holds the mean over its
    steps, both found here from what the two losses returned."""
    ce, sd, real_ce, real_sd = [], [], finetune.F.cross_entropy, finetune.soft_dice_loss
    monkeypatch.setattr(finetune.F, "cross_entropy", lambda *a, **kw: ce.append(real_ce(*a, **kw)) or ce[-1])
    monkeypatch.setattr(finetune, "soft_dice_loss", lambda *a: sd.append(real_sd(*a)) or sd[-1])
    run = tiny.finetune(pretrained, tmp_path / "ft", "--dice-weight", "0.5")
    steps = [c.item() + 0.5 * d.item() for c, d in zip(ce, sd)]
    assert len(ce) == len(sd) >= 4
    half = len(steps) // 2
    assert logged(run, "loss") == pytest.approx([sum(steps[:half]) / half, sum(steps[half:]) / half], rel=1e-5)


# ------------------------------------------------------------------ evaluate.py and dice.py, by hand
def test_evaluate_refuses_a_fold_the_checkpoint_does_not_have(fold1):
    """Folds are 0 .. folds - 1: --fold 4 of a 4-fold model is refused with the reason."""
    with pytest.raises(RunError, match=r"^--fold 4: the checkpoint was trained with 4 folds$"):
        evaluate.main(["--checkpoint", str(fold1), "--fold", "4"])


def test_evaluate_scores_the_test_fold_of_the_checkpoint_s_split_seed(tiny, pretrained, tmp_path):
    """A model finetuned with --split-seed 1 is scored on fold 0 of split seed 1, its own test patients (fold 0
    of seed 0 is two other patients here)."""
    labeled = open_dataset(tiny.data, 32).patients(labeled=True)
    own = data.split_patients(labeled, 4, 0, 1, 1)["test"]
    assert sorted(own) != sorted(data.split_patients(labeled, 4, 0, 0, 1)["test"])
    best = tiny.finetune(pretrained, tmp_path / "ft", "--split-seed", "1", "--epochs", "1") / "best.pt"
    assert evaluate.main(["--checkpoint", str(best)])["patients"] == sorted(own)


def test_evaluate_refuses_a_dataset_whose_labeled_patients_changed_since_finetuning(tiny, tmp_path):
    """A test patient's label gone (deleted, or saved as .nii beside a .nii.gz dataset) would leave one test
    patient fewer, scored without a word, and a patient labeled since would move others across the folds:
    both are refused, naming the patients; the unchanged folder still evaluates."""
    copy = shutil.copytree(tiny.data, tmp_path / "copy")
    finetune.main(["--pretrained", "none", "--data", str(copy), "--patients", "2", "--folds", "4", "--val", "1",
                   "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "ft"), "--image-size", "32", "--width", "4"])
    best = tmp_path / "ft" / "best.pt"
    test = load_checkpoint(best)["split"]["test"]
    assert evaluate.main(["--checkpoint", str(best)])["patients"] == sorted(test)
    (copy / "labelsTr" / f"{test[0]}.nii.gz").rename(tmp_path / "aside.nii.gz")
    with pytest.raises(RunError, match=rf"labeled patients changed since this model was finetuned \(no longer "
                                       rf"labeled 1: {test[0]}\), so its folds are not"):
        evaluate.main(["--checkpoint", str(best)])
    (tmp_path / "aside.nii.gz").rename(copy / "labelsTr" / f"{test[0]}.nii.gz")
    assert evaluate.main(["--checkpoint", str(best)])["patients"] == sorted(test)


def test_evaluate_refuses_data_of_other_classes_and_a_synthetic_set_before_generating_it(fold1, tmp_path, monkeypatch):
    """A model of the MRI classes (RV, MYO, LV) scored on CHD-like data: refused by name, for a folder once it is
    read, and for the synthetic-chd set before its minute of generation."""
    from synthetic import write_synthetic
    chd = write_synthetic(tmp_path / "chd", patients=2, style="chd", seed=5)
    with pytest.raises(RunError, match=rf"^{chd} has classes \['background', 'LV', 'RV', 'LA', .*\], the model was "
                                       rf"trained on \['background', 'RV', 'MYO', 'LV'\]$"):
        evaluate.main(["--checkpoint", str(fold1), "--data", str(chd)])
    monkeypatch.setattr(data, "resolve_data", lambda *a: pytest.fail("generated before the refusal"))
    with pytest.raises(RunError, match=r"^synthetic-chd has classes \['background', 'LV', .*\], the model was trained on"):
        evaluate.main(["--checkpoint", str(fold1), "--data", "synthetic-chd"])


def test_the_printed_table_puts_each_number_in_its_column(capsys):
    """Mean over volumes, its std in brackets, then the pooled Dice: each under its own heading."""
    evaluate.print_table(dict(classes=["LV", "RV"], per_class=[0.9, 0.7], per_class_std=[0.1, 0.2],
                              pooled_per_class=[0.8, 0.6], mean_dice=0.85, std_dice=0.05, pooled_dice=0.75))
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["LV", "0.900", "(0.100)", "0.800"] in lines and ["RV", "0.700", "(0.200)", "0.600"] in lines
    assert ["mean", "0.850", "(0.050)", "0.750"] in lines


@torch.no_grad()
def test_predict_scores_in_eval_mode_batch_by_batch_and_leaves_the_model_s_statistics_alone():
    """predict() on a network left in training mode: the class map of eval mode (BatchNorm's running statistics,
    so a slice's prediction does not depend on the others), for 5 slices in batches of 2, and no running
    statistic updated by the test slices."""
    torch.manual_seed(0)
    net = UNet(width=4).train()
    net(torch.randn(4, 1, 32, 32) * 3 + 1)  # running statistics away from their initial values
    images = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    expected = UNet(width=4)
    expected.load_state_dict(before)
    expected = expected.eval()(torch.as_tensor(images)).argmax(dim=1).numpy()  # (5, 32, 32)
    net.train()
    got = predict(net, images, torch.device("cpu"), batch_size=2)
    assert got.shape == (5, 32, 32) and np.array_equal(got, expected)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


class HandMadeCache:
    """A dataset's cache as dice.py reads it: volumes (patient, labeled, start, slices), classes, arrays."""

    class Volume:
        def __init__(self, name, patient, labeled, start):
            self.id, self.patient, self.labeled, self.cine, self.start, self.slices = name, patient, labeled, False, start, 1

    def __init__(self, predicted, truth, volumes):
        self.classes, self.meta, self.folder = ["background", "A", "B", "C"], {"data": "hand"}, "hand"
        self.arrays = dict(images=np.array(predicted, np.float32), labels=np.array(truth, np.uint8))
        self.volumes = [self.Volume(*v, start=k) for k, v in enumerate(volumes)]

    def array(self, name):
        return self.arrays[name]


class ShowsItsImage(torch.nn.Module):
    """A "model" whose class map is its input image: logits one-hot of the pixel values."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), 4).permute(0, 3, 1, 2).float()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # class C, NaN throughout, without numpy's "Mean of empty slice"
def test_evaluate_patients_on_a_hand_made_fold():
    """Two labeled one-slice volumes, an unlabeled frame of the second patient (no truth: left out), another
    patient's volume (not asked); class C absent from the whole fold.
      v1: A: |P & T| 1, |P| 3, |T| 1 -> 0.5;  B, C absent: NaN.          mean over its classes 0.5
      v2: A: 1, 1, 2 -> 2/3;  B: 1, 2, 1 -> 2/3;  C absent: NaN.          mean 2/3
      pooled: A: 2, 4, 3 -> 4/7;  B: 1, 2, 1 -> 2/3;  C: NaN, left out of the pooled mean."""
    predicted = [[[1, 1], [1, 0]], [[2, 2], [1, 0]], [[2, 2], [2, 2]], [[3, 3], [3, 3]]]
    truth = [[[1, 0], [0, 0]], [[2, 0], [1, 1]], [[0, 0], [0, 0]], [[3, 0], [0, 0]]]
    cache = HandMadeCache(predicted, truth, [("v1", "p1", True), ("v2", "p2", True), ("frame", "p2", False),
                                             ("v4", "p3", True)])
    result = evaluate_patients(ShowsItsImage(), cache, ["p1", "p2"], torch.device("cpu"))
    assert list(result["per_volume"]) == ["v1", "v2"]
    np.testing.assert_allclose(result["per_volume"]["v1"], [0.5, math.nan, math.nan])
    np.testing.assert_allclose(result["per_volume"]["v2"], [2 / 3, 2 / 3, math.nan])
    np.testing.assert_allclose(result["pooled_per_class"], [4 / 7, 2 / 3, math.nan])
    assert result["pooled_dice"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    assert result["mean_dice"] == pytest.approx((0.5 + 2 / 3) / 2) and result["std_dice"] == pytest.approx(1 / 12)


def test_a_volume_of_fewer_slices_than_columns_gets_one_column_per_slice(tmp_path):
    """save_figures draws up to 6 evenly spaced slices: a volume of 3 slices gets 3 columns (each 2 inches at
    80 dpi: a PNG 480 pixels wide), not 6 with each slice twice."""
    import struct
    maps = [[[1, 0], [0, 2]], [[0, 1], [2, 0]], [[2, 2], [1, 1]]]
    cache = HandMadeCache(maps, maps, [("three", "p1", True)])
    cache.volumes[0].slices = 3
    evaluate.save_figures(ShowsItsImage(), cache, ["p1"], torch.device("cpu"), tmp_path)
    png = (tmp_path / "three.png").read_bytes()
    assert png[12:16] == b"IHDR" and struct.unpack(">I", png[16:20])[0] == 3 * 2 * 80


def test_the_result_names_the_fold_it_scored(fold1, tiny, tmp_path):
    """evaluate.py --fold 0 on a model of fold 1 reports fold 0 and its test patients (best.pt rewritten here
    as if no patient had trained or validated it, so that fold 0 may be scored whatever the split; its split
    still holds every labeled patient, or evaluate.py would take the dataset for changed)."""
    state = load_checkpoint(fold1)
    split = dict(state["split"], val=[], train=state["split"]["train"] + state["split"]["val"])
    unused = {k: v for k, v in state.items() if k != "digest"} | {"train_patients": [], "split": split}
    checkpoints.save_checkpoint(tmp_path / "unused.pt", unused)
    test = data.split_patients(open_dataset(tiny.data, 32).patients(labeled=True), 4, 0, 0, 1)["test"]
    result = evaluate.main(["--checkpoint", str(tmp_path / "unused.pt"), "--fold", "0"])
    assert (result["fold"], result["patients"]) == (0, sorted(test))


def test_the_json_names_the_model_and_the_data_it_scored(fold1, pretrained, tiny, tmp_path):
    """evaluate.py --json alone (no --figures) on a copy of the data: the file records the checkpoint, its
    pretraining, method and M, the fold and the test patients scored, and the folder read (the copy). The
    model of fold 1 is rewritten here as trained on M = 1 patient, so that M differs from the 2 test patients."""
    state = load_checkpoint(fold1)
    one = {k: v for k, v in state.items() if k != "digest"} | {"config": dict(state["config"], patients=1),
                                                               "train_patients": state["train_patients"][:1]}
    checkpoints.save_checkpoint(tmp_path / "m1.pt", one)
    shutil.copytree(tiny.data, tmp_path / "copy")
    result = evaluate.main(["--checkpoint", str(tmp_path / "m1.pt"), "--data", str(tmp_path / "copy"),
                            "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    test = data.split_patients(open_dataset(tiny.data, 32).patients(labeled=True), 4, 1, 0, 1)["test"]
    assert (saved["checkpoint"], saved["pretrained"], saved["method"], saved["patients_M"]) == \
        (str(tmp_path / "m1.pt"), str(pretrained), "pcl", 1)
    assert (saved["fold"], saved["patients"]) == (1, sorted(test)) and saved["mean_dice"] == result["mean_dice"]
    assert Path(saved["data"]).resolve() == (tmp_path / "copy").resolve()


def test_each_volume_s_figure_shows_its_own_slices_truth_above_prediction(tmp_path, saved_figures):
    """Two volumes of one patient (as ACDC's two frames), 8 slices each: one PNG per volume, named by the volume;
    6 columns at slices 0 1 3 4 6 7 (0, 1.4, 2.8, 4.2, 5.6, 7 rounded), each the image of that slice with the
    truth over it in the first row and the prediction in the second, titled with its position (k + 1) / 8."""
    codes = np.array([[[k // 4 % 4, k % 4], [(k + 1) % 4, 3 - k % 4]] for k in range(16)])  # (16, 2, 2), all distinct
    cache = HandMadeCache(codes, (codes + 1) % 4, [("ed", "p1", True), ("es", "p1", True)])
    for i, v in enumerate(cache.volumes):
        v.start, v.slices = 8 * i, 8
    evaluate.save_figures(ShowsItsImage(), cache, ["p1"], torch.device("cpu"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(saved_figures) == ["ed.png", "es.png"]
    for name, start in (("ed.png", 0), ("es.png", 8)):
        axes = np.array(saved_figures[name].axes).reshape(2, 6)
        for j, k in enumerate([0, 1, 3, 4, 6, 7]):
            for i, (row, labels) in enumerate((("truth", (codes + 1) % 4), ("prediction", codes))):
                image, overlay = axes[i, j].get_images()
                np.testing.assert_array_equal(image.get_array(), codes[start + k].T)
                np.testing.assert_array_equal(overlay.get_array().filled(0), labels[start + k].T)
                assert axes[i, j].get_title() == f"{row}, p={(k + 1) / 8:.2f}"
