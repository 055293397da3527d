"""The three contrastive losses of the paper: SimCLR, GCL and PCL.

All three are the same supervised-contrastive "L_out" loss; they differ only in which pairs count as
positives. For a batch of B slices we have two augmented views, projected to z1, z2: (B, D).

    z = cat(normalize(z1), normalize(z2))                      # (2B, D); rows i and i+B: same slice
    s_ij = z_i . z_j / tau                                      # cosine similarity over temperature
    l_ip = s_ip - log( sum over a != i of exp(s_ia) )           # log-probability of p among all others
    loss_i = - mean over p in P(i) of l_ip
    loss = mean of loss_i over the anchors i whose P(i) is not empty

Positives P(i) of anchor i (never i itself):
    SimCLR: the other view of the same slice.
    GCL:    every j with partition(p_j) == partition(p_i), where
            partition(p) = min(ceil(p * S) - 1, S - 1) splits positions (0, 1] into S equal parts.
    PCL:    every j with abs(p_j - p_i) < threshold (so the other view of slice i is always one).

The authors' code multiplies the loss by a constant tau / 0.07 (about 1.43 for tau = 0.1). It changes
nothing but the scale of the gradient, so it is omitted here: our loss is exactly the equation above.

The last section holds the losses of the paper's two other baselines: Rotation (4-way cross-entropy)
and PIRL (two NCE terms against a memory bank of momentum-averaged representations).
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# Input checks: one-line ValueErrors instead of silent broadcasting or NaN.
# ---------------------------------------------------------------------------------------------------
def _check_views(z1, z2):
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")


def _check_positions(positions, B):
    if positions.shape != (B,):
        raise ValueError(f"positions must have shape ({B},) to match z1, got {tuple(positions.shape)}")
    if not ((positions > 0) & (positions <= 1)).all():
        raise ValueError(f"positions must lie in (0, 1], got min {positions.min().item():.4g} "
                         f"and max {positions.max().item():.4g}")


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------------
# Positive masks over the 2B embeddings of cat(z1, z2): mask[i, j] is True when j is in P(i).
# ---------------------------------------------------------------------------------------------------
def simclr_mask(B, device=None):
    """SimCLR positives: (2B, 2B) bool mask, True only at (i, i + B) and (i + B, i)."""
    same_slice = torch.eye(B, dtype=torch.bool, device=device).repeat(2, 2)  # (2B, 2B), diagonal True
    return same_slice & ~torch.eye(2 * B, dtype=torch.bool, device=device)


def gcl_partitions(positions, partitions=4):
    """Partition index of each slice: min(ceil(p * S) - 1, S - 1), a long tensor of shape (B,).

    For p = (i + 1) / N with N a multiple of S this is the paper's i // (N / S).
    """
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be an integer >= 1, got {partitions!r}")
    # p * S is computed in float64; the tiny tolerance keeps a boundary like p = 1/3 (rounded up in
    # float32) in its own partition. It only matters for slices within 1e-6 of a boundary.
    scaled = positions.double() * partitions - 1e-6 * partitions  # (B,)
    return (torch.ceil(scaled).long() - 1).clamp(0, partitions - 1)  # (B,)


def gcl_mask(positions, partitions=4):
    """GCL positives: (2B, 2B) bool mask, True where both embeddings share a partition (j != i)."""
    part = gcl_partitions(positions, partitions).repeat(2)  # (2B,)
    same = part[:, None] == part[None, :]  # (2B, 2B)
    return same & ~torch.eye(len(part), dtype=torch.bool, device=positions.device)


def pcl_mask(positions, threshold=0.1):
    """PCL positives: (2B, 2B) bool mask, True where abs(p_j - p_i) < threshold (j != i)."""
    _check_positive("threshold", threshold)
    p = positions.repeat(2)  # (2B,)
    close = (p[:, None] - p[None, :]).abs() < threshold  # (2B, 2B)
    return close & ~torch.eye(len(p), dtype=torch.bool, device=positions.device)


def positive_mask(method, positions, partitions=4, threshold=0.1):
    """The (2B, 2B) positive mask of `method` in {"simclr", "gcl", "pcl"} for slices at `positions`."""
    if method == "simclr":
        return simclr_mask(len(positions), device=positions.device)
    if method == "gcl":
        return gcl_mask(positions, partitions)
    if method == "pcl":
        return pcl_mask(positions, threshold)
    raise ValueError(f"unknown contrastive method {method!r}; expected 'simclr', 'gcl' or 'pcl'")


# ---------------------------------------------------------------------------------------------------
# The loss itself.
# ---------------------------------------------------------------------------------------------------
def _check_mask(z, positive_mask):
    N = z.shape[0]
    if z.dim() != 2 or positive_mask.shape != (N, N) or positive_mask.dtype != torch.bool:
        raise ValueError(f"need z (N, D) and a bool positive_mask (N, N), got z {tuple(z.shape)} "
                         f"and mask {tuple(positive_mask.shape)} of {positive_mask.dtype}")
    if positive_mask.diagonal().any():
        raise ValueError("positive_mask must be False on its diagonal: an anchor is not its own positive")


def _similarities(z, tau):
    """s = z_i . z_j / tau of the L2-normalized rows, self-pairs set to -inf: (N, N), >= float32."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # half precision -> float32; float64 kept
    z = F.normalize(z, dim=1)  # (N, D), unit rows (a zero row stays zero)
    sim = z @ z.T / tau  # (N, N)
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)  # (N, N)
    return sim.masked_fill(self_pair, float("-inf"))  # (N, N); exp(-inf) = 0 drops a = i from sums


def contrastive_loss(z, positive_mask, tau=0.1):
    """Supervised-contrastive "L_out" loss of N embeddings z: (N, D) with positives positive_mask: (N, N).

        s_ij = z_i . z_j / tau  (z L2-normalized)
        l_ip = s_ip - log( sum over a != i of exp(s_ia) )
        loss_i = - mean over p in P(i) of l_ip,   P(i) = { j : positive_mask[i, j] }
        loss = mean of loss_i over anchors with P(i) not empty

    No tau / 0.07 factor in front (the authors' code has one). Computed in float32 (float64 inputs
    stay float64) even under torch.autocast; log-sum-exp keeps it finite for any tau > 0.
    Raises ValueError if no anchor has a positive, instead of returning NaN.
    """
    _check_mask(z, positive_mask)
    _check_positive("tau", tau)
    positive_mask = positive_mask.to(z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        sim = _similarities(z, tau)  # (N, N)
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (N, N): l_ij, -inf on diagonal
        n_pos = positive_mask.sum(dim=1)  # (N,): |P(i)|
        has_pos = n_pos > 0  # (N,)
        if not has_pos.any():
            raise ValueError("no anchor has a positive: the loss is undefined (check positions/threshold)")
        # Sum l_ip over positives only; masked_fill (not a product) so 0 * -inf never makes a NaN.
        pos_sum = log_prob.masked_fill(~positive_mask, 0.0).sum(dim=1)  # (N,)
        loss_i = -pos_sum[has_pos] / n_pos[has_pos]  # (number of anchors with positives,)
        return loss_i.mean()


@torch.no_grad()
def positive_top1(z, positive_mask):
    """Positive-pair accuracy: the fraction of anchors (with P(i) not empty) whose most similar other
    embedding (highest cosine similarity, self excluded) is one of its positives. A float in [0, 1]."""
    _check_mask(z, positive_mask)
    positive_mask = positive_mask.to(z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        nearest = _similarities(z, 1.0).argmax(dim=1)  # (N,): index of the nearest other embedding
    hit = positive_mask.gather(1, nearest[:, None]).squeeze(1)  # (N,): is it a positive?
    has_pos = positive_mask.any(dim=1)  # (N,)
    if not has_pos.any():
        raise ValueError("no anchor has a positive: positive-pair accuracy is undefined")
    return hit[has_pos].float().mean().item()


# ---------------------------------------------------------------------------------------------------
# The three methods: build the mask, call contrastive_loss on cat(z1, z2).
# ---------------------------------------------------------------------------------------------------
def simclr_loss(z1, z2, tau=0.1):
    """SimCLR: the L_out loss with P(i) = {the other view of the same slice}. z1, z2: (B, D)."""
    _check_views(z1, z2)
    z = torch.cat([z1, z2])  # (2B, D)
    return contrastive_loss(z, simclr_mask(len(z1), device=z.device), tau)


def gcl_loss(z1, z2, positions, tau=0.1, partitions=4):
    """GCL: the L_out loss with P(i) = {j != i : partition(j) == partition(i)},
    partition(p) = min(ceil(p * S) - 1, S - 1), S = partitions. positions: (B,) in (0, 1]."""
    _check_views(z1, z2)
    _check_positions(positions, len(z1))
    z = torch.cat([z1, z2])  # (2B, D)
    return contrastive_loss(z, gcl_mask(positions, partitions), tau)


def pcl_loss(z1, z2, positions, tau=0.1, threshold=0.1):
    """PCL: the L_out loss with P(i) = {j != i : abs(p_j - p_i) < threshold}. positions: (B,) in (0, 1]."""
    _check_views(z1, z2)
    _check_positions(positions, len(z1))
    z = torch.cat([z1, z2])  # (2B, D)
    return contrastive_loss(z, pcl_mask(positions, threshold), tau)


# ---------------------------------------------------------------------------------------------------
# The other pretext tasks: Rotation (Gidaris et al. 2018) and PIRL (Misra and van der Maaten 2020).
# Their inputs are made in augment.py (rotate_batch, jigsaw).
# ---------------------------------------------------------------------------------------------------
def rotation_loss(logits, labels):
    """Rotation: loss = mean over i of -log softmax(logits_i)[k_i], logits (B, 4), k (B,) in 0..3."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (B, 4) and labels (B,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def top1(logits, targets):
    """Fraction of rows whose largest logit is at the target column (ties: the first one). A float."""
    return (logits.argmax(dim=1) == targets).float().mean().item()


def nce_logits(v, memory, indices, negatives, tau=0.07):
    """s(v_i, m) / tau for each anchor i against its own bank entry m_{I_i} (column 0) and the drawn
    negatives m_n, n in `negatives` (columns 1..K); a negative that is the anchor's own entry is -inf.
    v (B, D), memory (N, D), indices (B,) and negatives (K,) rows of the bank -> (B, 1 + K), >= float32."""
    if v.dim() != 2 or memory.dim() != 2 or v.shape[1] != memory.shape[1] or indices.shape != v.shape[:1]:
        raise ValueError(f"need v (B, D), memory (N, D) and indices (B,), got {tuple(v.shape)}, "
                         f"{tuple(memory.shape)} and {tuple(indices.shape)}")
    _check_positive("tau", tau)
    v = F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=1)  # (B, D)
    positive = F.normalize(memory[indices].to(v.dtype), dim=1)  # (B, D): m_I
    negative = F.normalize(memory[negatives].to(v.dtype), dim=1)  # (K, D): m_I'
    logits = torch.cat([(v * positive).sum(dim=1, keepdim=True), v @ negative.T], dim=1) / tau  # (B, 1 + K)
    own = torch.cat([torch.zeros_like(indices[:, None], dtype=torch.bool),
                     negatives[None, :] == indices[:, None]], dim=1)  # (B, 1 + K)
    return logits.masked_fill(own, float("-inf"))


def pirl_loss(v_img, v_jig, memory, indices, negatives, tau=0.07, lam=0.5):
    """PIRL's loss in the InfoNCE form of common reimplementations (the paper's h is a binary NCE):

        s(v, m) = cosine similarity;  N(I) = the drawn negatives, I itself left out
        L_NCE(m_I, v) = -log( exp(s(v, m_I) / tau)
                              / (exp(s(v, m_I) / tau) + sum over I' in N(I) of exp(s(v, m_I') / tau)) )
        L = mean over the batch of  lam * L_NCE(m_I, g(v_It)) + (1 - lam) * L_NCE(m_I, f(v_I))

    v_img = f(v_I) and v_jig = g(v_It): (B, D); memory (N, D), the bank m (no gradient flows into it);
    indices (B,): each slice's row in the bank; negatives (K,): bank rows. PIRL: tau 0.07, lam 0.5.
    Computed in float32 (float64 stays float64) even under torch.autocast."""
    if v_img.shape != v_jig.shape:
        raise ValueError(f"v_img and v_jig must have one shape, got {tuple(v_img.shape)} "
                         f"and {tuple(v_jig.shape)}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    memory = memory.detach()
    with torch.autocast(device_type=v_img.device.type, enabled=False):
        target = torch.zeros_like(indices)  # (B,): the positive is column 0
        jig = F.cross_entropy(nce_logits(v_jig, memory, indices, negatives, tau), target)
        img = F.cross_entropy(nce_logits(v_img, memory, indices, negatives, tau), target)
        return lam * jig + (1 - lam) * img


@torch.no_grad()
def update_memory(memory, indices, v, momentum=0.5):
    """PIRL's bank update, in place: m_I <- normalize(momentum * m_I + (1 - momentum) * normalize(f(v_I)))
    for the rows `indices` (B,) (distinct) of memory (N, D), with v = f(v_I): (B, D). PIRL: momentum 0.5."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if len(indices.unique()) != len(indices):
        raise ValueError("indices must be distinct: one bank row is updated once per step")
    v = F.normalize(v.to(memory.dtype), dim=1)  # (B, D)
    memory[indices] = F.normalize(momentum * memory[indices] + (1 - momentum) * v, dim=1)  # (B, D) rows


# ---------------------------------------------------------------------------------------------------
# `python losses.py`: show the three positive masks on a toy batch, and the three losses.
# ---------------------------------------------------------------------------------------------------
def _print_mask(title, mask, labels):
    print(f"\n{title}  (row = anchor i, column = j; 1 = j is in P(i))")
    print(" " * 9 + " ".join(f"{k:>2}" for k in range(len(labels))))
    for k, (label, row) in enumerate(zip(labels, mask.tolist())):
        print(f"{label:>6} {k:>2} " + " ".join(f"{int(v):>2}" for v in row))


def main():
    positions = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 1.0])
    B, partitions, threshold = len(positions), 4, 0.1
    labels = [f"{view}:{p:.2f}" for view in ("a", "b") for p in positions.tolist()]  # view a = z1, b = z2
    shown = ", ".join(f"{p:.2f}" for p in positions.tolist())
    print(f"toy batch: B = {B} slices at positions [{shown}], two views each (rows 0..{B - 1} "
          f"are z1, rows {B}..{2 * B - 1} are z2)")
    print(f"GCL partitions (S = {partitions}): {gcl_partitions(positions, partitions).tolist()}")
    _print_mask("SimCLR", simclr_mask(B), labels)
    _print_mask(f"GCL, S = {partitions}", gcl_mask(positions, partitions), labels)
    _print_mask(f"PCL, threshold = {threshold}", pcl_mask(positions, threshold), labels)

    torch.manual_seed(0)
    z1, z2 = torch.randn(B, 128), torch.randn(B, 128)  # random projections of the two views
    print(f"\nlosses of random embeddings (tau = 0.1; log(2B - 1) = "
          f"{torch.log(torch.tensor(2.0 * B - 1)).item():.4f} is the loss of identical embeddings):")
    print(f"  SimCLR {simclr_loss(z1, z2).item():.4f}")
    print(f"  GCL    {gcl_loss(z1, z2, positions, partitions=partitions).item():.4f}")
    print(f"  PCL    {pcl_loss(z1, z2, positions, threshold=threshold).item():.4f}")


if __name__ == "__main__":
    main()
