"""evaluate.py: Dice of a finetuned U-Net on the test patients of its fold.

    python evaluate.py --checkpoint runs/finetune-pcl-M2-fold0/best.pt [--json out.json] [--figures DIR]

Prints the per-volume and the pooled Dice of every foreground class (dice.py states both and the
convention for an absent class), writes them to --json, and draws one figure per test volume.
`--fold K` scores another fold, unless one of its test patients trained or validated the model.
"""
from pathlib import Path

import numpy as np
import torch

import data
from checkpoints import load_checkpoint, save_json
from dice import evaluate_patients, predict
from layouts import find_cases
from model import build_unet
from runs import AMP_MODES, Parser, RunError, check_writable, cli, non_negative, pick_device
from synthetic import LABELS


def unet_of(state):
    """The finetuned U-Net of a checkpoint's state, rebuilt from its config alone."""
    model = build_unet(state["config"], len(state["config"]["classes"]))
    model.load_state_dict(state["model"])
    return model.to(memory_format=torch.channels_last)


def load_unet(checkpoint_path):
    """The finetuned U-Net of a checkpoint file, and its config."""
    state = load_checkpoint(checkpoint_path, "finetune")
    return unet_of(state), state["config"]


def print_table(result):
    width = max(len(c) for c in result["classes"]) + 2
    print(f"{'class':<{width}} {'Dice mean (std) over volumes':>28} {'pooled Dice':>12}")
    rows = zip(result["classes"], result["per_class"], result["per_class_std"], result["pooled_per_class"])
    for name, mean, std, pooled in rows:
        print(f"{name:<{width}} {mean:>20.3f} ({std:.3f}) {pooled:>12.3f}")
    print(f"{'mean':<{width}} {result['mean_dice']:>20.3f} ({result['std_dice']:.3f}) "
          f"{result['pooled_dice']:>12.3f}")
    print("(mean: over volumes of each volume's mean over classes; pooled: over classes; std: over the test volumes. "
          "A class absent from both prediction and truth of a volume is left out: NaN, not 0 or 1)")


def save_figures(model, cache, patients, device, folder, amp="auto", columns=6):
    """One PNG per labeled test volume (those Dice scores): image, truth and prediction at evenly spaced
    positions, anterior up and the patient's right on the viewer's right, as in the notebooks
    (docs/synthetic.png is radiological, the mirror image)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colors, chosen = plt.get_cmap("tab10"), set(patients)
    for volume in (v for v in cache.volumes if v.patient in chosen and v.labeled):  # no truth: no figure
        rows = slice(volume.start, volume.start + volume.slices)
        images = cache.array("images")[rows].astype(np.float32)  # (N, S, S)
        truth, pred = cache.array("labels")[rows], predict(model, images[:, None], device, amp)  # (N, S, S) each
        picks = np.linspace(0, volume.slices - 1, min(columns, volume.slices)).round().astype(int)
        fig, axes = plt.subplots(2, len(picks), figsize=(2 * len(picks), 4.2), squeeze=False)
        for j, k in enumerate(picks):
            for i, (name, labels) in enumerate((("truth", truth), ("prediction", pred))):
                ax = axes[i, j]
                ax.imshow(images[k].T, cmap="gray", origin="lower")
                overlay = np.ma.masked_equal(labels[k].T, 0)
                ax.imshow(overlay, cmap=colors, vmin=0, vmax=9, alpha=0.5, origin="lower",
                          interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"{name}, p={(k + 1) / volume.slices:.2f}", fontsize=8)
        fig.suptitle(volume.id, fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"{volume.id}.png", dpi=80)
        plt.close(fig)


def main(argv=None):
    p = Parser(description="Dice of a finetuned U-Net on its fold's test patients.")
    p.add_argument("--checkpoint", required=True, help="a finetune run's best.pt (or checkpoint.pt)")
    p.add_argument("--data", type=data.dataset_name, default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--fold", type=non_negative(int), default=None, help="test fold (default: the checkpoint's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=AMP_MODES, help="default: the checkpoint's --amp (auto: bf16 on CUDA, fp16 where a GPU lacks bf16, off on a CPU)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--figures", default=None, help="save overlay PNGs of each test volume here")
    args = p.parse_args(argv)
    if args.json and Path(args.json).resolve() == Path(args.checkpoint).resolve():
        raise RunError(f"--json {args.json} is the checkpoint itself: it would be replaced by the results")
    for flag, path, folder, suffix in (("--json", args.json, False, ".json"), ("--figures", args.figures, True, None)):
        if path:
            check_writable(path, flag, folder, suffix)  # before anything is computed
    state = load_checkpoint(args.checkpoint, "finetune")
    model, config = unet_of(state), state["config"]
    device = pick_device(args.device)
    model.to(device)
    args.amp = args.amp or config.get("amp", "auto")
    name = args.data or config["data"]  # its classes, before its volumes are read (or a synthetic set generated)
    classes = (list(LABELS[data.SYNTHETIC[name][0]]) if name in data.SYNTHETIC else
               find_cases(name, config.get("layout") or "auto")[2])
    if classes != config["classes"]:
        raise RunError(f"{name} has classes {classes}, the model was trained on {config['classes']}")
    cache = data.open_dataset(**data.settings(dict(config, data=name)))
    fold = config["fold"] if args.fold is None else args.fold
    if not 0 <= fold < config["folds"]:
        raise RunError(f"--fold {fold}: the checkpoint was trained with {config['folds']} folds")
    labeled = cache.patients(labeled=True)
    if not labeled:  # a folder without its labelsTr, say
        raise RunError(f"{cache.meta['data']}: no labeled volume, nothing to score")
    then = sorted(p for part in state["split"].values() for p in part)  # every labeled patient of finetuning
    if (args.data is None or data.same_data(args.data, config["data"])) and labeled != then:
        gone, new = sorted(set(then) - set(labeled)), sorted(set(labeled) - set(then))
        raise RunError(f"{cache.meta['data']}: its labeled patients changed since this model was finetuned ("
                       + "; ".join(f"{what} {len(ids)}: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}"
                                   for what, ids in (("no longer labeled", gone), ("new", new)) if ids)
                       + "), so its folds are not those it was trained and tested on")
    test = data.split_patients(labeled, config["folds"], fold, config["split_seed"], config["val"])["test"]
    used = (set(state["train_patients"]) | set(state["split"]["val"])) & set(test)  # the patients it learned from
    if used and (args.data is None or data.same_data(args.data, config["data"])):  # only on another fold than its own
        raise RunError(f"--fold {fold}: {len(used)} of its {len(test)} test patients trained or validated this "
                       f"model (finetuned on fold {config['fold']}); their Dice would not be a test score")
    if used:  # another folder: a copy of the dataset, or its other layout (ACDC's own and nnU-Net's), would leak
        print(f"note: {len(used)} of the {len(test)} test patients ({', '.join(sorted(used)[:3])}) have the names of "
              f"patients that trained or validated this model in {config['data']}; if they are the same, these "
              f"Dice are not test scores")
    result = evaluate_patients(model, cache, test, device, args.amp)
    result.update(checkpoint=str(args.checkpoint), data=cache.meta["data"], fold=fold,
                  pretrained=config["pretrained"], method=config["method"], patients_M=config["patients"])
    print(f"{args.checkpoint}: fold {fold}, {len(test)} test patients, {len(result['per_volume'])} volumes")
    print_table(result)
    if args.json:
        save_json(args.json, result)
    if args.figures:
        save_figures(model, cache, test, device, args.figures, args.amp)
        print(f"figures: {args.figures}")
    return result


if __name__ == "__main__":
    cli(main)
