"""finetune.py: train the U-Net on M labeled patients, starting from a pretrained encoder.

    python finetune.py --pretrained runs/pretrain-pcl/checkpoint.pt --patients 2 --fold 0
    python finetune.py --pretrained none --patients 2 --fold 0       # "Random": no pretraining

Only the encoder comes from the pretraining run; the decoder starts from random weights. The
patients are split into folds (data.split_patients): fold K is the test set, a few other patients
validate, and the first M of the rest train. Every epoch ends with the mean Dice of the validation
patients, and best.pt keeps the best epoch: model selection never looks at the test fold (the
authors chose it on the test fold). Loss: cross-entropy (plus soft Dice with --dice-weight); Adam,
the learning rate decayed by a cosine every step down to --min-lr.
"""
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import distributed
from augment import AUGMENTATIONS, augment, epoch_generator
from checkpoints import Run, check_finite, load_checkpoint, save_checkpoint
from dice import evaluate_patients
from layouts import find_cases
from model import build_unet, encoder_weights, load_encoder
from runs import AMP_MODES, Parser, RunError, amp_context, check_writable, cli, cosine_schedule, default_sizes
from runs import absolute, grad_scaler, image_size, non_negative, pick_device, positive, seed_everything

INHERITED = ("width", "bottleneck")  # from the pretraining run: they shape the encoder


def get_args(argv=None):
    p = Parser(description="Finetune a U-Net on M labeled patients.",
               epilog="On the pretraining's own dataset (no --data, or the same one), --layout, --slice-axis, --spacing "
                      "and --intensity default to the pretraining's, and another value is refused.")
    p.add_argument("--pretrained", required=True, type=lambda t: "none" if t.lower() == "none" else absolute(t),
                   help="a pretraining run's checkpoint.pt, or none")
    p.add_argument("--patients", type=positive(int), default=2, help="M, the number of labeled patients")
    p.add_argument("--fold", type=non_negative(int), default=0, help="test fold K")
    p.add_argument("--folds", type=positive(int), default=5)
    p.add_argument("--val", type=positive(int), default=2, help="validation patients, outside the test fold")
    p.add_argument("--split-seed", type=non_negative(int), default=0, help="seed of the fold split and of M's choice")
    data.add_data_arguments(p, cine=False, default="the pretraining's; Random: synthetic")
    p.set_defaults(**dict.fromkeys(data.READING))  # None: not given (the pretraining's on its own dataset, see reading)
    p.add_argument("--image-size", type=image_size, default=None,
                   help="side S of the square slices (default: the pretrained run's; Random: 64 on a CPU, 256 on CUDA)")
    p.add_argument("--width", type=positive(int), default=None,
                   help="U-Net width f (default: the pretrained run's; Random: 16 on a CPU, 32 on CUDA)")
    p.add_argument("--bottleneck", default=None, choices=("batchnorm", "plain"), help="default: the pretrained run's")
    p.add_argument("--init", default=None, choices=("default", "he"), help="of the decoder (and of Random's encoder)")
    p.add_argument("--epochs", type=positive(int), default=None, help="default 100, as the paper")
    p.add_argument("--steps", type=positive(int), default=None, help="train about this many steps instead, whatever M")
    p.add_argument("--batch-size", type=positive(int), default=10, help="slices per step (all processes), >= 2")
    p.add_argument("--keep-last", action="store_true",
                   help="train each epoch's last, partial batch too (the authors'; default: equal batches only)")
    p.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    p.add_argument("--min-lr", type=non_negative(float), default=0.0, help="floor of the cosine decay")
    p.add_argument("--weight-decay", type=non_negative(float), default=1e-5)
    p.add_argument("--augment", default="gentle", choices=list(AUGMENTATIONS), help="augment.py")
    p.add_argument("--dice-weight", type=non_negative(float), default=0.0, help="add this x soft Dice loss to CE")
    p.add_argument("--out", default=None, help="run folder (default: runs/finetune-METHOD-M{M}-fold{K})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=positive(int), default=None, help="end this invocation after N epochs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=AMP_MODES, help="as pretrain.py's")
    p.add_argument("--seed", type=non_negative(int), default=0)
    p.add_argument("--workers", type=non_negative(int), default=None, help="loader processes (default: 0 CPU, 4 CUDA)")
    args = p.parse_args(argv)
    if args.epochs and args.steps:
        p.error(f"--epochs {args.epochs} and --steps {args.steps}: give one of them")
    if args.fold >= args.folds:
        p.error(f"--fold {args.fold} must be below --folds {args.folds}")
    if args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr} must not exceed --lr {args.lr}: the cosine would rise instead of decay")
    if args.batch_size < 2:
        p.error("--batch-size 1: BatchNorm needs more than one slice")
    return args


def pretrained_encoder(args, device):
    """The encoder weights of args.pretrained and its pretraining's config (None, None for "none");
    fills in what the run fixes, and for Random what pretrain.py would have chosen on this device.
    --resume of a run whose pretraining checkpoint is gone takes those settings from the run's own checkpoint
    (its weights replace the encoder's anyway)."""
    if args.resume and args.pretrained != "none" and not Path(args.pretrained).exists():
        if args.out is None:
            raise RunError(f"{args.pretrained}: no such checkpoint; to resume a finetuning without it, give its --out")
        saved = load_checkpoint(Path(args.out) / "checkpoint.pt", "finetune")["config"]
        print(f"note: {args.pretrained} is gone; resuming with the sizes and data reading that {args.out} saved")
        for key in (*INHERITED, "image_size", "init", "method", "data", *data.READING):
            if getattr(args, key, None) is None:  # not given: the run's
                setattr(args, key, saved[key])
        return None, None
    if args.pretrained == "none":  # --pretrained's type spells None, NONE alike
        args.method = "random"
        image_size, width = default_sizes(device)
        for key, value in dict(image_size=image_size, width=width, bottleneck="batchnorm", init="default").items():
            setattr(args, key, getattr(args, key) or value)
        return None, None
    state = load_checkpoint(args.pretrained, "pretrain")
    saved = state["config"]
    if state["epoch"] < saved["epochs"]:  # allowed (an early encoder is a fair question), but not silently
        print(f"note: {args.pretrained} holds epoch {state['epoch']} of {saved['epochs']}: an unfinished pretraining")
    for key in INHERITED:
        if getattr(args, key) not in (None, saved[key]):
            raise RunError(f"{args.pretrained}: pretrained with --{key.replace('_', '-')} {saved[key]}, "
                           f"not {getattr(args, key)}")
        setattr(args, key, saved[key])
    args.method, args.init = saved["method"], args.init or saved["init"]
    if args.image_size not in (None, saved["image_size"]):  # fine (the encoder is convolutional), but not silently
        print(f"note: finetuning at {args.image_size} px; the encoder was pretrained at {saved['image_size']} px")
    args.image_size = args.image_size or saved["image_size"]
    return encoder_weights(state["model"]), saved


def reading(args, pretraining):
    """How the data is read. On the pretraining's own dataset (no --data: the semi-supervised setting)
    the flags not given are the pretraining's, and a flag that differs is refused: the encoder would
    see its patients read another way. On other data, and for Random, data.py's defaults."""
    own = pretraining is not None and (args.data is None or data.same_data(args.data, pretraining["data"]))
    args.data = args.data or (pretraining["data"] if pretraining else "synthetic")
    for key, default in data.READING.items():
        given = getattr(args, key)
        if own and given not in (None, pretraining[key]):
            raise RunError(f"--{key.replace('_', '-')} {given}: the encoder was pretrained on {args.data} read with "
                           f"--{key.replace('_', '-')} {pretraining[key]}; finetuning reads it alike")
        setattr(args, key, pretraining[key] if own else default if given is None else given)


def pretrained_on_test(pretraining, args, labeled, test):
    """The test patients whose unlabeled slices the encoder was pretrained on: every one when it was
    pretrained on this dataset without --holdout-fold (as the authors did), none when it held this fold out."""
    if pretraining is None or not data.same_data(pretraining["data"], args.data):
        return []  # Random, or pretrained on other patients (the transfer setting)
    if pretraining.get("holdout_fold") is None:
        return list(test)
    held_out = data.split_patients(labeled, pretraining["folds"], pretraining["holdout_fold"], pretraining["split_seed"])
    return [p for p in test if p not in held_out["test"]]


def labeled_patients(dataset, layout):
    """The labeled patients of a --data folder (in its --layout) from its file names, without reading a volume;
    a synthetic dataset's, not yet generated, stand in by their number: all are labeled."""
    if dataset in data.SYNTHETIC:
        return list(range(data.SYNTHETIC[dataset][1]))
    return sorted({case.patient for case in find_cases(dataset, layout)[1] if case.label is not None})


def training_patients(labeled, args):
    """The split of the labeled patients for args.fold, and its M = args.patients training patients."""
    if not labeled:  # before the split's own "impossible with 0 patients"
        raise RunError("no labeled volume, nothing to finetune on")
    split = data.split_patients(labeled, args.folds, args.fold, args.split_seed, args.val)
    if args.patients > len(split["train"]):
        raise RunError(f"--patients {args.patients}: fold {args.fold} has only {len(split['train'])} training "
                       f"patients ({len(labeled)} labeled, {args.folds} folds, {args.val} validation)")
    return split, split["train"][:args.patients]


def drops_last(slices, batch_size, world, keep_last):
    """Whether an epoch leaves out its last, partial batch: by default yes (every step the same size), unless
    the slices fill no whole batch; with --keep-last no, as the authors' loader, unless that batch would hold
    one slice per process (BatchNorm's statistics of a single slice). Under several processes each takes
    ceil(slices / world) of them (DistributedSampler repeats up to world - 1 slices to even the shares)."""
    if slices <= batch_size:
        return False
    return not keep_last or math.ceil(slices / world) % (batch_size // world) == 1  # a process's share of the tail


def soft_dice_loss(logits, labels):
    """1 - mean over foreground classes of 2 sum(p * t) / (sum(p) + sum(t)), p = softmax, over the batch."""
    probs = logits.float().softmax(dim=1)[:, 1:]  # (B, C - 1, S, S)
    classes = torch.arange(1, logits.shape[1], device=labels.device)  # (C - 1,): the foreground
    truth = (labels[:, None] == classes[None, :, None, None]).float()  # (B, C - 1, S, S): one-hot
    both = (probs * truth).sum(dim=(0, 2, 3))  # (C - 1,)
    return 1 - (2 * both / (probs.sum(dim=(0, 2, 3)) + truth.sum(dim=(0, 2, 3)) + 1e-6)).mean()


def main(argv=None):
    args = get_args(argv)
    rank, world, device = distributed.setup(args.device)
    if args.batch_size % world:  # before anything is read or built
        raise RunError(f"--batch-size {args.batch_size} (global) must divide among {world} processes")
    device = device or pick_device(args.device)
    encoder_state, pretraining = pretrained_encoder(args, device)
    reading(args, pretraining)
    args.out = args.out or f"runs/finetune-{args.method}-M{args.patients}-fold{args.fold}"
    check_writable(args.out, "--out")
    args.workers = 4 if args.workers is None and device.type == "cuda" else args.workers or 0
    torch.backends.cudnn.benchmark = device.type == "cuda"  # cuDNN times its convolution algorithms once
    seed_everything(args.seed)

    cache = distributed.rank0_first(lambda: data.open_dataset(**data.settings(vars(args))))  # rank 0 builds, the others read
    labeled = cache.patients(labeled=True)
    if not labeled or len(cache.classes) < 2:
        raise RunError(f"{cache.meta['data']}: " + ("no labeled volume" if not labeled else
                       f"no class but {cache.classes[0]} in its dataset.json") + ", nothing to finetune on")
    split, train_patients = training_patients(labeled, args)
    dataset = data.SliceDataset(cache, train_patients, labeled=True)
    loader, sampler = data.make_loader(dataset, args.batch_size // world, rank, world, args.seed,
                                       drop_last=drops_last(len(dataset), args.batch_size, world, args.keep_last),
                                       workers=args.workers, pin_memory=device.type == "cuda")
    epochs = math.ceil(args.steps / len(loader)) if args.steps else args.epochs or 100
    config = dict(vars(args), epochs=epochs, world_size=world, classes=cache.classes)  # taken once

    net = build_unet(config, len(cache.classes)).to(device, memory_format=torch.channels_last)
    if encoder_state is not None:
        load_encoder(net, encoder_state)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = cosine_schedule(optimizer, epochs * len(loader), args.min_lr)
    scaler = grad_scaler(device, args.amp)  # loss scaling under fp16, else nothing
    run = Run(args.out, "finetune", config, ["epoch", "loss", "val_dice", "lr", "seconds"], main_process=rank == 0)
    state = run.start(args.resume, net, optimizer, scheduler, scaler)
    if state and state["split"] != split:
        raise RunError(f"{args.out} was trained on another split of the patients (data.split_patients changed)")
    start, best = (state["epoch"], state["best_val_dice"]) if state else (0, -1.0)
    model = distributed.wrap(net, device)  # DistributedDataParallel under torchrun, else net itself
    if rank == 0:
        print(f"finetuning ({args.method}) on {len(dataset)} slices of M={args.patients} patients, validating on "
              f"{len(split['val'])}, fold {args.fold} of {args.folds}, {args.image_size} x {args.image_size} px, width "
              f"{args.width}, {epochs} epochs of {len(loader)} steps, device {device}")
        seen = pretrained_on_test(pretraining, args, labeled, split["test"])
        if seen:  # allowed (the authors' protocol), but not silently
            print(f"note: the encoder was pretrained on {len(seen)} of this fold's {len(split['test'])} test patients "
                  f"(unlabeled); pretrain.py --holdout-fold {args.fold} --folds {args.folds} --split-seed "
                  f"{args.split_seed} keeps them out")

    end = epochs if args.stop_after is None else min(epochs, start + args.stop_after)
    with run.interruptible():
        for epoch in range(start, end):
            model.train()
            sampler.set_epoch(epoch)
            generator = epoch_generator(device, args.seed, epoch, rank)
            tic, total = time.time(), torch.zeros((), device=device)  # sum of the losses, kept on the device
            for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None if rank == 0 else True):
                x = batch["image"].to(device, non_blocking=True).float()  # (B, 1, S, S), float16 in the copy
                y = batch["label"].to(device, non_blocking=True).long()  # (B, S, S), uint8 in the copy
                x, y = augment(x, AUGMENTATIONS[args.augment], generator, labels=y)
                with amp_context(device, args.amp):
                    logits = model(x)  # (B, C, S, S)
                    loss = F.cross_entropy(logits.float(), y)
                    if args.dice_weight:
                        loss = loss + args.dice_weight * soft_dice_loss(logits, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += loss.detach()
            loss = (distributed.average(total) / len(loader)).item()  # the epoch's one wait for the device
            check_finite(loss, epoch, args.out)
            if rank != 0:
                continue
            val = evaluate_patients(net, cache, split["val"], device, args.amp)["mean_dice"]
            extra = dict(val_dice=val, split=split, train_patients=train_patients)
            if val > best or not (run.out / "best.pt").exists():
                best = val
                save_checkpoint(run.out / "best.pt", dict(kind="finetune", config=config, epoch=epoch + 1,
                                                          model=net.state_dict(), **extra))
            run.log(epoch=epoch + 1, loss=loss, val_dice=val, lr=scheduler.get_last_lr()[0], seconds=time.time() - tic)
            run.save(epoch + 1, net, optimizer, scheduler, scaler, best_val_dice=best, **extra)  # after the row
    if rank == 0:
        print(f"best checkpoint: {run.out / 'best.pt'} (validation Dice {best:.3f})")
    distributed.cleanup()


if __name__ == "__main__":
    cli(main)
