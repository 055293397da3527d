"""The Rotation and PIRL baselines: their inputs, heads and losses against plain loops, and end to end."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import baselines
from augment import AUGMENTATIONS, augment
from baselines import JigsawHead, RotationHead, cut_tiles, jigsaw, nce_logits, pirl_loss, rotate_batch, update_memory
from checkpoints import load_checkpoint


# ---------------------------------------------------------------------------------------- rotation
def turned_by_hand(a, k):
    """a (S, S) turned counter-clockwise by k * 90 degrees, one pixel at a time."""
    S = len(a)
    where = [lambda i, j: (i, j), lambda i, j: (j, S - 1 - i),
             lambda i, j: (S - 1 - i, S - 1 - j), lambda i, j: (S - 1 - j, i)][k]
    return torch.tensor([[a[where(i, j)].item() for j in range(S)] for i in range(S)])


def test_rotation_labels_match_the_rotation_applied():
    assert turned_by_hand(torch.tensor([[1, 2], [3, 4]]), 1).tolist() == [[2, 4], [1, 3]]  # counter-clockwise
    x = torch.randn(24, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    turned, k = rotate_batch(x, torch.Generator().manual_seed(1))
    assert turned.shape == x.shape and k.shape == (24,) and set(k.tolist()) == {0, 1, 2, 3}
    for b in range(24):
        assert torch.equal(turned[b, 0], turned_by_hand(x[b, 0], k[b].item())), b
    _, again = rotate_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(k, again)  # the labels come from the generator alone
    counts = torch.bincount(rotate_batch(torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(2))[1])
    assert ((counts - 1000).abs() < 100).all()  # uniform over the four rotations


@pytest.mark.parametrize("augmentation", [None, "upright", "gentle"])
def test_a_rotation_step_is_the_cross_entropy_of_the_turned_augmented_view(augmentation):
    torch.manual_seed(0)
    net = baselines.build(dict(method="rotation", width=4, bottleneck="batchnorm", init="default"))
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    turned, k = rotate_batch(augment(x, AUGMENTATIONS[augmentation or "upright"], g), g)  # the step's draws, in order
    logits = net(turned).detach()
    by_hand = [-(logits[b, k[b]] - torch.logsumexp(logits[b], 0)).item() for b in range(6)]
    given = () if augmentation is None else (AUGMENTATIONS[augmentation],)  # None: the default, upright
    loss, accuracy = baselines.rotation_step(net, x, torch.Generator().manual_seed(3), *given)
    assert loss.item() == pytest.approx(sum(by_hand) / 6, rel=1e-5)
    assert accuracy.item() == pytest.approx((logits.argmax(1) == k).float().mean().item())


# ------------------------------------------------------------------------------------------ jigsaw
@pytest.mark.parametrize("S", [32, 64, 96, 128])
def test_tiles_are_pixel_crops_one_in_each_cell_of_the_grid(S):
    t = 16 * max(1, S // 64)
    side, cell = 4 * t, 4 * t // 3  # the slice resampled to 4t px, cut into 3 x 3 cells of cell px
    x = torch.rand(3, 1, S, S, generator=torch.Generator().manual_seed(S))
    tiles = cut_tiles(x, torch.Generator().manual_seed(0))
    assert tiles.shape == (3, 9, 1, t, t)
    resampled = x if S == side else F.interpolate(x, size=(side, side), mode="bilinear",
                                                  align_corners=False, antialias=S > side)
    windows = F.unfold(resampled, t)  # (3, t * t, L): every t x t window, L = (side - t + 1)**2
    offsets = set()
    for b in range(3):
        for k in range(9):
            found = (windows[b] == tiles[b, k].reshape(-1, 1)).all(dim=0).nonzero().flatten()  # exact copies
            assert len(found) == 1, (b, k)
            y, x0 = divmod(found.item(), side - t + 1)  # top-left pixel of the tile
            r, c = divmod(k, 3)  # row-major grid order
            slack = (cell - t) + (side - 3 * cell)  # jitter inside the cell, plus the grid's origin
            assert 0 <= y - r * cell <= slack and 0 <= x0 - c * cell <= slack, (b, k, y, x0)
            offsets.add((y - r * cell, x0 - c * cell))
    assert len(offsets) > 3  # the tiles are jittered, not on a fixed lattice


def test_jigsaw_permutations_are_valid_and_shuffle_the_tiles():
    x = torch.randn(16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    tiles = cut_tiles(x, torch.Generator().manual_seed(5))  # jigsaw draws its tiles first, then perm
    shuffled, perm = jigsaw(x, torch.Generator().manual_seed(5))
    assert shuffled.shape == (16, 9, 1, 16, 16) and perm.shape == (16, 9)
    for b in range(16):
        assert sorted(perm[b].tolist()) == list(range(9)), perm[b]
        for k in range(9):
            assert torch.equal(shuffled[b, k], tiles[b, perm[b, k]]), (b, k)
    assert len({tuple(p) for p in perm.tolist()}) == 16  # one random permutation per slice
    assert (perm != torch.arange(9)).any(dim=1).all()


# ------------------------------------------------------------------------------------------- heads
def test_heads_shapes_and_the_jigsaw_head_by_hand():
    assert RotationHead(8)(torch.randn(5, 8, 2, 2)).shape == (5, 4)
    head = JigsawHead(8, tiles=9, tile_dim=3, out_dim=6)
    features = torch.randn(2, 9, 8, 2, 2)
    out = head(features)
    assert out.shape == (2, 6)
    for b in range(2):  # per tile: pool, shared Linear; concatenate in the given order; Linear
        per_tile = [head.tile(features[b, k].mean(dim=(1, 2))) for k in range(9)]
        torch.testing.assert_close(out[b], head.combine(torch.cat(per_tile)))
    assert not torch.allclose(head(features.flip(1)), out)  # the order of the tiles matters


# -------------------------------------------------------------------------------------------- PIRL
def oracle_pirl(v_img, v_jig, memory, indices, negatives, tau, lam):
    """mean over i of lam * L(m_i, g_i) + (1 - lam) * L(m_i, f_i), L(m, v) = -log(e(v, m) / (e(v, m) +
    sum over negatives n != i of e(v, m_n))), e(v, m) = exp(cos(v, m) / tau): a loop in float64."""
    def cos(a, b):
        return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))

    def nce(v, i):
        e = lambda n: math.exp(cos(v, memory[n]) / tau)  # noqa: E731
        positive = e(i)
        return -math.log(positive / (positive + sum(e(n) for n in negatives if n != i)))
    total = [lam * nce(v_jig[b], i) + (1 - lam) * nce(v_img[b], i) for b, i in enumerate(indices)]
    return sum(total) / len(total)


@pytest.mark.parametrize("tau,lam,negatives", [(0.07, 0.5, [0, 6, 2, 5]), (0.5, 0.3, [3, 4, 1, 0, 2, 5, 6]),
                                               (1.0, 0.0, [6]), (0.2, 1.0, [5, 1, 4])])
def test_pirl_loss_matches_a_plain_loop(tau, lam, negatives):
    g = torch.Generator().manual_seed(int(tau * 100))
    v_img = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v_jig = torch.randn(3, 5, generator=g, dtype=torch.float64)
    memory = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    indices = [2, 6, 4]  # negatives include anchors' own rows (left out) and other anchors' rows (kept)
    loss = pirl_loss(v_img, v_jig, memory, torch.tensor(indices), torch.tensor(negatives), tau, lam)
    assert loss.dtype == torch.float64
    expected = oracle_pirl(v_img, v_jig, memory, indices, negatives, tau, lam)
    assert loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_pirl_gradients_reach_f_and_g_but_never_the_bank():
    v_img, v_jig = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    memory = F.normalize(torch.randn(10, 6), dim=1).requires_grad_()
    pirl_loss(v_img, v_jig, memory, torch.tensor([0, 3, 5, 9]), torch.arange(10), tau=0.01).backward()
    assert torch.isfinite(v_img.grad).all() and v_img.grad.abs().sum() > 0 and v_jig.grad.abs().sum() > 0
    assert memory.grad is None


def test_nce_accuracy_counts_slices_nearest_to_their_own_bank_row():
    memory = torch.eye(4)
    v = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0]])  # nearest rows: 0, 2, 0
    logits = nce_logits(v, memory, torch.tensor([0, 1, 3]), torch.arange(4))  # (3, 5)
    assert torch.isinf(logits[0, 1]) and torch.isinf(logits[1, 2]) and torch.isinf(logits[2, 4])  # own rows out
    assert (logits.argmax(dim=1) == 0).float().mean().item() == pytest.approx(1 / 3)


def test_nce_logits_and_pirl_loss_inside_bf16_autocast_are_the_float32_ones():
    """pirl_step takes its accuracy from nce_logits inside pretraining's autocast: every column, the
    negatives' too, must be the float32 cosine, not one rounded to bf16."""
    g = torch.Generator().manual_seed(0)
    v, memory = torch.randn(8, 32, generator=g), F.normalize(torch.randn(50, 32, generator=g), dim=1)
    indices, negatives = torch.arange(8), torch.arange(8, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = nce_logits(v, memory, indices, negatives), pirl_loss(v, v.flip(0), memory, indices, negatives)
    assert inside[0].dtype == torch.float32 and inside[1].dtype == torch.float32
    assert torch.equal(inside[0], nce_logits(v, memory, indices, negatives))
    assert torch.equal(inside[1], pirl_loss(v, v.flip(0), memory, indices, negatives))


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.0])
def test_memory_update_is_the_momentum_average(momentum):
    g = torch.Generator().manual_seed(1)
    memory = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    before = memory.clone()
    v = torch.randn(2, 4, generator=g, dtype=torch.float64) * 3  # not unit: normalized before averaging
    update_memory(memory, torch.tensor([4, 1]), v, momentum)
    for row, i in enumerate([4, 1]):
        f = [a / math.sqrt(sum(b * b for b in v[row].tolist())) for a in v[row].tolist()]
        m = [momentum * a + (1 - momentum) * b for a, b in zip(before[i].tolist(), f)]
        expected = [a / math.sqrt(sum(b * b for b in m)) for a in m]
        torch.testing.assert_close(memory[i], torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    for i in (0, 2, 3, 5):
        assert torch.equal(memory[i], before[i])


def test_a_pirl_step_is_the_loss_of_its_equation_then_the_bank_update():
    """One step on a bank of 20 slices (fewer than the negatives drawn: all others are negatives),
    replayed by hand from the same random draws: the loss of the plain loop, then the momentum average."""
    import pretrain
    args = pretrain.get_args(["--method", "pirl", "--width", "4", "--proj-dim", "8"])
    assert (args.tau, args.pirl_lambda, args.bank_momentum, args.negatives, args.lr) == (0.07, 0.5, 0.5, 1024, 0.01)
    torch.manual_seed(0)
    model = baselines.build({**vars(args), "bank_size": 20})
    assert model.memory.shape == (20, 8) and torch.allclose(model.memory.norm(dim=1), torch.ones(20))
    x, indices = torch.randn(4, 1, 32, 32), torch.tensor([7, 0, 19, 3])
    before, twin = model.memory.clone(), copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)  # the step's draws, in its order: f's view, g's view, jigsaw
    views = AUGMENTATIONS[args.augment]
    f = twin(augment(x, views, g)).detach()  # (4, 8)
    tiles, _ = jigsaw(augment(x, views, g), g)  # (4, 9, 1, 16, 16)
    v_jig = twin.jigsaw_head(twin.encoder(tiles.flatten(0, 1))[-1].unflatten(0, (4, 9))).detach()
    loss, accuracy = baselines.pirl_step(model, x, indices, torch.Generator().manual_seed(3), views)
    expected = oracle_pirl(f.double(), v_jig.double(), before.double(), indices.tolist(), range(20), 0.07, 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-4) and 0 <= accuracy.item() <= 1
    expected = F.normalize(0.5 * before[indices] + 0.5 * F.normalize(f, dim=1), dim=1)
    torch.testing.assert_close(model.memory[indices], expected)
    rest = torch.ones(20, dtype=torch.bool).index_fill(0, indices, False)
    assert torch.equal(model.memory[rest], before[rest])


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["rotation", "pirl"])
def test_baseline_pretrains_resumes_exactly_and_finetunes(tiny, tmp_path, method):
    whole = tiny.pretrain(tmp_path / "whole", "--method", method)
    first = tiny.weights(tiny.pretrain(tmp_path / "cut", "--method", method, "--stop-after", "1"))
    cut = tiny.pretrain(tmp_path / "cut", "--method", method, "--resume")
    saved = tiny.weights(whole)
    tiny.assert_same_weights(saved, tiny.weights(cut))  # every tensor, the memory bank included
    if method == "pirl":
        bank = saved["memory"]
        assert bank.shape == (load_checkpoint(whole)["config"]["bank_size"], 128)
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(len(bank)))
        assert not torch.allclose(bank, first["memory"])  # the second epoch moved the bank
    else:
        assert saved["head.linear.weight"].shape == (4, 64)  # 4 rotations from 16f = 64 channels
    run = tiny.finetune(whole, tmp_path / "ft", "--epochs", "1")
    assert load_checkpoint(run / "best.pt", "finetune")["config"]["method"] == method


# ----------------------------------------------------------------------------- more by hand
def test_the_rotation_head_averages_the_bottleneck_then_one_linear_layer():
    head = RotationHead(3)
    features = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        pooled = torch.tensor([sum(features[b, c].flatten().tolist()) / 20 for c in range(3)])
        torch.testing.assert_close(head(features)[b], head.linear.weight @ pooled + head.linear.bias)


def test_tile_origins_and_jitters_cover_every_whole_pixel_offset():
    """At S = 64 (t = 16, cells of 21 px, one pixel of spare side): the grid's origin is 0 or 1 and each
    tile's jitter 0..5, so a tile's offset in its cell takes every value 0..6, and the origin (shared by
    the nine tiles of a slice) both values."""
    S, cell = 64, 21
    x = (torch.arange(S)[:, None] * S + torch.arange(S)).float().expand(300, 1, S, S)  # value: row * S + col
    tiles = cut_tiles(x, torch.Generator().manual_seed(0))  # (300, 9, 1, 16, 16)
    corner = tiles[:, :, 0, 0, 0].long()  # (300, 9): the top-left pixel of every tile
    r, c = torch.arange(9) // 3, torch.arange(9) % 3
    dy, dx = corner // S - r * cell, corner % S - c * cell  # (300, 9): offsets inside the cells
    assert set(dy.flatten().tolist()) == set(range(7)) and set(dx.flatten().tolist()) == set(range(7))
    assert (dy.max(dim=1).values - dy.min(dim=1).values).max() == 5  # jitters span 0..5 within one slice


def pirl_step_by_hand(momentum, aim):
    """One PIRL step, the batch's bank rows first set to f(v_I) itself when aim (then f's nearest row is
    its own). Returns (the step's accuracy, f, the bank before, the bank after, indices)."""
    import pretrain
    args = pretrain.get_args(["--method", "pirl", "--width", "4", "--proj-dim", "8"])
    torch.manual_seed(0)
    model = baselines.build({**vars(args), "bank_size": 20})
    x, indices = torch.randn(4, 1, 32, 32), torch.tensor([7, 0, 19, 3])
    views = AUGMENTATIONS[args.augment]
    f = copy.deepcopy(model)(augment(x, views, torch.Generator().manual_seed(3))).detach()  # the step's first draw
    if aim:
        with torch.no_grad():
            model.memory[indices] = F.normalize(f, dim=1)
    before = model.memory.clone()
    _, accuracy = baselines.pirl_step(model, x, indices, torch.Generator().manual_seed(3), views, momentum=momentum)
    return accuracy, f, before, model.memory, indices


def test_a_pirl_step_s_accuracy_is_f_nearest_to_its_own_bank_row():
    """Accuracy is that of f(v_I) (the module docstring), not of the jigsaw's g(v_It): with each slice's
    row set to f(v_I) itself, every slice is nearest its own row."""
    accuracy, f, before, _, indices = pirl_step_by_hand(0.5, aim=True)
    cos = F.normalize(f, dim=1) @ F.normalize(before, dim=1).T  # (4, 20)
    nearest = [max(range(20), key=lambda n: cos[b, n].item()) for b in range(4)]
    assert nearest == indices.tolist() and accuracy.item() == 1.0


def test_a_pirl_step_updates_the_bank_with_its_own_momentum():
    _, f, before, after, indices = pirl_step_by_hand(0.9, aim=False)
    expected = F.normalize(0.9 * before[indices] + 0.1 * F.normalize(f, dim=1), dim=1)
    torch.testing.assert_close(after[indices], expected)
    assert not torch.allclose(after[indices], F.normalize(0.5 * before[indices] + 0.5 * F.normalize(f, dim=1), dim=1))


def test_pirl_loss_takes_the_cosine_with_bank_rows_of_any_length():
    """s(v, m) = cos(v, m): a bank whose rows are not unit (scaled by 3 and 0.5) gives the same loss."""
    g = torch.Generator().manual_seed(4)
    v_img, v_jig = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    memory = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1) * torch.tensor([3.0, 0.5] * 3 + [3.0])[:, None].double()
    indices, negatives = [2, 1, 4], [0, 1, 3, 5, 6]
    loss = pirl_loss(v_img, v_jig, memory, torch.tensor(indices), torch.tensor(negatives), 0.2, 0.5)
    assert loss.item() == pytest.approx(oracle_pirl(v_img, v_jig, memory, indices, negatives, 0.2, 0.5), rel=1e-9)


def test_pirl_s_jigsaw_head_maps_each_tile_to_the_projection_size():
    """tile_dim = out_dim = the projection's size (PIRL: 128 both), so --proj-dim sets both."""
    net = baselines.build(dict(method="pirl", width=4, bottleneck="batchnorm", init="default", proj_dim=8, bank_size=5))
    assert (net.jigsaw_head.tile.out_features, net.jigsaw_head.combine.in_features) == (8, 9 * 8)
    assert net.jigsaw_head.combine.out_features == 8 == net.memory.shape[1]
