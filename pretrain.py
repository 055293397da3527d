"""pretrain.py: self-supervised pretraining of the U-Net encoder on unlabeled slices.

    python pretrain.py --method pcl       # or simclr, gcl (and the baselines rotation, pirl)

For every batch of B slices with normalized positions p = (i + 1) / N, the contrastive methods do

    x1, x2 = two random augmentations of the batch           # (B, 1, S, S) each
    z1, z2 = head(encoder(cat(x1, x2))) split in two         # (B, D) each; --separate-views: one pass per view
    loss   = L_out(cat(z1, z2), positives of the method)

(losses.contrastive_step), and differ only in their positives (losses.positives_of). Rotation and PIRL
live in baselines.py.
SGD with momentum and weight decay, the learning rate decayed by a cosine every step. A checkpoint
is written every epoch; `--resume` continues a run and ends with the same weights as an
uninterrupted one (on the same kind of device and number of processes, which draw the
augmentations). Under torchrun, several processes share every batch (distributed.py).
"""
import time

import torch
from tqdm import tqdm

import baselines
import data
import distributed
from augment import AUGMENTATIONS, epoch_generator
from checkpoints import Run, check_finite
from losses import contrastive_step, positives_of
from model import build_pretrainer
from runs import AMP_MODES, COMPILE_MODES, Parser, RunError, amp_context, check_writable, cli, cosine_schedule
from runs import default_sizes, fraction, grad_scaler, image_size, non_negative, pick_device, positive, seed_everything

METHODS = ("simclr", "gcl", "pcl") + baselines.METHODS


def get_args(argv=None):
    p = Parser(description="Pretrain the U-Net encoder without labels.")
    p.add_argument("--method", default="pcl", choices=METHODS)
    data.add_data_arguments(p)
    p.add_argument("--image-size", type=image_size, default=None,
                   help="side S of the square slices (default: 64 on a CPU, 256 on CUDA)")
    p.add_argument("--width", type=positive(int), default=None, help="U-Net width f (default: 16 on a CPU, 32 on CUDA)")
    p.add_argument("--epochs", type=positive(int), default=30)
    p.add_argument("--batch-size", type=positive(int), default=32, help="B slices per step (all processes), >= 2")
    p.add_argument("--lr", type=positive(float), default=None, help="SGD learning rate (default 0.1; PIRL 0.01)")
    p.add_argument("--momentum", type=fraction, default=0.9)
    p.add_argument("--weight-decay", type=non_negative(float), default=1e-5)
    p.add_argument("--tau", type=positive(float), default=None, help="temperature (default 0.1; PIRL 0.07)")
    p.add_argument("--threshold", type=positive(float), default=0.1,
                   help="PCL: positive if |p_i - p_j| < threshold, below 1 (paper: 0.1 CHD, 0.35 ACDC)")
    p.add_argument("--partitions", type=positive(int), default=4, help="GCL: partitions per volume, at least 2")
    p.add_argument("--partition-rule", default="balanced", choices=("balanced", "authors"),
                   help="GCL's partition of slice i (from 0) of N: ceil(p * partitions) - 1 (balanced) "
                        "or i // round_half_up(N / partitions) (authors), at most partitions - 1")
    p.add_argument("--augment", default="upright", choices=list(AUGMENTATIONS), help="augment.py")
    p.add_argument("--separate-views", action="store_true",
                   help="one forward per view, BatchNorm statistics per view (the authors'); default one of 2B")
    p.add_argument("--proj-dim", type=positive(int), default=128, help="output size D of the projection head")
    p.add_argument("--bottleneck", default="batchnorm", choices=("batchnorm", "plain"), help="model.py")
    p.add_argument("--init", default="default", choices=("default", "he"), help="model.init_weights")
    p.add_argument("--negatives", type=positive(int), default=1024, help="PIRL: bank rows drawn per step")
    p.add_argument("--pirl-lambda", type=fraction, default=0.5, help="PIRL: weight of the jigsaw term")
    p.add_argument("--bank-momentum", type=fraction, default=0.5, help="PIRL: momentum of the memory bank, below 1")
    p.add_argument("--holdout-fold", type=non_negative(int), default=None,
                   help="leave out the test patients of this fold (of --folds, --split-seed)")
    p.add_argument("--folds", type=positive(int), default=5)
    p.add_argument("--split-seed", type=non_negative(int), default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/pretrain-METHOD)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=positive(int), default=None, help="end this invocation after N epochs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=AMP_MODES,
                   help="autocast precision (auto: bf16 on CUDA, fp16 where a GPU lacks bf16, off on a CPU)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the model (alone: mode default; reduce-overhead adds CUDA graphs)")
    p.add_argument("--seed", type=non_negative(int), default=0)
    p.add_argument("--workers", type=non_negative(int), default=None, help="loader processes (default: 0 CPU, 4 CUDA)")
    args = p.parse_args(argv)
    if args.holdout_fold is not None and args.holdout_fold >= args.folds:
        p.error(f"--holdout-fold {args.holdout_fold} must be below --folds {args.folds}")
    everything = "would make every slice a positive of every other, and the encoder would learn a constant"
    if args.method == "pcl" and args.threshold >= 1:  # positions lie in (0, 1]: any two differ by less than 1
        p.error(f"--threshold {args.threshold} must be below 1: positions lie in (0, 1], so it {everything}")
    if args.method == "gcl" and args.partitions < 2:  # the other methods never read these two
        p.error(f"--partitions 1 {everything}: give at least 2")
    if args.batch_size < 2:
        p.error("--batch-size 1: a contrastive batch needs other slices, and BatchNorm more than one value")
    if args.method == "simclr" and args.augment == "none":
        p.error("--augment none: SimCLR's only positive is the other view of a slice, which would be the same image")
    if args.method == "rotation" and AUGMENTATIONS[args.augment].rotate >= 45:
        p.error(f"--augment {args.augment} turns slices by up to {AUGMENTATIONS[args.augment].rotate:g} degrees: "
                f"Rotation could not tell its turns of 90 degrees apart (use upright, gentle or none)")
    if args.bank_momentum == 1:
        p.error("--bank-momentum 1 would never update PIRL's memory bank: give a value below 1")
    args.data, args.out = args.data or "synthetic", args.out or f"runs/pretrain-{args.method}"
    check_writable(args.out, "--out")
    args.tau = args.tau or (0.07 if args.method == "pirl" else 0.1)
    args.lr = args.lr or (0.01 if args.method == "pirl" else 0.1)  # at 0.1 PIRL's bank collapses (measured)
    return args


def main(argv=None):
    args = get_args(argv)
    rank, world, device = distributed.setup(args.device)
    device = device or pick_device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # fixed shapes: cuDNN times its convolution algorithms once
    image_size, width = default_sizes(device)  # 64 px and width 16 on a CPU, 256 and 32 on CUDA
    args.image_size, args.width = args.image_size or image_size, args.width or width
    args.workers = 4 if args.workers is None and cuda else args.workers or 0
    if args.batch_size % world:
        raise RunError(f"--batch-size {args.batch_size} (global) must divide among {world} processes")
    if args.method == "pirl" and world > 1:
        raise RunError("PIRL's memory bank lives in one process: run --method pirl without torchrun")
    seed_everything(args.seed)

    cache = distributed.rank0_first(lambda: data.open_dataset(**data.settings(vars(args))))  # rank 0 builds, the others read
    patients = cache.patients()
    if args.holdout_fold is not None:  # pretrain without the test patients of that fold
        test = data.split_patients(cache.patients(labeled=True), args.folds, args.holdout_fold, args.split_seed)["test"]
        patients = [p for p in patients if p not in set(test)]
    dataset = data.SliceDataset(cache, patients, cine=args.cine)
    loader, sampler = data.make_loader(dataset, args.batch_size // world, rank, world, args.seed, drop_last=True,
                                       workers=args.workers, pin_memory=cuda)
    if len(loader) == 0:
        raise RunError(f"{len(dataset)} slices cannot fill one batch of {args.batch_size}")
    single = int((dataset.slices == 1).sum()) if args.method in ("pcl", "gcl") else 0  # volumes of one slice
    if single == len(dataset):  # 2D images saved as (X, Y, 1), say
        raise RunError(f"{cache.meta['data']}: every volume is a single slice, so every position is 1 and every pair "
                       f"a positive; {args.method} needs 3D volumes (simclr, rotation and pirl use no positions)")
    if single and rank == 0:
        print(f"note: {single} volumes are a single slice, at position 1: {args.method} pairs them with every volume's "
              f"last slices")
    config = dict(vars(args), world_size=world, bank_size=len(dataset))  # taken once, saved with every checkpoint

    net = baselines.build(config) if args.method in baselines.METHODS else build_pretrainer(config)
    net = net.to(device, memory_format=torch.channels_last)  # faster convolutions (benchmark.py)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = cosine_schedule(optimizer, args.epochs * len(loader))
    scaler = grad_scaler(device, args.amp)  # loss scaling under fp16, else nothing
    run = Run(args.out, "pretrain", config, ["epoch", "loss", "pos_acc", "lr", "seconds"], main_process=rank == 0)
    run.start(args.resume, net, optimizer, scheduler, scaler)  # restores a checkpoint under --resume
    start = run.epoch
    model = distributed.wrap(net, device)  # DistributedDataParallel under torchrun, else net itself
    model = torch.compile(model, mode=args.compile) if args.compile else model
    positives = None if args.method in baselines.METHODS else \
        positives_of(args.method, args.threshold, args.partitions, args.partition_rule)  # the methods differ only here
    if rank == 0:
        print(f"pretraining {args.method} on {len(dataset)} slices of {len(patients)} patients ({args.data}), "
              f"{args.image_size} x {args.image_size} px, width {args.width}, batch {args.batch_size}, "
              f"{len(loader)} steps per epoch, {world} process(es), device {device}")

    end = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    with run.interruptible():
        for epoch in range(start, end):
            model.train()
            sampler.set_epoch(epoch)
            generator = epoch_generator(device, args.seed, epoch, rank)
            tic, total = time.time(), torch.zeros(2, device=device)  # sums of loss and pos_acc, kept on the device
            for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=None if rank == 0 else True):
                x = batch["image"].to(device, non_blocking=True).float()  # (B, 1, S, S), float16 in the copy
                with amp_context(device, args.amp):
                    if args.method == "rotation":
                        loss, acc = baselines.rotation_step(model, x, generator, AUGMENTATIONS[args.augment])
                    elif args.method == "pirl":
                        indices = batch["index"].to(device, non_blocking=True)  # (B,): rows of the memory bank
                        loss, acc = baselines.pirl_step(model, x, indices, generator, AUGMENTATIONS[args.augment],
                                                        args.tau, args.pirl_lambda, args.negatives, args.bank_momentum)
                    else:
                        positions = batch["position"].to(device, non_blocking=True)  # (B,)
                        slices = batch["slices"].to(device, non_blocking=True)  # (B,): N of each slice's volume
                        loss, acc = contrastive_step(model, x, positions, slices, generator, positives,
                                                     AUGMENTATIONS[args.augment], args.tau, args.separate_views)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += torch.stack([loss.detach(), acc])
            loss, acc = (distributed.average(total) / len(loader)).tolist()  # all processes'; the epoch's one wait
            # pos_acc: the contrastive methods' positive_top1; Rotation's accuracy of k; PIRL's f(v_I) nearest its row
            check_finite(loss, epoch, args.out)
            if rank == 0:  # the row first: a run killed before its checkpoint is written redoes the epoch and the row
                run.log(epoch=epoch + 1, loss=loss, pos_acc=acc, lr=scheduler.get_last_lr()[0], seconds=time.time() - tic)
                run.save(epoch + 1, net, optimizer, scheduler, scaler)
    if rank == 0:
        print(f"checkpoint: {run.checkpoint}")
    distributed.cleanup()


if __name__ == "__main__":
    cli(main)
