"""pretrain.py: self-supervised pretraining of the U-Net encoder on unlabeled slices.

    python pretrain.py --method pcl            # SimCLR, GCL or PCL on the synthetic dataset

For every batch of B slices with normalized positions p (B,):
    x1, x2 = two random augmentations of the batch              # (B, 1, S, S) each
    z1, z2 = head(encoder(x1)), head(encoder(x2))               # (B, D) projections
    loss   = L_out(cat(z1, z2), positives of the method)        # losses.py
The three methods differ only in their positives: SimCLR, the other view of the same slice; GCL,
slices in the same quarter of any volume; PCL, slices whose positions differ by less than a threshold.

Optimizer and schedule as the paper: SGD (momentum 0.9, weight decay 1e-5), learning rate decayed
by a cosine every step. Checkpoints are written every epoch and `--resume` continues a run so that
it ends with the same weights as an uninterrupted one.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import data
from augment import PRETRAIN, augment, epoch_generator
from losses import contrastive_loss, positive_mask, positive_top1
from model import Encoder, ProjectionHead
from runs import (CSVLog, RunError, check_resumable, load_checkpoint, pick_device, rng_state,
                  save_checkpoint, seed_everything, set_rng_state, write_config)

METHODS = ("simclr", "gcl", "pcl")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the U-Net encoder without labels.")
    p.add_argument("--method", default="pcl", help=f"one of {', '.join(METHODS)}")
    data.add_data_arguments(p)
    p.add_argument("--image-size", type=int, default=64, help="slices are resampled to S x S")
    p.add_argument("--width", type=int, default=16, help="U-Net width f (paper: 32 or 48)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="B slices, 2B views per step")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--tau", type=float, default=0.1, help="temperature of the contrastive loss")
    p.add_argument("--threshold", type=float, default=0.1, help="PCL: positives if |p_i - p_j| < threshold")
    p.add_argument("--partitions", type=int, default=4, help="GCL: partitions per volume")
    p.add_argument("--proj-dim", type=int, default=128, help="output size D of the projection head")
    p.add_argument("--holdout-fold", type=int, default=None,
                   help="leave out the test patients of this fold (see --folds, --split-seed)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/pretrain-METHOD)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this invocation after that many epochs (resume later with --resume)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast precision (auto: bf16 on CUDA, off on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        raise RunError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    args.out = args.out or f"runs/pretrain-{args.method}"
    return args


class Pretrainer(nn.Module):
    """The encoder being pretrained and the head that serves only the pretext task."""

    def __init__(self, width, proj_dim):
        super().__init__()
        self.encoder = Encoder(in_channels=1, width=width)
        self.head = ProjectionHead(self.encoder.out_channels, out_dim=proj_dim)

    def forward(self, x):
        return self.head(self.encoder(x)[-1])  # (B, D)


def build_model(config):
    return Pretrainer(config["width"], config["proj_dim"])


def pretext_loss(model, x, positions, generator, args):
    """The contrastive step: loss and positive-pair accuracy of one batch x (B, 1, S, S)."""
    views = torch.cat([augment(x, PRETRAIN, generator), augment(x, PRETRAIN, generator)])  # (2B, 1, S, S)
    z = model(views)  # (2B, D): rows i and i + B are the two views of slice i
    mask = positive_mask(args.method, positions, args.partitions, args.threshold)  # (2B, 2B)
    return contrastive_loss(z, mask, args.tau), positive_top1(z.detach(), mask)


def amp_context(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def main(argv=None):
    args = get_args(argv)
    config = vars(args)
    out = Path(args.out)
    seed_everything(args.seed)
    device = pick_device(args.device)

    cache = data.open_dataset(args.data, args.image_size, args.layout, args.slice_axis, args.cache)
    patients = cache.patients()
    if args.holdout_fold is not None:
        test = data.split_patients(cache.patients(labeled=True), args.folds, args.holdout_fold,
                                   args.split_seed)["test"]
        patients = [p for p in patients if p not in set(test)]
    dataset = data.SliceDataset(cache, patients)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = data.make_loader(dataset, args.batch_size, sampler=sampler, workers=args.workers)
    if len(loader) == 0:
        raise RunError(f"{len(dataset)} slices cannot fill one batch of {args.batch_size}")

    model = build_model(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    total = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # cosine decay per step, to 0 at the last one
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    start = 0
    if args.resume and (out / "checkpoint.pt").exists():
        state = load_checkpoint(out / "checkpoint.pt", "pretrain")
        check_resumable(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["epoch"]
        print(f"resuming {out} after epoch {start}")
    elif (out / "checkpoint.pt").exists():
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    write_config(out, config)
    print(f"pretraining {args.method} on {len(dataset)} slices of {len(patients)} patients "
          f"({cache.meta['data']}), {len(loader)} steps per epoch, device {device}")
    log = CSVLog(out / "log.csv", ["epoch", "loss", "pos_acc", "lr", "seconds"], keep_epochs=start)

    end = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    for epoch in range(start, end):
        model.train()
        sampler.set_epoch(epoch)
        generator = epoch_generator(device, args.seed, epoch)
        tic, losses, accs = time.time(), [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stdout, disable=None)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)  # (B, 1, S, S)
            positions = batch["position"].to(device, non_blocking=True)  # (B,)
            with amp_context(device, args.amp):
                loss, acc = pretext_loss(model, x, positions, generator, args)
            if not torch.isfinite(loss):
                raise RunError(f"the loss became {loss.item()} at epoch {epoch + 1}; the checkpoint "
                               f"of epoch {epoch} in {out} is intact (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            accs.append(acc)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", pos_acc=f"{acc:.2f}")
        row = dict(epoch=epoch + 1, loss=sum(losses) / len(losses), pos_acc=sum(accs) / len(accs),
                   lr=scheduler.get_last_lr()[0], seconds=time.time() - tic)
        save_checkpoint(out / "checkpoint.pt", dict(
            kind="pretrain", config=config, epoch=epoch + 1, model=model.state_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state()))
        log.write(row)
        print(f"epoch {row['epoch']:3d}/{args.epochs}  loss {row['loss']:.4f}  pos_acc {row['pos_acc']:.3f}"
              f"  lr {row['lr']:.4f}  {row['seconds']:.1f} s")
    print(f"checkpoint: {out / 'checkpoint.pt'}")


if __name__ == "__main__":
    try:
        main()
    except (RunError, data.DataError) as e:
        sys.exit(f"error: {e}")
