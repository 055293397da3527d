"""The real-data presets resolve to the authors' settings (github.com/dewenzeng/positional_cl), one
assertion per row of the README's recipe table; where a preset differs, the table says so."""
import pytest

import finetune
import presets
import pretrain
import reproduce
from augment import AUGMENTATIONS

REAL = ("chd", "acdc", "mmwhs", "hvsmr")


def resolved(name, tmp_path):
    """The configs pretrain.py and finetune.py would run with for this preset (semi-supervised: one dataset)."""
    tested = "D" if presets.PRESETS[name]["setting"] == "semi" else "F"
    _, preset = reproduce.get_args(["--preset", name, "--pretrain-data", "D", "--finetune-data", tested])
    pre = pretrain.get_args(["--out", str(tmp_path), "--data", "D", *presets.flags(preset["pretrain"])])
    fine = finetune.get_args(["--pretrained", "none", "--data", tested, *presets.flags(preset["finetune"])])
    finetune.reading(fine, vars(pre))  # how finetune.py reads the data after this pretraining
    return vars(pre), vars(fine)


@pytest.fixture(params=REAL)
def preset(request, tmp_path):
    return request.param, *resolved(request.param, tmp_path)


def test_row_1_acdc_pretrains_on_every_cine_frame(preset):
    name, pre, _ = preset
    assert pre["cine"] == (name in ("acdc", "hvsmr"))  # HVSMR finetunes the ACDC encoder


def test_row_2_the_bottleneck_is_conv_relu_conv_relu_without_batchnorm(preset):
    assert preset[1]["bottleneck"] == "plain"


def test_row_3_the_tau_over_0_07_factor_is_in_the_lr_and_weight_decay(preset):
    _, pre, _ = preset
    assert pre["lr"] == pytest.approx(0.1 * 0.1 / 0.07) and pre["weight_decay"] == pytest.approx(1e-5 * 0.07 / 0.1)
    assert (pre["momentum"], pre["tau"], pre["batch_size"], pre["epochs"]) == (0.9, 0.1, 32, 300)


def test_row_4_finetuning_augmentation_per_dataset(preset):
    name, _, fine = preset
    assert fine["augment"] == {"chd": "none", "mmwhs": "none", "acdc": "paper", "hvsmr": "paper"}[name]


def test_row_5_the_paper_augmentation_is_batchgenerators(preset):
    assert preset[1]["augment"] == "paper"
    paper = AUGMENTATIONS["paper"]
    assert (paper.flip, paper.spatial, paper.elastic, paper.rotate, paper.scale) == (0.5, 0.67, 1.0, 180.0, (0.7, 1.3))
    assert (paper.alpha, paper.sigma, paper.translate, paper.intensity, paper.noise) == ((100, 350), (14, 17), 0, 0, 0)


def test_row_6_in_plane_spacing_and_patch(preset):
    name, pre, fine = preset
    expected = {"chd": (None, 512), "acdc": (1.25, 352), "mmwhs": (1.0, 256), "hvsmr": (0.7, 352)}[name]
    if name in ("chd", "acdc"):
        assert (pre["spacing"], pre["image_size"]) == expected
    assert (fine["spacing"], fine["image_size"] or pre["image_size"]) == expected


def test_row_7_each_view_has_its_own_forward(preset):
    assert preset[1]["separate_views"] is True


def test_row_8_projection_to_512(preset):
    assert preset[1]["proj_dim"] == 512


def test_row_9_he_normal_init(preset):
    assert preset[1]["init"] == "he"


def test_row_10_finetuning_cosine_floor(preset):
    name, _, fine = preset
    assert fine["min_lr"] == {"chd": 1e-6, "acdc": 5e-6, "mmwhs": 5e-6, "hvsmr": 5e-6}[name]
    assert (fine["lr"], fine["weight_decay"], fine["batch_size"], fine["epochs"]) == (5e-5, 1e-5, 10, 100)


def test_row_11_intensity_normalization(preset):
    name, pre, fine = preset
    expected = "zscore" if name == "acdc" else "clip-zscore"  # HVSMR's generator clips (generate_hvsmr.py)
    assert fine["intensity"] == expected
    assert pre["intensity"] == ("zscore" if name in ("acdc", "hvsmr") else "clip-zscore")  # the pretraining's data


def test_row_12_gcl_partitions_by_the_authors_rule(preset):
    assert preset[1]["partition_rule"] == "authors"


def test_row_13_finetuning_trains_the_last_partial_batch(preset):
    assert preset[2]["keep_last"] is True


def test_thresholds_and_widths_of_the_paper(preset):
    name, pre, _ = preset
    assert (pre["threshold"], pre["width"]) == {"chd": (0.1, 32), "mmwhs": (0.1, 32), "acdc": (0.35, 48),
                                                "hvsmr": (0.35, 48)}[name]


def test_rotation_and_pirl_keep_their_own_learning_rate_and_temperature(tmp_path):
    """The authors' code has no Rotation or PIRL: the grid gives them pretrain.py's own lr, wd and tau (not
    the contrastive loss's tau / 0.07 factor), and Rotation upright views (paper's turns hide its labels)."""
    args, preset = reproduce.get_args(["--preset", "chd", "--pretrain-data", "P", "--finetune-data", "F",
                                       "--runs", str(tmp_path)])
    run = {m: vars(pretrain.get_args(presets.pretrain_command(m, 0, preset, args)[1])) for m in ("pcl", "rotation", "pirl")}
    assert (run["pcl"]["lr"], run["pcl"]["tau"], run["pcl"]["augment"]) == (pytest.approx(0.1 / 0.7), 0.1, "paper")
    assert (run["pirl"]["lr"], run["pirl"]["weight_decay"], run["pirl"]["tau"], run["pirl"]["augment"]) == (
        0.01, 1e-5, 0.07, "paper")
    assert (run["rotation"]["lr"], run["rotation"]["weight_decay"], run["rotation"]["augment"]) == (0.1, 1e-5, "upright")
    assert all(r["proj_dim"] == 512 and r["init"] == "he" for r in run.values())  # the rest of the recipe stays


def test_the_user_s_pretraining_flags_reach_every_method_and_random_reads_the_data_alike(tmp_path):
    """--pretrain-set wins over Rotation's and PIRL's own settings too; in a grid that pretrains on the data
    it tests, Random reads that data as the pretrainings did (the other methods inherit it from theirs)."""
    args, preset = reproduce.get_args(["--preset", "chd", "--pretrain-data", "D", "--runs", str(tmp_path),
                                       "--pretrain-set", "lr=0.05", "intensity=zscore", "slice_axis=0",
                                       "--finetune-set", "steps=100"])
    for method in ("rotation", "pirl", "pcl"):
        assert pretrain.get_args(presets.pretrain_command(method, 0, preset, args)[1]).lr == 0.05
    for method in ("random", "pcl"):
        command = presets.finetune_command(method, 2, 0, preset, args)[1]
        fine = finetune.get_args(command)
        pretraining = None if method == "random" else vars(pretrain.get_args(presets.pretrain_command(
            method, 0, preset, args)[1]))
        finetune.reading(fine, pretraining)
        assert (fine.intensity, fine.slice_axis, fine.steps, fine.epochs) == ("zscore", 0, 100, None), method
