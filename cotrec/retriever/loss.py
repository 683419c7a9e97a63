"""Training losses: cross-entropy over all items, or sampled softmax with logQ correction.

Full softmax (the authors' choice) scores every position against the whole item table. Its cost
grows with the catalogue; for millions of items we instead score each position against its own
target and a shared set of sampled negatives. Sampling from a proposal Q (popularity by default)
biases the softmax towards frequent items; subtracting log(expected count of the item in the
sample) from each sampled negative's logit ("logQ correction", Bengio & Senecal 2008; Yi et al.
2019) turns the sampled sum into an importance-sampling estimate of the rest of the partition
function, so the loss converges to the full softmax cross-entropy as negatives grow. The target
itself is scored exactly (not corrected: correcting a rare target by its tiny Q would make it
look easy), and negatives that happen to equal a row's target ("accidental hits") are masked out
for that row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def full_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with a target. targets: shifted ids (0 = none)."""
    keep = targets > 0
    logits = hidden[keep] @ table.T
    return F.cross_entropy(logits, targets[keep] - 1)


class SampledSoftmax:
    """Shared negatives per step, drawn from Q with replacement, logQ-corrected."""

    def __init__(self, counts: np.ndarray, negatives: int, sampler: str = "popularity", logq: bool = True):
        q = counts.astype(np.float64) + 1.0 if sampler == "popularity" else np.ones(len(counts))
        self.q = torch.tensor(q / q.sum(), dtype=torch.float32)
        self.negatives = negatives
        self.logq = logq          # False only to show what the correction is for (tests)

    def __call__(self, hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        keep = targets > 0
        h, pos = hidden[keep], targets[keep] - 1                       # (n, d), (n,)
        # drawn where the generator lives (a CPU one for the training's seeded stream), used on h's device
        sample_on = generator.device if generator is not None else h.device
        neg = torch.multinomial(self.q.to(sample_on), self.negatives, replacement=True,
                                generator=generator).to(h.device)
        q = self.q.to(h.device)
        log_expected = torch.log(q * self.negatives)                    # log of E[count in sample]
        if not self.logq:
            log_expected = torch.zeros_like(log_expected)
        pos_logit = (h * table[pos]).sum(-1)                          # the target is scored exactly
        neg_logit = h @ table[neg].T - log_expected[neg]                # (n, negatives)
        neg_logit = neg_logit.masked_fill(neg[None, :] == pos[:, None], float("-inf"))
        logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=h.device))
