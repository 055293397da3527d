"""Oracle tests of losses.py: a plain loop over anchors, the authors' formulation, closed forms,
equivalences and invariances."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from losses import contrastive_loss, gcl_mask, gcl_partitions, pcl_mask, positive_top1, positives_of, simclr_mask


# ---------------------------------------------------------------------------------------------------
# The oracle: the definition, written as a loop in float64, sharing no code with losses.py.
# ---------------------------------------------------------------------------------------------------
def oracle_loss(z1, z2, is_positive, tau):
    """mean over anchors with P(i) != {} of  - mean_{p in P(i)} [ s_ip - log sum_{a != i} exp(s_ia) ]."""
    rows = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n = len(rows)
    s = [[float(rows[i] @ rows[j]) / tau for j in range(n)] for i in range(n)]
    per_anchor = []
    for i in range(n):
        log_denominator = math.log(sum(math.exp(s[i][a]) for a in range(n) if a != i))
        positives = [j for j in range(n) if j != i and is_positive(i, j)]
        if positives:
            per_anchor.append(-sum(s[i][p] - log_denominator for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def simclr_rule(B):
    return lambda i, j: i % B == j % B  # same slice, other view (j != i is checked by the oracle)


def gcl_rule(positions, S):
    p = positions.tolist()
    part = [min(math.ceil(p[k] * S) - 1, S - 1) for k in range(len(p))]
    return lambda i, j: part[i % len(p)] == part[j % len(p)]


def pcl_rule(positions, threshold):
    p = positions.tolist()
    return lambda i, j: abs(p[j % len(p)] - p[i % len(p)]) < threshold


def random_batch(B, D, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, D, generator=g, dtype=torch.float64)
    z2 = torch.randn(B, D, generator=g, dtype=torch.float64)
    positions = 1 - torch.rand(B, generator=g, dtype=torch.float64)  # (0, 1]
    return z1, z2, positions


def loss(z1, z2, mask, tau=0.1):
    return contrastive_loss(torch.cat([z1, z2]), mask, tau).item()


# One batch size per regime (a single slice, a pair, a larger batch) and a cold and a warm temperature.
CASES = [(1, 3, 0.1), (2, 16, 0.05), (9, 16, 0.7), (9, 3, 0.1)]


# ---------------------------------------------------------------------------------------------------
# Each method against the oracle.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,D,tau", CASES)
def test_simclr_matches_oracle(B, D, tau):
    z1, z2, positions = random_batch(B, D, seed=B * 100 + D)
    assert loss(z1, z2, simclr_mask(positions), tau) == pytest.approx(oracle_loss(z1, z2, simclr_rule(B), tau), abs=1e-9)


@pytest.mark.parametrize("B,D,tau", CASES)
@pytest.mark.parametrize("partitions", [1, 3, 4])
def test_gcl_matches_oracle(B, D, tau, partitions):
    z1, z2, positions = random_batch(B, D, seed=B * 100 + D + 1)
    expected = oracle_loss(z1, z2, gcl_rule(positions, partitions), tau)
    assert loss(z1, z2, gcl_mask(positions, partitions), tau) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threshold", ["0.1", "0.35", "0.05", "0.2"])
def test_pcl_positives_at_exactly_the_threshold_are_not_positives(threshold, dtype):
    """Slices of volumes of 10, 20 and 40 slices at positions (i + 1) / N, in float64 as data.py serves
    them (or float32): a pair is a positive iff |p_i - p_j| < threshold in exact arithmetic, so a tie
    (neighbours in a 10-slice volume at 0.1) never is. A plain float comparison makes some ties positives."""
    sizes = [10, 20, 40]
    exact = [Fraction(i + 1, n) for n in sizes for i in range(n)]
    positions = torch.cat([torch.arange(1, n + 1, dtype=dtype) / n for n in sizes])  # (70,)
    t, B = Fraction(threshold), len(exact)
    assert any(abs(a - b) == t for a in exact for b in exact)  # the case under test is there
    expected = [[i != j and abs(exact[i % B] - exact[j % B]) < t for j in range(2 * B)] for i in range(2 * B)]
    assert pcl_mask(positions, float(threshold)).tolist() == expected


def test_pcl_in_float32_tells_a_tie_from_the_nearest_difference_below_it_in_volumes_up_to_500_slices():
    """Pairs a / N and b / M (N, M from 400 to 500 slices) whose difference is the threshold 0.1 exactly
    (no positive) or below it by the least two such fractions allow, 1 / (10 N M) (a positive: 292 / 309
    and 278 / 329 in float32 were lost), found with integers, then fed to pcl_mask as float32 positions."""
    sizes, below, ties = np.arange(400, 501), [], []
    for N in sizes:
        a = np.arange(1, N + 1)  # (N,)
        for M in sizes:
            for gap, found in ((1, below), (0, ties)):  # 10 (a M - b N) = N M - gap: a/N - b/M = 0.1 - gap / (10 N M)
                top = 10 * a * M - N * M + gap  # (N,): 10 N b
                b = top // (10 * N)
                hit = (top % (10 * N) == 0) & (b >= 1) & (b <= M)  # (N,)
                found += [(x / N, y / M) for x, y in zip(a[hit], b[hit])]
    assert len(below) > 100 and len(ties) > 100  # the cases under test are there
    for pairs, positive in ((below + [(292 / 309, 278 / 329)], True), (ties[::50], False)):
        positions = torch.tensor(pairs, dtype=torch.float32).flatten()  # (2P,): pair k at 2k and 2k + 1
        mask = pcl_mask(positions, 0.1)  # (4P, 4P)
        k = torch.arange(0, len(positions), 2)
        assert mask[k, k + 1].tolist() == [positive] * len(pairs), positive


def test_pcl_in_float32_at_0_35_tells_a_tie_from_the_nearest_difference_below_it_in_volumes_up_to_436_slices():
    """As at 0.1 up to 500 slices: at 0.35 = 7 / 20, pairs a / N - b / M = 0.35 - gap / (20 N M) (N, M from 380 to
    436) are a positive for gap 1 (the least, 2.6e-7 at 436) and not for gap 0 (a tie), in float32."""
    sizes, below, ties = np.arange(380, 437), [], []
    for N in sizes:
        a = np.arange(1, N + 1)  # (N,)
        for M in sizes:
            for gap, found in ((1, below), (0, ties)):  # 20 (a M - b N) = 7 N M - gap
                top = 20 * a * M - 7 * N * M + gap  # (N,): 20 N b
                b = top // (20 * N)
                hit = (top % (20 * N) == 0) & (b >= 1) & (b <= M)
                found += [(x / N, y / M) for x, y in zip(a[hit], b[hit])]
    assert len(below) > 20 and len(ties) > 100  # the cases under test are there
    for pairs, positive in ((below, True), (ties[::20], False)):
        positions = torch.tensor(pairs, dtype=torch.float32).flatten()  # (2P,)
        mask = pcl_mask(positions, 0.35)
        k = torch.arange(0, len(positions), 2)
        assert mask[k, k + 1].tolist() == [positive] * len(pairs), positive


@pytest.mark.parametrize("B,D,tau", CASES)
@pytest.mark.parametrize("threshold", [0.05, 0.35, 0.8])
def test_pcl_matches_oracle(B, D, tau, threshold):
    z1, z2, positions = random_batch(B, D, seed=B * 100 + D + 2)
    expected = oracle_loss(z1, z2, pcl_rule(positions, threshold), tau)
    assert loss(z1, z2, pcl_mask(positions, threshold), tau) == pytest.approx(expected, abs=1e-9)


def test_float32_inputs_match_oracle():
    z1, z2, positions = random_batch(8, 32, seed=7)
    got = contrastive_loss(torch.cat([z1, z2]).float(), pcl_mask(positions.float(), 0.3), 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(oracle_loss(z1, z2, pcl_rule(positions, 0.3), 0.1), abs=1e-4)


def test_anchors_without_positives_are_excluded_and_none_at_all_is_nan():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 6, generator=g) < 0.4
    mask.fill_diagonal_(False)
    mask[0] = False  # anchor 0 has no positive
    mask[1] = False
    mask[1, 4] = True  # anchor 1 has exactly one
    expected = oracle_loss(z[:3], z[3:], lambda i, j: bool(mask[i, j]), 0.2)
    assert contrastive_loss(z, mask, 0.2).item() == pytest.approx(expected, abs=1e-9)
    with_self = mask | torch.eye(6, dtype=torch.bool)  # i is never its own positive: the diagonal is ignored
    assert contrastive_loss(z, with_self, 0.2).item() == pytest.approx(expected, abs=1e-9)
    assert math.isnan(contrastive_loss(z, torch.zeros(6, 6, dtype=torch.bool), 0.2).item())  # training stops on it


def authors_loss(z1, z2, positive_same, tau, base_tau=0.07):
    """The authors' formulation (their SupConLoss, restated from its description, in float64): cosine
    logits / tau over the 2B x 2B grid, the self-pair dropped from numerator and denominator, mean
    log-probability over the positives, times -(tau / base_tau), mean over the 2B anchors. No row-max
    subtraction. positive_same: (B, B) bool, slice j is a positive of slice i (both views)."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    logits = z @ z.T / tau
    not_self = 1 - torch.eye(len(z), dtype=torch.float64)
    mask = positive_same.double().repeat(2, 2) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    return (-(tau / base_tau) * (mask * log_prob).sum(1) / mask.sum(1)).mean().item()


@pytest.mark.parametrize("method", ["simclr", "gcl", "pcl"])
def test_equals_the_authors_loss_divided_by_tau_over_0_07(method):
    z1, z2, positions = random_batch(12, 8, seed=41)
    positions = torch.arange(1, 13, dtype=torch.float64) / 12  # one volume of 12 slices
    same = {"simclr": torch.eye(12, dtype=torch.bool),
            "gcl": (torch.arange(12) // 3)[:, None] == (torch.arange(12) // 3)[None, :],  # authors': i // round(12 / 4)
            "pcl": (positions[:, None] - positions[None, :]).abs() < 0.35}[method]
    mask = {"simclr": simclr_mask(positions), "gcl": gcl_mask(positions, 4), "pcl": pcl_mask(positions, 0.35)}[method]
    ours = loss(z1, z2, mask, tau=0.1)
    assert authors_loss(z1, z2, same, tau=0.1) == pytest.approx(ours * 0.1 / 0.07, rel=1e-12)


def test_the_constant_moves_into_sgd_lr_and_weight_decay():
    """SGD(lr, wd) on c * L takes exactly the steps of SGD(c * lr, wd / c) on L (momentum included):
    why the presets multiply the lr by tau / 0.07 and divide the weight decay by it."""
    c, lr, wd = 0.1 / 0.07, 0.1, 1e-5
    g = torch.Generator().manual_seed(0)
    w0, x = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    positions = torch.rand(4, generator=g, dtype=torch.float64) * 0.9 + 0.1

    def train(scale, lr, wd):
        w = w0.clone().requires_grad_()
        opt = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=wd)
        for _ in range(20):
            opt.zero_grad()
            z = x @ w.T
            (scale * contrastive_loss(z, pcl_mask(positions, 0.35), 0.1)).backward()
            opt.step()
        return w.detach()
    torch.testing.assert_close(train(c, lr, wd), train(1.0, lr * c, wd / c), atol=1e-13, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Closed forms and equivalences between the methods.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 7])
def test_identical_embeddings_give_log_2b_minus_1(B):
    z = torch.tensor([[0.3, -1.2, 2.0]]).repeat(B, 1)  # (B, 3), every embedding the same
    positions = torch.linspace(0.1, 1.0, B)
    for mask in (simclr_mask(positions), gcl_mask(positions), pcl_mask(positions)):
        assert loss(z, z.clone(), mask) == pytest.approx(math.log(2 * B - 1), abs=1e-5)
    assert loss(0 * z, 0 * z, simclr_mask(positions)) == pytest.approx(math.log(2 * B - 1), abs=1e-5)  # zero vectors


def test_hand_computed_orthogonal_case():
    # views identical, slices orthogonal: anchor e1 sees e1 (s = 1), e2, e2 (s = 0) with tau = 1
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p2, p1 = torch.tensor([0.5, 1.0]), torch.tensor([1.0])
    assert loss(z, z.clone(), simclr_mask(p2), tau=1.0) == pytest.approx(math.log(math.e + 2) - 1, abs=1e-12)
    assert loss(z[:1], z[1:], simclr_mask(p1), tau=0.5) == pytest.approx(0.0, abs=1e-12)  # B = 1: the only term


def test_pcl_extremes_equal_simclr_and_all_positives():
    z1, z2, positions = random_batch(9, 8, seed=11)
    assert loss(z1, z2, pcl_mask(positions, 1e-9)) == pytest.approx(loss(z1, z2, simclr_mask(positions)), abs=1e-12)
    everything = loss(z1, z2, ~torch.eye(18, dtype=torch.bool))
    assert loss(z1, z2, pcl_mask(positions, 1.5)) == pytest.approx(everything, abs=1e-12)
    assert loss(z1, z2, gcl_mask(positions, 1)) == pytest.approx(everything, abs=1e-12)


@pytest.mark.parametrize("masks", [simclr_mask, gcl_mask, lambda p: pcl_mask(p, 0.3)])
def test_invariant_to_permuting_the_batch_and_swapping_views(masks):
    z1, z2, positions = random_batch(10, 6, seed=13)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    reference = loss(z1, z2, masks(positions))
    assert loss(z1[perm], z2[perm], masks(positions[perm])) == pytest.approx(reference, abs=1e-12)
    assert loss(z2, z1, masks(positions)) == pytest.approx(reference, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Masks and the GCL partition formulas.
# ---------------------------------------------------------------------------------------------------
def round_half_up(x):
    return math.floor(x + 0.5)


def test_gcl_partitions_balanced_and_the_authors_rule():
    for N in [4, 8, 10, 12, 14, 40, 128, 332]:
        p = torch.arange(1, N + 1, dtype=torch.float32) / N  # p = (i + 1) / N
        authors = [min(i // round_half_up(N / 4), 3) for i in range(N)]
        assert gcl_partitions(p, 4, torch.full((N,), N)).tolist() == authors, N
        if N % 4 == 0:  # the two rules agree when N is a multiple of S
            assert gcl_partitions(p, 4).tolist() == authors, N
    # N = 10: the authors put slices 0-2, 3-5, 6-8, 9 in four parts; the balanced rule 0-1, 2-4, 5-6, 7-9
    p = torch.arange(1, 11) / 10
    assert gcl_partitions(p, 4, torch.full((10,), 10)).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert gcl_partitions(p, 4).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    p = torch.arange(1, 13, dtype=torch.float32) / 12  # S = 3: 1/3 and 2/3 are rounded in float32
    assert gcl_partitions(p, 3).tolist() == [i // 4 for i in range(12)]


def test_masks_by_hand():
    positions = torch.tensor([0.1, 0.15, 0.5])  # slices 0 and 1 are close, slice 2 is far
    expected_pcl = torch.tensor([[0, 1, 0, 1, 1, 0],
                                 [1, 0, 0, 1, 1, 0],
                                 [0, 0, 0, 0, 0, 1],
                                 [1, 1, 0, 0, 1, 0],
                                 [1, 1, 0, 1, 0, 0],
                                 [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(pcl_mask(positions, 0.1), expected_pcl)
    assert torch.equal(gcl_mask(positions, 4), expected_pcl)  # partitions 0, 0, 1
    assert torch.equal(gcl_mask(positions, 1), ~torch.eye(6, dtype=torch.bool))
    expected_simclr = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(simclr_mask(positions[:2]), expected_simclr)


def test_each_method_gets_its_own_positives_with_its_settings():
    p, slices = torch.arange(1, 11) / 10, torch.full((10,), 10)  # one volume of N = 10
    assert torch.equal(positives_of("simclr")(p, slices), simclr_mask(p))
    assert torch.equal(positives_of("pcl", threshold=0.25)(p, slices), pcl_mask(p, 0.25))
    assert torch.equal(positives_of("gcl", partitions=4)(p, slices), gcl_mask(p, 4))  # balanced: 0-1, 2-4, 5-6, 7-9
    authors = positives_of("gcl", partitions=4, partition_rule="authors")(p, slices)  # 0-2, 3-5, 6-8, 9
    assert torch.equal(authors, gcl_mask(p, 4, slices)) and not torch.equal(authors, gcl_mask(p, 4))


def test_positive_top1_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = mask[2, 3] = mask[3, 2] = True
    # nearest others: 0 -> 1 (hit), 1 -> 0 (hit), 2 -> 1 (miss), 3 -> 2 (hit)
    assert positive_top1(z, mask).item() == pytest.approx(0.75)
    mask[3, 2] = False  # anchor 3 has no positive: excluded, 2 hits of 3
    assert positive_top1(z, mask).item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------
# Gradients, precision and numerical safety.
# ---------------------------------------------------------------------------------------------------
def test_gradients_match_finite_differences():
    z1, z2, positions = random_batch(3, 4, seed=21)
    for mask in (simclr_mask(positions), gcl_mask(positions, 2), pcl_mask(positions, 0.4)):
        assert torch.autograd.gradcheck(lambda z: contrastive_loss(z, mask, 0.2), torch.cat([z1, z2]).requires_grad_())


def test_autocast_bfloat16_gives_float32_loss():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    x, positions = torch.randn(12, 8), torch.rand(6) * 0.9 + 0.1
    mask = pcl_mask(positions, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        assert z.dtype == torch.bfloat16
        value = contrastive_loss(z, mask)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(contrastive_loss(z.float(), mask).item(), abs=1e-5)  # bf16 values, fp32 math
    assert value.item() == pytest.approx(contrastive_loss(layer(x), mask).item(), abs=2e-2)
    value.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_large_embeddings_and_tiny_tau_stay_finite():
    z1, z2, positions = random_batch(8, 16, seed=31)
    z = (torch.cat([z1, z2]).float() * 1e15).requires_grad_(True)
    for mask in (simclr_mask(positions), gcl_mask(positions), pcl_mask(positions, 0.3)):
        z.grad = None
        value = contrastive_loss(z, mask, tau=1e-4)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("separate_views", [False, True])
def test_a_contrastive_step_embeds_two_different_views_of_each_slice(separate_views):
    """contrastive_step equals the loss written out: two augmentations x1, x2 drawn in that order from the
    generator, differing from each other, embedded, rows i and i + B the two views of slice i."""
    from augment import AUGMENTATIONS, augment
    from losses import contrastive_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 8))  # no batch statistics
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    positions, slices = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.9], dtype=torch.float64), torch.full((5,), 10)
    positives = positives_of("pcl", threshold=0.15)
    g = torch.Generator().manual_seed(2)
    x1, x2 = augment(x, AUGMENTATIONS["upright"], g), augment(x, AUGMENTATIONS["upright"], g)  # (5, 1, 16, 16) each
    assert not torch.allclose(x1, x2)
    z1, z2 = model(x1), model(x2)  # (5, 8) each
    expected = contrastive_loss(torch.cat([z1, z2]), positives(positions, slices), 0.1)
    loss, _ = contrastive_step(model, x, positions, slices, torch.Generator().manual_seed(2), positives,
                               AUGMENTATIONS["upright"], 0.1, separate_views)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_contrastive_step_gives_gcl_each_slice_s_volume_size():
    """The authors' GCL rule needs N: slices 3 and 4 of a 10-slice volume (p = 0.3, 0.4) share the balanced
    partition (ceil(4p) - 1 = 1) but not the authors' (i // round_half_up(10 / 4): 0 and 1)."""
    from augment import AUGMENTATIONS, augment
    from losses import contrastive_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 8))
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    positions, slices = torch.tensor([0.3, 0.4, 0.8, 0.9], dtype=torch.float64), torch.full((4,), 10)
    g = torch.Generator().manual_seed(2)
    x1, x2 = augment(x, AUGMENTATIONS["upright"], g), augment(x, AUGMENTATIONS["upright"], g)
    z1, z2 = model(x1).detach(), model(x2).detach()
    authors = [min((round(p * 10) - 1) // round_half_up(10 / 4), 3) for p in positions.tolist()]  # [0, 1, 2, 2]
    expected = oracle_loss(z1, z2, lambda i, j: authors[i % 4] == authors[j % 4], 0.1)
    loss, _ = contrastive_step(model, x, positions, slices, torch.Generator().manual_seed(2),
                               positives_of("gcl", partition_rule="authors"), AUGMENTATIONS["upright"], 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(oracle_loss(z1, z2, gcl_rule(positions, 4), 0.1) - expected) > 1e-3  # the balanced parts differ


def test_a_threshold_of_zero_is_refused_where_it_would_leave_no_positive():
    with pytest.raises(AssertionError, match=r"^threshold must be > 0, got 0.0$"):
        pcl_mask(torch.tensor([0.1, 0.2], dtype=torch.float64), 0.0)


def test_the_authors_partitions_never_exceed_s_minus_1_for_any_volume_size():
    """min(i // round_half_up(N / S), S - 1) for every N up to 40: when N / S rounds down (N = 9, S = 4:
    parts of 2) the last slices would otherwise form an extra partition of their own."""
    for S in (2, 3, 4, 5):
        for N in range(1, 41):
            p = torch.arange(1, N + 1, dtype=torch.float64) / N
            expected = [min(i // max(round_half_up(N / S), 1), S - 1) for i in range(N)]
            assert gcl_partitions(p, S, torch.full((N,), N)).tolist() == expected, (S, N)


def test_a_contrastive_step_uses_its_own_temperature():
    """contrastive_step(..., tau) is the loss at that tau, not at the default 0.1."""
    from augment import AUGMENTATIONS, augment
    from losses import contrastive_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 8))
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    positions, slices = torch.tensor([0.1, 0.2, 0.5, 0.6], dtype=torch.float64), torch.full((4,), 10)
    positives = positives_of("pcl", threshold=0.15)
    g = torch.Generator().manual_seed(2)
    x1, x2 = augment(x, AUGMENTATIONS["upright"], g), augment(x, AUGMENTATIONS["upright"], g)
    z1, z2 = model(x1).detach(), model(x2).detach()
    mask = positives(positions, slices)
    expected = oracle_loss(z1, z2, lambda i, j: bool(mask[i, j]), 0.5)
    loss, _ = contrastive_step(model, x, positions, slices, torch.Generator().manual_seed(2), positives,
                               AUGMENTATIONS["upright"], 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(oracle_loss(z1, z2, lambda i, j: bool(mask[i, j]), 0.1) - expected) > 1e-3  # tau matters here


@pytest.mark.parametrize("separate_views", [False, True])
def test_separate_views_embeds_each_view_in_a_batch_of_its_own(separate_views):
    """--separate-views (the authors'): two forwards of B, so BatchNorm normalizes each view on its own;
    without it, one forward of 2B."""
    from augment import AUGMENTATIONS
    from losses import contrastive_step
    seen = []
    linear = torch.nn.Linear(16 * 16, 8)

    def model(x):
        seen.append(len(x))
        return linear(x.flatten(1))
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    positions, slices = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.9], dtype=torch.float64), torch.full((5,), 10)
    contrastive_step(model, x, positions, slices, torch.Generator().manual_seed(2), positives_of("pcl", threshold=0.15),
                     AUGMENTATIONS["upright"], 0.1, separate_views)
    assert seen == ([5, 5] if separate_views else [10])


def test_python_losses_py_prints_the_toy_batch_s_masks_as_counted_by_hand(capsys):
    """Positions 0.1 0.15 0.5 0.55 0.9 1.0: GCL parts ceil(4p) - 1 = 0 0 1 2 3 3; PCL (0.1) pairs 0.1-0.15 and
    0.5-0.55, never 0.9-1.0 (exactly 0.1 apart). Row a:0.50 (index 2): its neighbour 3 and both in view b, 8 and 9."""
    import losses
    losses.main()
    out = capsys.readouterr().out
    assert "at positions [0.1, 0.15, 0.5, 0.55, 0.9, 1.0], two views each" in out
    assert "GCL partitions (S = 4): [0, 0, 1, 2, 3, 3]" in out
    pcl = out.split("PCL, threshold = 0.1")[1].splitlines()
    assert pcl[4] == "a:0.50  2 " + " ".join(f"{v:>2}" for v in [0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    assert pcl[6] == "a:0.90  4 " + " ".join(f"{v:>2}" for v in [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])


def test_python_losses_py_prints_each_mask_s_own_loss(capsys):
    """The losses printed are contrastive_loss of the seeded random embeddings under each mask in turn, and
    log(2B - 1) = log 11 is the reference of identical embeddings."""
    import losses
    from losses import contrastive_loss, gcl_mask, pcl_mask, simclr_mask
    losses.main()
    out = capsys.readouterr().out
    assert "log(2B - 1) = 2.3979 is the loss" in out
    positions = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 1.0], dtype=torch.float64)
    torch.manual_seed(0)
    z = torch.randn(12, 128)
    printed = out.split("is the loss of identical embeddings):")[1].splitlines()[1:]
    for line, mask in zip(printed, (simclr_mask(positions), gcl_mask(positions, 4), pcl_mask(positions, 0.1))):
        assert float(line.split()[-1]) == pytest.approx(contrastive_loss(z, mask).item(), abs=1e-4)
    assert len({line.split()[-1] for line in printed}) == 3
