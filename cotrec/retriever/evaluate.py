"""Leave-one-out evaluation: full ranking over all items, history masked, Hit@K / NDCG@K, top-M.

The target's rank is the number of items scored strictly higher than it (0 = first). With
history masking on (the default, as in the authors' code), every item the user saw before the
target scores -inf; a target that is itself in the history can then not be found and counts as a
miss (rank = number of items). Candidates are the top-M items after masking.
"""

from __future__ import annotations

import numpy as np
import torch

from cotrec.retriever.sasrec import SASRec


@torch.no_grad()
def score_queries(model: SASRec, queries: dict[str, np.ndarray], rows: np.ndarray, mask_history: bool,
                  top_m: int, batch_size: int = 1024,
                  device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Ranks of the targets and the top-M (items, scores) for the query rows `rows`."""
    model.eval()
    table = model.item_table()
    num_items = table.shape[0]
    ranks, top_items, top_scores = [], [], []
    indptr, indices = queries["seen_indptr"], queries["seen_indices"]
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        items = torch.as_tensor(queries["items"][batch], device=device)
        lengths = torch.as_tensor(queries["lengths"][batch], device=device)
        users = torch.as_tensor(queries["users"][batch], device=device)
        h = model.last_hidden(items, lengths, users if model.user_emb is not None else None)
        scores = h @ table.T                                            # (b, items)
        targets = torch.as_tensor(queries["targets"][batch], device=device)
        if mask_history:
            row_of = np.repeat(np.arange(len(batch)), indptr[batch + 1] - indptr[batch])
            cols = np.concatenate([indices[indptr[u]:indptr[u + 1]] for u in batch]) if len(batch) else []
            scores[torch.as_tensor(row_of, device=device), torch.as_tensor(cols, device=device, dtype=torch.long)] = float("-inf")
        target_score = scores.gather(1, targets[:, None])
        rank = (scores > target_score).sum(1)
        rank = torch.where(torch.isinf(target_score[:, 0]), torch.full_like(rank, num_items), rank)
        best = scores.topk(min(top_m, num_items), dim=1)
        ranks.append(rank.cpu().numpy())
        top_items.append(best.indices.cpu().numpy())
        top_scores.append(best.values.float().cpu().numpy())
    return {"ranks": np.concatenate(ranks), "top_items": np.concatenate(top_items),
            "top_scores": np.concatenate(top_scores)}
