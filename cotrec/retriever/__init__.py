"""The CRM-as-retriever: SASRec with a user token, trained under Ray Train (Table 1 of the paper).

- `sasrec.py`    the model (causal self-attention, tied item embeddings, optional user token)
- `data.py`      training windows (all positions per step) and leave-one-out queries
- `loss.py`      full softmax cross-entropy, sampled softmax with logQ correction
- `train.py`     the training loop under Ray Train's TorchTrainer (or in-process), early stopping
- `evaluate.py`  full ranking, history masking, Hit@K / NDCG@K, top-M candidates
- `variants.py`  user / item initialisation (none | random | preference x random | caption | description)
- `stage.py`     `train_variant` and `retriever_grid` stages, Table 1 report
"""

from cotrec.retriever.stage import (format_grid_summary, format_train_summary, retriever_grid,
                                    train_variant)

__all__ = ["format_grid_summary", "format_train_summary", "retriever_grid", "train_variant"]
