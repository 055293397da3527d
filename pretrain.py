"""pretrain.py: self-supervised pretraining of the U-Net encoder on unlabeled slices.

    python pretrain.py --method pcl            # simclr, gcl, pcl, rotation or pirl, synthetic dataset

For every batch of B slices with normalized positions p (B,), the contrastive methods do
    x1, x2 = two random augmentations of the batch              # (B, 1, S, S) each
    z1, z2 = head(encoder(x1)), head(encoder(x2))               # (B, D) projections
    loss   = L_out(cat(z1, z2), positives of the method)        # losses.py
and differ only in their positives: SimCLR, the other view of the same slice; GCL, slices in the
same quarter of any volume; PCL, slices whose positions differ by less than a threshold.
The two other baselines of the paper's tables:
    rotation: x = an augmented view turned by k * 90 degrees; loss = CE(RotationHead(encoder(x)), k)
    pirl:     v_img = f(one view), v_jig = g(its 9 shuffled tiles, each encoded); loss = PIRL's two
              NCE terms against a memory bank, one L2-normalized row per slice, kept in the model
              (a buffer: saved and resumed with the weights) and moved toward f with momentum 0.5.
PIRL in 2D, what differs from the paper's ImageNet setting: tiles of 16 px at S = 64 (PIRL: 64 px
from a 255-px crop; both a quarter of the side; see augment.cut_tiles), all cut from one augmented
view (PIRL augments each tile on its own); permutations drawn from all 9! as PIRL does; 1024
negatives per step (PIRL: 32000), all other slices when the dataset is smaller; an InfoNCE form of
its NCE terms (losses.pirl_loss); learning rate 0.01 (at the others' 0.1 every row of the bank
ends at one point: loss log N). Rotation: one random rotation per slice (RotNet feeds all four),
and augment.UPRIGHT instead of PRETRAIN, whose free rotations and flips would hide the label.

Optimizer and schedule as the paper: SGD (momentum 0.9, weight decay 1e-5), learning rate decayed
by a cosine every step. Augmentation: `--augment upright` by default (no flips, rotations within 15
degrees: slices are oriented alike, and PCL gained from keeping that; README), `--augment paper` for
the paper's flips and free rotations. Checkpoints are written every epoch and `--resume` continues
a run so that it ends with the same weights as an uninterrupted one. Under torchrun, several
processes share each batch (distributed.py).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import distributed
from augment import PRETRAIN, UPRIGHT, augment, epoch_generator, jigsaw, rotate_batch
from losses import (contrastive_loss, nce_logits, pirl_loss, positive_mask, positive_top1, rotation_loss,
                    top1, update_memory)
from model import Encoder, JigsawHead, ProjectionHead, RotationHead
from runs import (CSVLog, RunError, check_finite, cosine_schedule, pick_device, resume, rng_state,
                  save_checkpoint, seed_everything, write_config)

METHODS = ("simclr", "gcl", "pcl", "rotation", "pirl")
AUGMENT = {"paper": PRETRAIN, "upright": UPRIGHT}  # augment.py


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the U-Net encoder without labels.")
    p.add_argument("--method", default="pcl", help=f"one of {', '.join(METHODS)}")
    data.add_data_arguments(p)
    p.add_argument("--image-size", type=int, default=64, help="slices are resampled to S x S")
    p.add_argument("--width", type=int, default=16, help="U-Net width f (paper: 32 or 48)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="B slices per step")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.1; PIRL 0.01)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--tau", type=float, default=None, help="temperature (default: 0.1; PIRL 0.07)")
    p.add_argument("--threshold", type=float, default=0.1, help="PCL: positives if |p_i - p_j| < threshold")
    p.add_argument("--partitions", type=int, default=4, help="GCL: partitions per volume")
    p.add_argument("--augment", default="upright", choices=list(AUGMENT),
                   help="upright: no flips, +-15 degrees; paper: flips and any angle (augment.py; README)")
    p.add_argument("--proj-dim", type=int, default=128, help="output size D of the projection head")
    p.add_argument("--negatives", type=int, default=1024, help="PIRL: bank entries drawn per step")
    p.add_argument("--pirl-lambda", type=float, default=0.5, help="PIRL: weight of the jigsaw NCE term")
    p.add_argument("--bank-momentum", type=float, default=0.5, help="PIRL: momentum of the memory bank")
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
    p.add_argument("--compile", action="store_true", help="torch.compile the model (worth trying on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        raise RunError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    args.data = args.data or "synthetic"
    args.out = args.out or f"runs/pretrain-{args.method}"
    if args.tau is None:
        args.tau = 0.07 if args.method == "pirl" else 0.1
    if args.lr is None:  # at 0.1, PIRL's f and bank collapse to one point (loss log N): measured
        args.lr = 0.01 if args.method == "pirl" else 0.1
    if args.negatives < 1:
        raise RunError(f"--negatives must be at least 1, got {args.negatives}")
    return args


class Pretrainer(nn.Module):
    """The encoder being pretrained and what serves only the pretext task: `head` (a ProjectionHead,
    or a RotationHead for rotation); for PIRL also `jigsaw_head` (g) and the buffer `memory`
    (bank_size, D), initialized with random unit rows from the (seeded) global generator."""

    def __init__(self, width, proj_dim, method="pcl", bank_size=None):
        super().__init__()
        self.encoder = Encoder(in_channels=1, width=width)
        channels = self.encoder.out_channels  # 16f
        if method == "rotation":
            self.head = RotationHead(channels)
        else:
            self.head = ProjectionHead(channels, out_dim=proj_dim)  # PIRL's f
        if method == "pirl":
            if not bank_size:
                raise ValueError("PIRL needs bank_size, the number of slices, for its memory bank")
            self.jigsaw_head = JigsawHead(channels, tile_dim=proj_dim, out_dim=proj_dim)
            self.register_buffer("memory", F.normalize(torch.randn(bank_size, proj_dim), dim=1))  # (N, D)

    def forward(self, x):
        return self.head(self.encoder(x)[-1])  # (B, D), or (B, 4) rotation logits


def build_model(config):
    return Pretrainer(config["width"], config["proj_dim"], config["method"], config.get("bank_size"))


def contrastive_step(model, x, positions, generator, args):
    """SimCLR, GCL, PCL: loss and positive-pair accuracy of one batch x (B, 1, S, S). With several
    processes, each embeds its share of the global batch and the loss sees all of it."""
    views = torch.cat([augment(x, AUGMENT[args.augment], generator),
                       augment(x, AUGMENT[args.augment], generator)])  # (2B, 1, S, S)
    z1, z2 = model(views).chunk(2)  # (B, D) each: row i of z1 and of z2 are the two views of slice i
    z = torch.cat([distributed.gather(z1), distributed.gather(z2)])  # (2B_global, D)
    positions = distributed.gather(positions)  # (B_global,)
    mask = positive_mask(args.method, positions, args.partitions, args.threshold)  # (2B_global, 2B_global)
    return contrastive_loss(z, mask, args.tau), positive_top1(z.detach(), mask)


def rotation_step(model, x, generator):
    """Rotation: loss and the fraction of rotations predicted right."""
    turned, k = rotate_batch(augment(x, UPRIGHT, generator), generator)  # (B, 1, S, S), (B,)
    logits = model(turned)  # (B, 4)
    return rotation_loss(logits, k), top1(logits.detach(), k)


def pirl_step(model, x, indices, generator, args):
    """PIRL: loss, and the fraction of slices whose f(v_I) is closer to their own bank entry than to
    every drawn negative. The bank is updated with f(v_I) after the loss has used it."""
    if indices is None:
        raise ValueError("PIRL needs each slice's index in the dataset (the batch's 'index') for its bank")
    v_img = model(augment(x, AUGMENT[args.augment], generator))  # (B, D): f(v_I)
    tiles, _ = jigsaw(augment(x, AUGMENT[args.augment], generator), generator)  # (B, 9, 1, t, t), shuffled
    bottlenecks = model.encoder(tiles.flatten(0, 1))[-1]  # (9B, 16f, t / 16, t / 16)
    v_jig = model.jigsaw_head(bottlenecks.unflatten(0, tiles.shape[:2]))  # (B, D): g(v_It)
    bank = model.memory
    negatives = torch.randperm(len(bank), generator=generator, device=x.device)[:args.negatives]  # (K,)
    loss = pirl_loss(v_img, v_jig, bank, indices, negatives, args.tau, args.pirl_lambda)
    accuracy = top1(nce_logits(v_img.detach(), bank, indices, negatives), torch.zeros_like(indices))
    update_memory(bank, indices, v_img.detach(), args.bank_momentum)
    return loss, accuracy


def pretext_loss(model, x, positions, generator, args, indices=None):
    """Loss and accuracy of the pretext task of args.method on one batch x (B, 1, S, S); positions (B,)
    and dataset indices (B,) of its slices; every random draw from `generator`. The accuracy (the
    log's pos_acc) is the positive-pair, rotation or PIRL top-1 accuracy of the method."""
    if args.method == "rotation":
        return rotation_step(model, x, generator)
    if args.method == "pirl":
        return pirl_step(model, x, indices, generator, args)
    return contrastive_step(model, x, positions, generator, args)


def amp_context(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def main(argv=None):
    args = get_args(argv)
    rank, args.world_size, device = distributed.setup(args.device)
    config = vars(args)
    out, main_process = Path(args.out), rank == 0
    seed_everything(args.seed)
    device = device or pick_device(args.device)
    if args.batch_size % args.world_size:
        raise RunError(f"--batch-size {args.batch_size} (global) must divide among {args.world_size} processes")
    if args.method == "pirl" and args.world_size > 1:
        raise RunError("PIRL's memory bank lives in one process: run --method pirl without torchrun")

    cache = distributed.rank0_first(  # rank 0 builds the cache, the others then read it
        lambda: data.open_dataset(args.data, args.image_size, args.layout, args.slice_axis, args.cache))
    patients = cache.patients()
    if args.holdout_fold is not None:
        test = data.split_patients(cache.patients(labeled=True), args.folds, args.holdout_fold,
                                   args.split_seed)["test"]
        patients = [p for p in patients if p not in set(test)]
    dataset = data.SliceDataset(cache, patients)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    loader = data.make_loader(dataset, args.batch_size // args.world_size, sampler=sampler, workers=args.workers,
                              pin_memory=device.type == "cuda")  # this process's share of every batch
    if len(loader) == 0:
        raise RunError(f"{len(dataset)} slices cannot fill one batch of {args.batch_size}")

    if args.method == "pirl":
        args.bank_size = len(dataset)  # one memory-bank row per slice (config is vars(args))
    net = build_model(config).to(device, memory_format=torch.channels_last)  # faster convolutions (benchmark.py)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = cosine_schedule(optimizer, args.epochs * len(loader))
    state = resume(out, "pretrain", config, args.resume, net, optimizer, scheduler)
    start = state["epoch"] if state else 0
    model = distributed.wrap(net, device)  # DistributedDataParallel under torchrun, else net itself
    model = torch.compile(model) if args.compile else model
    if main_process:
        write_config(out, config)
        print(f"pretraining {args.method} on {len(dataset)} slices of {len(patients)} patients "
              f"({cache.meta['data']}), {len(loader)} steps per epoch, {args.world_size} process(es), "
              f"device {device}")
        log = CSVLog(out / "log.csv", ["epoch", "loss", "pos_acc", "lr", "seconds"], keep_epochs=start)

    end = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    for epoch in range(start, end):
        model.train()
        sampler.set_epoch(epoch)
        generator = epoch_generator(device, args.seed, epoch, rank)
        tic, losses, accs = time.time(), [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stdout,
                   disable=None if main_process else True)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)  # (B, 1, S, S)
            positions = batch["position"].to(device, non_blocking=True)  # (B,)
            indices = batch["index"].to(device, non_blocking=True)  # (B,): rows of PIRL's memory bank
            with amp_context(device, args.amp):
                loss, acc = pretext_loss(model, x, positions, generator, args, indices)
            check_finite(loss, epoch, out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            accs.append(acc)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", pos_acc=f"{acc:.2f}")
        if not main_process:
            continue
        row = dict(epoch=epoch + 1, loss=sum(losses) / len(losses), pos_acc=sum(accs) / len(accs),
                   lr=scheduler.get_last_lr()[0], seconds=time.time() - tic)
        save_checkpoint(out / "checkpoint.pt", dict(
            kind="pretrain", config=config, epoch=epoch + 1, model=net.state_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state()))
        log.write(row)
        print(f"epoch {row['epoch']:3d}/{args.epochs}  loss {row['loss']:.4f}  pos_acc {row['pos_acc']:.3f}"
              f"  lr {row['lr']:.4f}  {row['seconds']:.1f} s")
    if main_process:
        print(f"checkpoint: {out / 'checkpoint.pt'}")
    distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (RunError, data.DataError) as e:
        sys.exit(f"error: {e}")
