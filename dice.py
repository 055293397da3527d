"""dice.py: Dice of a segmentation model on a set of patients, per volume and pooled (the paper's).

Dice of class c between a prediction P and the truth T: 2 |P_c & T_c| / (|P_c| + |T_c|).
Two summaries, both over the foreground classes (background excluded), both at the preprocessed
resolution (slices resampled to S x S):
  - per volume: 3D Dice of each class in each volume; mean and std over volumes;
  - pooled, the paper's: |P_c & T_c|, |P_c| and |T_c| summed over every slice of every volume of the
    patients, then Dice per class, then the mean over classes.
Convention for a class absent from both the prediction and the truth of a volume: its Dice is
undefined (NaN) and left out of the means. A class predicted where the truth has none scores 0
(MONAI's ignore_empty gives NaN there too). finetune.py scores its validation patients with it,
evaluate.py the test fold.
"""
import warnings

import numpy as np
import torch

import data
from runs import RunError, amp_context


def dice_counts(pred, truth, num_classes):
    """Per-class |P & T|, |P| and |T| of integer maps of any (equal) shape: three (num_classes,) arrays."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    assert pred.shape == truth.shape, f"prediction {pred.shape} and truth {truth.shape} differ"
    both = np.bincount(truth[pred == truth], minlength=num_classes)[:num_classes]
    return (both, np.bincount(pred, minlength=num_classes)[:num_classes],
            np.bincount(truth, minlength=num_classes)[:num_classes])


def dice_from_counts(both, pred_sum, truth_sum):
    """2 |P & T| / (|P| + |T|) per class, NaN where a class is absent from both."""
    both, total = np.asarray(both, np.float64), np.asarray(pred_sum, np.float64) + truth_sum
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * both / total, np.nan)


@torch.no_grad()
def predict(model, images, device, amp="auto", batch_size=32):
    """Class map (N, S, S) of a volume's slices images (N, 1, S, S); non-finite logits are an error."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(images[start:start + batch_size]).to(device)  # (b, 1, S, S)
        with amp_context(device, amp):
            logits = model(x)  # (b, C, S, S)
        if not torch.isfinite(logits).all():
            raise RunError("the model's outputs are not finite (NaN or Inf): its weights are broken")
        out.append(logits.argmax(dim=1).cpu())  # (b, S, S)
    return torch.cat(out).numpy().astype(np.uint8)


def evaluate_patients(model, cache, patients, device, amp="auto"):
    """Dice of every labeled volume of these patients, and the fold's pooled Dice.

    Returns a dict: per_volume {id: per-class Dice list}, per_class mean and std over volumes,
    mean_dice (mean over volumes of each volume's mean over classes) with its std, pooled_dice and
    pooled_per_class. Lists follow the foreground classes cache.classes[1:]."""
    C = len(cache.classes)
    data.SliceDataset(cache, patients, labeled=True)  # checks that they exist and each has a labeled volume
    pooled = np.zeros((3, C), np.int64)  # rows: |P & T|, |P|, |T| summed over the fold
    per_volume = {}
    chosen = set(patients)
    for volume in (v for v in cache.volumes if v.patient in chosen and v.labeled):  # unlabeled frames: no truth
        rows = slice(volume.start, volume.start + volume.slices)
        images = cache.array("images")[rows].astype(np.float32)[:, None]  # (N, 1, S, S)
        truth = cache.array("labels")[rows]  # (N, S, S)
        counts = np.stack(dice_counts(predict(model, images, device, amp), truth, C))  # (3, C)
        pooled += counts
        per_volume[volume.id] = dice_from_counts(*counts)[1:]  # (C - 1,) foreground classes
    scores = np.array(list(per_volume.values()))  # (volumes, C - 1)
    pooled_per_class = dice_from_counts(*pooled)[1:]  # (C - 1,)
    with warnings.catch_warnings():  # a class absent from every volume: NaN, as it should be, without numpy's words
        warnings.simplefilter("ignore", RuntimeWarning)
        volume_means = np.nanmean(scores, axis=1)  # (volumes,)
        return {"classes": cache.classes[1:], "patients": sorted(patients),
                "per_volume": {k: v.tolist() for k, v in per_volume.items()},
                "per_class": np.nanmean(scores, axis=0).tolist(),
                "per_class_std": np.nanstd(scores, axis=0).tolist(),
                "mean_dice": float(np.nanmean(volume_means)), "std_dice": float(np.nanstd(volume_means)),
                "pooled_dice": float(np.nanmean(pooled_per_class)),
                "pooled_per_class": pooled_per_class.tolist()}
