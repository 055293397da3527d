"""The contrastive loss of the paper, the three ways of choosing positives (SimCLR, GCL and PCL), and
contrastive_step, which feeds a batch through both (pretrain.py trains with it).

For a batch of B slices, two augmented views are encoded and projected to z1, z2: (B, D), and
stacked as z = cat(z1, z2): (2B, D), so rows i and i + B are the two views of slice i. The loss is
the supervised-contrastive "L_out" loss of Khosla et al.:

    s_ij   = cos(z_i, z_j) / tau
    l_iq   = s_iq - log( sum over a != i of exp(s_ia) )     # log-probability of q among all others
    loss_i = - mean over q in P(i) of l_iq
    loss   = mean of loss_i over the anchors i whose P(i) is not empty

The methods differ only in the positives P(i) (never i itself), a (2B, 2B) bool mask (GCL is the
global contrastive loss of Chaitanya et al., 2020; PCL, positional contrastive learning, the paper's):
    SimCLR: the other view of the same slice;
    GCL:    every slice in the same partition of its volume (S parts: gcl_partitions), any volume;
    PCL:    every slice whose normalized position differs by less than a threshold, any volume.

The authors' code multiplies this loss by tau / 0.07; here that constant lives in the real-data
presets' learning rate and weight decay instead (README, "Real data: the authors' recipe", row 3),
so this is the equation as is.
"""
import torch
import torch.nn.functional as F

import distributed
from augment import augment


def simclr_mask(positions):
    """SimCLR positives: True only at (i, i + B) and (i + B, i). positions (B,) only give B."""
    B = len(positions)
    same_slice = torch.eye(B, dtype=torch.bool, device=positions.device).repeat(2, 2)  # (2B, 2B)
    return same_slice & ~torch.eye(2 * B, dtype=torch.bool, device=positions.device)


def gcl_partitions(positions, partitions=4, slices=None):
    """Partition of each slice, (B,) long, in 0 .. S-1 (S = partitions).

    With slices=None (balanced, the default): min(ceil(p * S) - 1, S - 1), S equal parts of (0, 1].
    With slices (B,), the slice count N of each one's volume (the authors' rule): the 0-based slice index
    k = p * N - 1 and min(k // round_half_up(N / S), S - 1). Both agree when N is a multiple of S."""
    if slices is None:
        scaled = positions.double() * partitions - 1e-6 * partitions  # (B,); p = k / S exactly stays in part k - 1
        return (torch.ceil(scaled).long() - 1).clamp(0, partitions - 1)
    N = slices.double()  # (B,)
    k = torch.round(positions.double() * N).long() - 1  # (B,): 0-based slice index
    part = torch.floor(N / partitions + 0.5).long().clamp_min(1)  # (B,): round half up
    return torch.div(k, part, rounding_mode="floor").clamp(0, partitions - 1)


def gcl_mask(positions, partitions=4, slices=None):
    """GCL positives: True where both embeddings share a partition (j != i)."""
    part = gcl_partitions(positions, partitions, slices).repeat(2)  # (2B,)
    same = part[:, None] == part[None, :]  # (2B, 2B)
    return same & ~torch.eye(len(part), dtype=torch.bool, device=positions.device)


def pcl_mask(positions, threshold=0.1):
    """PCL positives: True where abs(p_j - p_i) < threshold (j != i).

    Two slices of one volume differ by a multiple of 1 / N, so a difference equal to the threshold is
    common (N = 10, threshold 0.1: neighbours). Such a tie is never a positive: the difference must be
    below the threshold by a margin above the rounding of the positions' type and below the smallest
    gap between a difference of two fractions a / N - b / M and the threshold (at 0.1: 1 / (10 N M)).
    In float64 (data.py's) that holds for volumes of any real size; in float32 for volumes of up to 500 slices
    at the threshold 0.1 (436 at 0.35)."""
    assert threshold > 0, f"threshold must be > 0, got {threshold}"
    margin = 1e-12 if positions.dtype == torch.float64 else 2.5e-7  # float32 rounds (i + 1) / N by up to 6e-8
    p = positions.double().repeat(2)  # (2B,)
    close = (p[:, None] - p[None, :]).abs() < threshold - margin  # (2B, 2B)
    return close & ~torch.eye(len(p), dtype=torch.bool, device=positions.device)


def _similarities(z, tau):
    """s_ij = cos(z_i, z_j) / tau, self-pairs set to -inf: (2B, 2B), in float32 (float64 stays)."""
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # (2B, D), unit rows
    sim = z @ z.T / tau  # (2B, 2B)
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)  # (2B, 2B)
    return sim.masked_fill(self_pair, float("-inf"))  # exp(-inf) = 0 drops a = i from the sums


def contrastive_loss(z, positive_mask, tau=0.1):
    """The L_out loss above, of embeddings z (2B, D) with a bool positive_mask (2B, 2B).

    Computed in float32 even under autocast; log-sum-exp keeps it finite for any tau > 0. The mask's
    diagonal is ignored (i is never its own positive); nothing here reads a value back from the device."""
    assert positive_mask.shape == (len(z), len(z)), \
        f"positive_mask must be ({len(z)}, {len(z)}), a row and a column per row of z, got {tuple(positive_mask.shape)}"
    with torch.autocast(device_type=z.device.type, enabled=False):
        sim = _similarities(z, tau)  # (2B, 2B)
        positive_mask = positive_mask & ~torch.eye(len(z), dtype=torch.bool, device=z.device)  # (2B, 2B)
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (2B, 2B): l_ij, -inf on the diagonal
        n_pos = positive_mask.sum(dim=1)  # (2B,): |P(i)|
        has_pos = n_pos > 0  # (2B,)
        # Sum l_iq over the positives; masked_fill (not a product) so that 0 * -inf is never a NaN.
        pos_sum = log_prob.masked_fill(~positive_mask, 0.0).sum(dim=1)  # (2B,)
        loss_i = -pos_sum / n_pos.clamp_min(1)  # (2B,)
        return (loss_i * has_pos).sum() / has_pos.sum()  # NaN when no anchor has a positive


@torch.no_grad()
def positive_top1(z, positive_mask):
    """pos_acc: the fraction of anchors (with a positive) whose most similar other embedding is one of
    their positives. A 0-dim tensor on z's device (reading it would wait for the device)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        nearest = _similarities(z, 1.0).argmax(dim=1)  # (2B,): index of the nearest other embedding
    hit = positive_mask.gather(1, nearest[:, None]).squeeze(1)  # (2B,): is it a positive?
    has_pos = positive_mask.any(dim=1)  # (2B,)
    return (hit & has_pos).sum() / has_pos.sum()


def positives_of(method, threshold=0.1, partitions=4, partition_rule="balanced"):
    """The positive mask of a method as a function of a batch's positions (B,) and slices (B,), the slice
    count N of each one's volume: (2B, 2B). GCL's partition_rule is "balanced" (positions alone) or
    "authors" (also N)."""
    if method == "simclr":
        return lambda positions, slices: simclr_mask(positions)
    if method == "gcl":
        return lambda positions, slices: gcl_mask(positions, partitions, slices if partition_rule == "authors" else None)
    assert method == "pcl", f"no positives for method {method!r}"
    return lambda positions, slices: pcl_mask(positions, threshold)


def contrastive_step(model, x, positions, slices, generator, positives, augmentation, tau, separate_views=False):
    """SimCLR, GCL or PCL on one batch x (B, 1, H, W) of slices at positions (B,), with slices (B,) the
    slice count N of each one's volume, and positives from positives_of: the loss and pos_acc, two 0-dim tensors.
    With several processes each embeds its share of the global batch, and the loss sees all of it."""
    x1, x2 = augment(x, augmentation, generator), augment(x, augmentation, generator)  # (B, 1, H, W) each
    if separate_views:  # the authors': BatchNorm normalizes each view on its own
        z1, z2 = model(x1), model(x2)  # (B, D) each
    else:  # one forward of 2B: BatchNorm statistics over both views
        z1, z2 = model(torch.cat([x1, x2])).chunk(2)  # (B, D) each
    z = torch.cat([distributed.gather(z1), distributed.gather(z2)])  # (2B_all, D): rows i and i + B_all, slice i
    mask = positives(distributed.gather(positions), distributed.gather(slices))  # (2B_all, 2B_all)
    return contrastive_loss(z, mask, tau), positive_top1(z.detach(), mask)


# ---------------------------------------------------------------------------------------------------
# `python losses.py`: the three masks of a toy batch, and their losses on random embeddings.
# ---------------------------------------------------------------------------------------------------
def main():
    positions = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 1.0], dtype=torch.float64)  # float64, as data.py gives them
    B, partitions, threshold = len(positions), 4, 0.1
    labels = [f"{view}:{p:.2f}" for view in ("a", "b") for p in positions.tolist()]  # a = z1, b = z2
    print(f"toy batch: B = {B} slices at positions {positions.tolist()}, two views each "
          f"(rows 0..{B - 1} are z1, rows {B}..{2 * B - 1} are z2)")
    print(f"GCL partitions (S = {partitions}): {gcl_partitions(positions, partitions).tolist()}")
    masks = {"SimCLR": simclr_mask(positions), f"GCL, S = {partitions}": gcl_mask(positions, partitions),
             f"PCL, threshold = {threshold}": pcl_mask(positions, threshold)}
    for title, mask in masks.items():
        print(f"\n{title}  (row = anchor i, column = j; 1 = j is in P(i))")
        print(" " * 9 + " ".join(f"{k:>2}" for k in range(len(labels))))
        for k, (label, row) in enumerate(zip(labels, mask.tolist())):
            print(f"{label:>6} {k:>2} " + " ".join(f"{int(v):>2}" for v in row))
    print(f"(PCL: 0.90 and 1.00 differ by exactly the threshold {threshold}, so they are not positives)")

    torch.manual_seed(0)
    z = torch.randn(2 * B, 128)  # random projections of the two views, stacked as cat(z1, z2)
    print(f"\nlosses of random embeddings (tau = 0.1; log(2B - 1) = {torch.log(torch.tensor(2.0 * B - 1)):.4f} "
          f"is the loss of identical embeddings):")
    for title, mask in masks.items():
        print(f"  {title:<22} {contrastive_loss(z, mask).item():.4f}")


if __name__ == "__main__":
    main()
