"""Oracle tests of losses.py: a plain loop over anchors, closed forms, equivalences, invariances."""
import itertools
import math

import pytest
import torch

from losses import (contrastive_loss, gcl_loss, gcl_mask, gcl_partitions, pcl_loss, pcl_mask,
                    positive_mask, positive_top1, simclr_loss, simclr_mask)


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


CASES = list(itertools.product([1, 2, 5, 9], [3, 16], [0.05, 0.1, 0.7]))  # (B, D, tau)


# ---------------------------------------------------------------------------------------------------
# Each loss against the oracle.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,D,tau", CASES)
def test_simclr_matches_oracle(B, D, tau):
    z1, z2, _ = random_batch(B, D, seed=B * 100 + D)
    expected = oracle_loss(z1, z2, simclr_rule(B), tau)
    assert simclr_loss(z1, z2, tau=tau).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("B,D,tau", CASES)
@pytest.mark.parametrize("partitions", [1, 2, 3, 4])
def test_gcl_matches_oracle(B, D, tau, partitions):
    z1, z2, positions = random_batch(B, D, seed=B * 100 + D + 1)
    expected = oracle_loss(z1, z2, gcl_rule(positions, partitions), tau)
    got = gcl_loss(z1, z2, positions, tau=tau, partitions=partitions).item()
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("B,D,tau", CASES)
@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.35, 0.8])
def test_pcl_matches_oracle(B, D, tau, threshold):
    z1, z2, positions = random_batch(B, D, seed=B * 100 + D + 2)
    expected = oracle_loss(z1, z2, pcl_rule(positions, threshold), tau)
    got = pcl_loss(z1, z2, positions, tau=tau, threshold=threshold).item()
    assert got == pytest.approx(expected, abs=1e-5)


def test_float32_inputs_match_oracle():
    z1, z2, positions = random_batch(8, 32, seed=7)
    got = pcl_loss(z1.float(), z2.float(), positions.float(), tau=0.1, threshold=0.3)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(oracle_loss(z1, z2, pcl_rule(positions, 0.3), 0.1), abs=1e-4)


def test_anchors_without_positives_are_excluded():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 6, generator=g) < 0.4
    mask.fill_diagonal_(False)
    mask[0] = False  # anchor 0 has no positive
    mask[1] = False
    mask[1, 4] = True  # anchor 1 has exactly one
    expected = oracle_loss(z[:3], z[3:], lambda i, j: bool(mask[i, j]), 0.2)
    assert contrastive_loss(z, mask, 0.2).item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Closed forms and equivalences between the methods.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2, 7])
def test_identical_embeddings_give_log_2b_minus_1(B):
    z = torch.tensor([[0.3, -1.2, 2.0]]).repeat(B, 1)  # (B, 3), every embedding the same
    positions = torch.linspace(0.1, 1.0, B)
    expected = math.log(2 * B - 1)
    assert simclr_loss(z, z.clone(), tau=0.1).item() == pytest.approx(expected, abs=1e-5)
    assert gcl_loss(z, z.clone(), positions).item() == pytest.approx(expected, abs=1e-5)
    assert pcl_loss(z, z.clone(), positions).item() == pytest.approx(expected, abs=1e-5)
    assert simclr_loss(0 * z, 0 * z).item() == pytest.approx(expected, abs=1e-5)  # zero vectors too


def test_hand_computed_orthogonal_case():
    # views identical, slices orthogonal: anchor e1 sees e1 (s = 1), e2, e2 (s = 0) with tau = 1
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert simclr_loss(z, z.clone(), tau=1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-12)
    assert simclr_loss(z[:1], z[1:], tau=0.5).item() == pytest.approx(0.0, abs=1e-12)  # B = 1: only term


def test_pcl_with_tiny_threshold_equals_simclr():
    z1, z2, positions = random_batch(9, 8, seed=11)
    assert pcl_loss(z1, z2, positions, threshold=1e-9).item() == pytest.approx(
        simclr_loss(z1, z2).item(), abs=1e-10)


def test_pcl_wide_threshold_and_one_partition_gcl_equal_all_positives():
    z1, z2, positions = random_batch(9, 8, seed=12)
    all_positives = ~torch.eye(18, dtype=torch.bool)
    expected = contrastive_loss(torch.cat([z1, z2]), all_positives, 0.1).item()
    assert expected == pytest.approx(oracle_loss(z1, z2, lambda i, j: True, 0.1), abs=1e-5)
    assert pcl_loss(z1, z2, positions, threshold=1.5).item() == pytest.approx(expected, abs=1e-10)
    assert gcl_loss(z1, z2, positions, partitions=1).item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("method", ["simclr", "gcl", "pcl"])
def test_invariant_to_permuting_the_batch_and_swapping_views(method):
    z1, z2, positions = random_batch(10, 6, seed=13)
    loss = {"simclr": lambda a, b, p: simclr_loss(a, b),
            "gcl": lambda a, b, p: gcl_loss(a, b, p),
            "pcl": lambda a, b, p: pcl_loss(a, b, p, threshold=0.3)}[method]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    reference = loss(z1, z2, positions).item()
    assert loss(z1[perm], z2[perm], positions[perm]).item() == pytest.approx(reference, abs=1e-10)
    assert loss(z2, z1, positions).item() == pytest.approx(reference, abs=1e-10)


# ---------------------------------------------------------------------------------------------------
# Masks and the GCL partition formula.
# ---------------------------------------------------------------------------------------------------
def test_gcl_partitions_match_paper_index_formula():
    def round_half_up(x):
        return math.floor(x + 0.5)
    for N in [4, 8, 12, 16, 40, 100, 128, 332]:
        p = torch.arange(1, N + 1, dtype=torch.float32) / N  # p = (i + 1) / N
        paper = [min(i // round_half_up(N / 4), 3) for i in range(N)]
        assert gcl_partitions(p, 4).tolist() == paper, N
    p = torch.arange(1, 13, dtype=torch.float32) / 12  # S = 3: 1/3 and 2/3 are rounded in float32
    assert gcl_partitions(p, 3).tolist() == [i // 4 for i in range(12)]
    assert gcl_partitions(torch.tensor([0.1, 0.25, 0.26, 0.5, 0.75, 1.0]), 4).tolist() == [0, 0, 1, 1, 2, 3]


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
    assert torch.equal(simclr_mask(2), expected_simclr)
    assert torch.equal(positive_mask("simclr", positions[:2]), expected_simclr)
    assert torch.equal(positive_mask("pcl", positions, threshold=0.1), expected_pcl)


def test_positive_top1_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = mask[2, 3] = mask[3, 2] = True
    # nearest others: 0 -> 1 (hit), 1 -> 0 (hit), 2 -> 1 (miss), 3 -> 2 (hit)
    assert positive_top1(z, mask) == pytest.approx(0.75)
    mask[3, 2] = False  # anchor 3 has no positive: excluded, 2 hits of 3
    assert positive_top1(z, mask) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------
# Gradients, precision and numerical safety.
# ---------------------------------------------------------------------------------------------------
def test_gradients_match_finite_differences():
    z1, z2, positions = random_batch(3, 4, seed=21)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: simclr_loss(a, b, tau=0.2), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: gcl_loss(a, b, positions, tau=0.2, partitions=2), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: pcl_loss(a, b, positions, tau=0.2, threshold=0.4), (z1, z2))


def test_autocast_bfloat16_gives_float32_loss():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    x1, x2, positions = torch.randn(6, 8), torch.randn(6, 8), torch.rand(6) * 0.9 + 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x1), layer(x2)
        assert z1.dtype == torch.bfloat16
        loss = pcl_loss(z1, z2, positions, threshold=0.3)
    assert loss.dtype == torch.float32
    same_inputs = pcl_loss(z1.float(), z2.float(), positions, threshold=0.3)  # bf16 values, float32 math
    assert loss.item() == pytest.approx(same_inputs.item(), abs=1e-5)
    full_float32 = pcl_loss(layer(x1), layer(x2), positions, threshold=0.3)
    assert loss.item() == pytest.approx(full_float32.item(), abs=2e-2)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_large_embeddings_and_tiny_tau_stay_finite():
    z1, z2, positions = random_batch(8, 16, seed=31)
    z1 = (z1.float() * 1e15).requires_grad_(True)
    z2 = (z2.float() * 1e15).requires_grad_(True)
    for loss in [simclr_loss(z1, z2, tau=1e-4), gcl_loss(z1, z2, positions.float(), tau=1e-4),
                 pcl_loss(z1, z2, positions.float(), tau=1e-4, threshold=0.3)]:
        z1.grad = z2.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


# ---------------------------------------------------------------------------------------------------
# Clear errors.
# ---------------------------------------------------------------------------------------------------
def test_no_positive_at_all_raises():
    with pytest.raises(ValueError, match="no anchor has a positive"):
        contrastive_loss(torch.randn(4, 3), torch.zeros(4, 4, dtype=torch.bool), 0.1)


def test_invalid_inputs_raise():
    z, positions = torch.randn(4, 3), torch.tensor([0.1, 0.4, 0.7, 1.0])
    with pytest.raises(ValueError, match="diagonal"):
        contrastive_loss(z, torch.ones(4, 4, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="bool positive_mask"):
        contrastive_loss(z, torch.ones(3, 3, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="z1 and z2"):
        simclr_loss(z, torch.randn(4, 5))
    with pytest.raises(ValueError, match="tau"):
        simclr_loss(z, z, tau=0.0)
    with pytest.raises(ValueError, match=r"positions must have shape \(4,\)"):
        pcl_loss(z, z, positions[:3])
    for bad in [0.0, -0.2, 1.5]:
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            gcl_loss(z, z, torch.tensor([0.1, 0.4, bad, 1.0]))
    for bad in [0, 2.5, True]:
        with pytest.raises(ValueError, match="partitions"):
            gcl_loss(z, z, positions, partitions=bad)
    with pytest.raises(ValueError, match="threshold"):
        pcl_loss(z, z, positions, threshold=0.0)
    with pytest.raises(ValueError, match="unknown contrastive method"):
        positive_mask("byol", positions)
