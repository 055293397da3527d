"""baselines.py: the paper's two other pretext tasks, Rotation and PIRL, whole, in one file.

Rotation (Gidaris et al. 2018): turn an augmented slice by k * 90 degrees, k drawn in 0..3, and
classify k from the pooled bottleneck with one linear layer:

    loss = mean over i of -log softmax(RotationHead(encoder(rot_k(x_i))))[k_i]

PIRL (Misra and van der Maaten 2020): f(v_I) is the projection of an augmented slice, g(v_It) the
representation of its 9 shuffled jigsaw tiles, each tile encoded on its own; both are pulled toward
the slice's row m_I of a memory bank and away from K other rows (negatives):

    s(v, m) = cos(v, m);   L_NCE(m_I, v) = -log( exp(s(v, m_I) / tau)
                                / (exp(s(v, m_I) / tau) + sum over negatives I' != I of exp(s(v, m_I') / tau)) )
    loss = mean over the batch of  lam * L_NCE(m_I, g(v_It)) + (1 - lam) * L_NCE(m_I, f(v_I))
    then m_I <- normalize(momentum * m_I + (1 - momentum) * normalize(f(v_I)))

This is the InfoNCE form of common reimplementations (PIRL's h is a binary NCE); tau 0.07, lam 0.5,
momentum 0.5 as PIRL. In 2D: tiles of 16 px at S = 64 (a quarter of the side, as PIRL's 64 of a
255-px crop; see cut_tiles), all from one augmented view; 1024 negatives per step (PIRL: 32000);
learning rate 0.01 (at 0.1 every bank row ends at one point: loss log(1 + K), K the negatives
drawn, at most the bank's other rows).
Rotation feeds one random rotation per slice (RotNet feeds all four) of an `upright` view by default
(flips or turns by any angle would hide the label).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import AUGMENTATIONS, augment
from model import Encoder, Pretrainer, ProjectionHead, init_weights

METHODS = ("rotation", "pirl")


# ------------------------------------------------------------------------------------- Rotation
class RotationHead(nn.Module):
    """Global average pool of the bottleneck, Linear(16f, 4): (B, 16f, h, w) -> logits (B, 4)."""

    def __init__(self, in_channels, rotations=4):
        super().__init__()
        self.linear = nn.Linear(in_channels, rotations)

    def forward(self, bottleneck):
        return self.linear(bottleneck.mean(dim=(2, 3)))  # (B, 4)


def rotate_batch(images, generator):
    """Each image (B, C, S, S) turned counter-clockwise by k * 90 degrees, k uniform in {0, 1, 2, 3}.
    Returns (rotated (B, C, S, S), k (B,) long): the labels."""
    assert images.shape[-1] == images.shape[-2], "rotations by 90 degrees need square slices"
    k = torch.randint(0, 4, (len(images),), generator=generator, device=images.device)  # (B,)
    turned = torch.stack([images.rot90(r, dims=(2, 3)) for r in range(4)])  # (4, B, C, S, S)
    return turned[k, torch.arange(len(images), device=images.device)], k


def rotation_step(model, x, generator, augmentation=AUGMENTATIONS["upright"]):
    """Loss and accuracy (0-dim tensors) of one batch x (B, 1, S, S). The augmentation must not turn
    slices itself (pretrain.py refuses `paper`, which turns them by any angle)."""
    turned, k = rotate_batch(augment(x, augmentation, generator), generator)  # (B, 1, S, S), (B,)
    logits = model(turned)  # (B, 4)
    return F.cross_entropy(logits.float(), k), (logits.detach().argmax(dim=1) == k).float().mean()


# ----------------------------------------------------------------------------------------- PIRL
class JigsawHead(nn.Module):
    """PIRL's g: (B, T, 16f, h, w) tile bottlenecks -> (B, out_dim). Each tile is pooled and mapped by
    one shared Linear(16f, tile_dim); the T vectors are concatenated in the given (shuffled) order and
    a Linear(T * tile_dim, out_dim) combines them. PIRL: T = 9, tile_dim = out_dim = 128."""

    def __init__(self, in_channels, tiles=9, tile_dim=128, out_dim=128):
        super().__init__()
        self.tile = nn.Linear(in_channels, tile_dim)
        self.combine = nn.Linear(tiles * tile_dim, out_dim)

    def forward(self, bottlenecks):
        per_tile = self.tile(bottlenecks.mean(dim=(3, 4)))  # (B, T, tile_dim)
        return self.combine(per_tile.flatten(1))  # (B, T * tile_dim) -> (B, out_dim)


class PIRL(Pretrainer):
    """The encoder, f (a ProjectionHead), g (a JigsawHead) and the memory bank: a buffer (bank_size, D)
    of unit rows, one per slice, so that it is saved and resumed with the weights."""

    def __init__(self, encoder, proj_dim, bank_size):
        super().__init__(encoder, ProjectionHead(encoder.out_channels, proj_dim))
        self.jigsaw_head = JigsawHead(encoder.out_channels, tile_dim=proj_dim, out_dim=proj_dim)
        self.register_buffer("memory", F.normalize(torch.randn(bank_size, proj_dim), dim=1))  # (bank_size, D)


def cut_tiles(images, generator, grid=3):
    """PIRL's jigsaw tiles in row-major grid order: (B, C, S, S) -> (B, T, C, t, t), T = grid**2.

    A tile has t = 16 * max(1, S // 64) px (the encoder needs multiples of 16) and covers a quarter
    of the slice's side as in PIRL: the slice is resampled to 4t px when S != 4t (bilinear), cut into
    cells of floor(4t / grid) px placed at a random origin, and each tile lies at a random whole-pixel
    jitter inside its cell. Tiles are plain pixel copies (gathered with index tensors)."""
    B, C, H, W = images.shape
    assert H == W, "jigsaw tiles need square slices"
    t = 16 * max(1, H // 64)
    side, device = 4 * t, images.device
    cell = side // grid
    assert cell >= t, f"a {grid} x {grid} grid of {t}-px tiles does not fit in {side} px"
    if H != side:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                               antialias=H > side)  # (B, C, 4t, 4t)
    T = grid * grid
    origin = torch.randint(0, side - grid * cell + 1, (B, 1, 2), generator=generator, device=device)
    steps = torch.arange(grid, device=device) * cell  # (grid,)
    cells = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(T, 2)  # (T, 2): (row, col)
    jitter = torch.randint(0, cell - t + 1, (B, T, 2), generator=generator, device=device)  # (B, T, 2)
    corner = origin + cells + jitter  # (B, T, 2): top-left pixel of every tile
    rows = corner[..., 0, None] + torch.arange(t, device=device)  # (B, T, t)
    cols = corner[..., 1, None] + torch.arange(t, device=device)  # (B, T, t)
    b = torch.arange(B, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    tiles = images.permute(0, 2, 3, 1)[b, rows[..., :, None], cols[..., None, :]]  # (B, T, t, t, C)
    return tiles.permute(0, 1, 4, 2, 3)  # (B, T, C, t, t)


def jigsaw(images, generator, grid=3):
    """The tiles of cut_tiles shuffled by one permutation per image, drawn from all T! (PIRL never
    classifies them). Returns (shuffled (B, T, C, t, t), perm (B, T)), shuffled[b, k] = tiles[b, perm[b, k]]."""
    tiles = cut_tiles(images, generator, grid)  # (B, T, C, t, t)
    B, T = tiles.shape[:2]
    perm = torch.argsort(torch.rand(B, T, generator=generator, device=images.device), dim=1)  # (B, T)
    return tiles[torch.arange(B, device=images.device)[:, None], perm], perm


def nce_logits(v, memory, indices, negatives, tau=0.07):
    """s(v_i, m) / tau against the anchor's own bank row (column 0) and the negatives (columns 1..K);
    a negative that is the anchor's own row is -inf. v (B, D), memory (bank_size, D), indices (B,),
    negatives (K,) -> (B, 1 + K), in float32 or more even under autocast."""
    with torch.autocast(device_type=v.device.type, enabled=False):
        v = F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=1)  # (B, D)
        positive = F.normalize(memory[indices].to(v.dtype), dim=1)  # (B, D): m_I
        negative = F.normalize(memory[negatives].to(v.dtype), dim=1)  # (K, D): m_I'
        logits = torch.cat([(v * positive).sum(dim=1, keepdim=True), v @ negative.T], dim=1) / tau  # (B, 1 + K)
    own = torch.cat([torch.zeros_like(indices[:, None], dtype=torch.bool),
                     negatives[None, :] == indices[:, None]], dim=1)  # (B, 1 + K)
    return logits.masked_fill(own, float("-inf"))


def pirl_loss(v_img, v_jig, memory, indices, negatives, tau=0.07, lam=0.5):
    """The loss of the module docstring: v_img = f(v_I), v_jig = g(v_It) (B, D); no gradient reaches
    the bank memory (bank_size, D). Computed in float32 (float64 stays) even under autocast."""
    memory = memory.detach()
    target = torch.zeros_like(indices)  # (B,): the positive is column 0
    jig = F.cross_entropy(nce_logits(v_jig, memory, indices, negatives, tau), target)
    img = F.cross_entropy(nce_logits(v_img, memory, indices, negatives, tau), target)
    return lam * jig + (1 - lam) * img


@torch.no_grad()
def update_memory(memory, indices, v, momentum=0.5):
    """In place: m_I <- normalize(momentum * m_I + (1 - momentum) * normalize(v_I)) for the distinct
    rows `indices` (B,) of memory (bank_size, D), with v = f(v_I): (B, D)."""
    v = F.normalize(v.to(memory.dtype), dim=1)  # (B, D)
    memory[indices] = F.normalize(momentum * memory[indices] + (1 - momentum) * v, dim=1)  # (B, D) rows


def pirl_step(model, x, indices, generator, augmentation, tau=0.07, lam=0.5, negatives=1024, momentum=0.5):
    """Loss and accuracy (0-dim tensors) of one batch x (B, 1, S, S) whose slices are the bank rows
    `indices` (B,). Accuracy: f(v_I) closer to its own row than to every negative. The bank is
    updated with f(v_I) after the loss has used it."""
    v_img = model(augment(x, augmentation, generator))  # (B, D): f(v_I)
    tiles, _ = jigsaw(augment(x, augmentation, generator), generator)  # (B, 9, 1, t, t), shuffled
    bottlenecks = model.encoder(tiles.flatten(0, 1))[-1]  # (9B, 16f, t / 16, t / 16)
    v_jig = model.jigsaw_head(bottlenecks.unflatten(0, tiles.shape[:2]))  # (B, D): g(v_It)
    bank = model.memory
    drawn = torch.randperm(len(bank), generator=generator, device=x.device)[:negatives]  # (K,)
    loss = pirl_loss(v_img, v_jig, bank, indices, drawn, tau, lam)
    accuracy = (nce_logits(v_img.detach(), bank, indices, drawn).argmax(dim=1) == 0).float().mean()
    update_memory(bank, indices, v_img.detach(), momentum)
    return loss, accuracy


def build(config):
    """Rotation's or PIRL's network from a pretraining config (PIRL's bank from config["bank_size"])."""
    encoder = Encoder(1, config["width"], bottleneck=config["bottleneck"])
    if config["method"] == "rotation":
        net = Pretrainer(encoder, RotationHead(encoder.out_channels))
    else:
        net = PIRL(encoder, config["proj_dim"], config["bank_size"])
    return init_weights(net, config["init"])
