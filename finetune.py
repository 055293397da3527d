"""finetune.py: train the U-Net on M labeled patients, starting from a pretrained encoder.

    python finetune.py --pretrained runs/pretrain-pcl/checkpoint.pt --patients 2 --fold 0
    python finetune.py --pretrained none --patients 2 --fold 0       # "Random": no pretraining

Only the encoder comes from the pretraining run; the decoder starts from random weights. The
patients of the dataset are split into folds (data.split_patients): fold K is the test set, a few
other patients validate, and the first M of the rest train. The best epoch is chosen by the mean
Dice on the validation patients, never on the test fold (the authors' code chose it on the test
fold, which flatters every number). Loss: cross-entropy, plus soft Dice with --dice-weight.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import distributed
from augment import FINETUNE, augment, epoch_generator
from evaluate import evaluate_patients
from model import UNet, load_encoder
from pretrain import amp_context
from runs import (CSVLog, RunError, check_finite, cosine_schedule, load_checkpoint, pick_device, resume,
                  rng_state, save_checkpoint, seed_everything, write_config)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Finetune a U-Net on M labeled patients.")
    p.add_argument("--pretrained", required=True, help="a pretraining run's checkpoint.pt, or none")
    p.add_argument("--patients", type=int, default=2, help="M, the number of labeled patients")
    p.add_argument("--fold", type=int, default=0, help="test fold K")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val", type=int, default=2, help="validation patients, outside the test fold")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split and of M's choice")
    data.add_data_arguments(p)
    p.add_argument("--image-size", type=int, default=None, help="default: the pretrained run's (or 64)")
    p.add_argument("--width", type=int, default=None, help="default: the pretrained run's (or 16)")
    p.add_argument("--epochs", type=int, default=100, help="as the paper")
    p.add_argument("--steps", type=int, default=None,
                   help="train about this many steps instead, whatever M (sets --epochs)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed per step")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--dice-weight", type=float, default=0.0, help="add this x soft Dice loss to CE")
    p.add_argument("--out", default=None, help="run folder (default: runs/finetune-METHOD-M{M}-fold{K})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, default=None, help="end this invocation after that many epochs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    return p.parse_args(argv)


def pretrained_encoder(path, args):
    """Encoder weights and config of a pretraining run; fills image size, width and data from it."""
    if path.lower() == "none":
        args.method, args.image_size, args.width = "random", args.image_size or 64, args.width or 16
        return None
    state = load_checkpoint(path, "pretrain")
    saved = state["config"]
    for key in ("image_size", "width"):
        if getattr(args, key) not in (None, saved[key]):
            raise RunError(f"{path}: pretrained with --{key.replace('_', '-')} {saved[key]}, "
                           f"not {getattr(args, key)}")
        setattr(args, key, saved[key])
    args.method = saved["method"]
    if args.data is None:  # the semi-supervised setting: finetune on the pretraining dataset
        args.data, args.layout, args.slice_axis = saved["data"], saved["layout"], saved["slice_axis"]
    return {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}


def soft_dice_loss(logits, labels):
    """1 - mean over foreground classes of 2 sum(p * t) / (sum(p) + sum(t)), p = softmax, over the batch."""
    probs = logits.float().softmax(dim=1)[:, 1:]  # (B, C - 1, S, S)
    truth = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()  # (B, C - 1, S, S)
    both = (probs * truth).sum(dim=(0, 2, 3))  # (C - 1,)
    return 1 - (2 * both / (probs.sum(dim=(0, 2, 3)) + truth.sum(dim=(0, 2, 3)) + 1e-6)).mean()


def main(argv=None):
    args = get_args(argv)
    encoder_state = pretrained_encoder(args.pretrained, args)
    args.data = args.data or "synthetic"
    args.out = args.out or f"runs/finetune-{args.method}-M{args.patients}-fold{args.fold}"
    rank, args.world_size, device = distributed.setup(args.device)
    seed_everything(args.seed)
    device = device or pick_device(args.device)
    out, main_process = Path(args.out), rank == 0

    cache = distributed.rank0_first(  # rank 0 builds the cache, the others then read it
        lambda: data.open_dataset(args.data, args.image_size, args.layout, args.slice_axis, args.cache))
    labeled = cache.patients(labeled=True)
    if not labeled:
        raise RunError(f"{cache.meta['data']}: no labeled volume, nothing to finetune on")
    split = data.split_patients(labeled, args.folds, args.fold, args.split_seed, args.val)
    if not 1 <= args.patients <= len(split["train"]):
        raise RunError(f"--patients {args.patients}: fold {args.fold} has {len(split['train'])} training "
                       f"patients ({len(labeled)} labeled, {args.folds} folds, {args.val} validation)")
    train_patients = split["train"][:args.patients]
    args.classes = cache.classes
    config = vars(args)
    dataset = data.SliceDataset(cache, train_patients, labeled=True)
    share = max(1, args.batch_size // args.world_size)  # this process's share of every batch
    drop_last = len(dataset) > args.batch_size  # never a last batch of a single slice
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size, rank=rank,
                                                  seed=args.seed)
    loader = data.make_loader(dataset, share, sampler=sampler, drop_last=drop_last, workers=args.workers,
                              pin_memory=device.type == "cuda")
    if args.steps:
        args.epochs = max(1, math.ceil(args.steps / len(loader)))

    net = UNet(in_channels=1, num_classes=len(cache.classes), width=args.width)
    net = net.to(device, memory_format=torch.channels_last)  # faster convolutions (benchmark.py)
    if encoder_state is not None:
        load_encoder(net, encoder_state)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = cosine_schedule(optimizer, args.epochs * len(loader))
    state = resume(out, "finetune", config, args.resume, net, optimizer, scheduler)
    start, best = (state["epoch"], state["best_val_dice"]) if state else (0, -1.0)
    model = distributed.wrap(net, device)  # DistributedDataParallel under torchrun, else net itself
    if main_process:
        write_config(out, config)
        print(f"finetuning ({args.method}) on {len(dataset)} slices of M={args.patients} patients, "
              f"validating on {len(split['val'])}, fold {args.fold} of {args.folds}, device {device}")
        log = CSVLog(out / "log.csv", ["epoch", "loss", "val_dice", "lr", "seconds"], keep_epochs=start)

    end = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    for epoch in range(start, end):
        model.train()
        sampler.set_epoch(epoch)
        generator = epoch_generator(device, args.seed, epoch, rank)
        tic, losses = time.time(), []
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stdout,
                          disable=None if main_process else True):
            x = batch["image"].to(device, non_blocking=True)  # (B, 1, S, S)
            y = batch["label"].to(device, non_blocking=True)  # (B, S, S)
            x, y = augment(x, FINETUNE, generator, labels=y)
            with amp_context(device, args.amp):
                logits = model(x)  # (B, C, S, S)
                loss = F.cross_entropy(logits.float(), y)
                if args.dice_weight:
                    loss = loss + args.dice_weight * soft_dice_loss(logits, y)
            check_finite(loss, epoch, out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        if not main_process:
            continue
        val = evaluate_patients(net, cache, split["val"], device)["mean_dice"]
        state = dict(kind="finetune", config=config, epoch=epoch + 1, model=net.state_dict(),
                     val_dice=val, split=split, train_patients=train_patients)
        if val > best or not (out / "best.pt").exists():
            best = val
            save_checkpoint(out / "best.pt", state)
        save_checkpoint(out / "checkpoint.pt", dict(state, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), rng=rng_state(), best_val_dice=best))
        row = dict(epoch=epoch + 1, loss=sum(losses) / len(losses), val_dice=val,
                   lr=scheduler.get_last_lr()[0], seconds=time.time() - tic)
        log.write(row)
        print(f"epoch {row['epoch']:3d}/{args.epochs}  loss {row['loss']:.4f}  val Dice {val:.3f}"
              f"  (best {best:.3f})  {row['seconds']:.1f} s")
    if main_process:
        print(f"best checkpoint: {out / 'best.pt'} (validation Dice {best:.3f})")
    distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (RunError, data.DataError) as e:
        sys.exit(f"error: {e}")
