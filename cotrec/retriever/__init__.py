"""The CRM-as-retriever: SASRec with a user token, trained under Ray Train (Table 1 of the paper).

- `sasrec.py`    the model (causal self-attention, tied item embeddings, optional user token)
- `data.py`      training windows (all positions per step) and leave-one-out queries
- `loss.py`      full softmax cross-entropy, sampled softmax with logQ correction
- `train.py`     the training loop under Ray Train's TorchTrainer (or in-process), early stopping
- `evaluate.py`  full ranking, history masking, Hit@K / NDCG@K, top-M candidates
- `variants.py`  user / item initialisation (none | random | preference x random | caption | description)
- `histories.py` the run's histories, read and stored once, and the training rows' Ray Datasets
- `stage.py`     the `train_variant` stage: one variant for one seed, its fingerprint and job
- `trained.py`   a trained variant's model and metrics, read back
- `grid.py`      the `retriever_grid` stage: Table 1 over seeds, with intervals
"""

from cotrec.retriever.grid import retriever_grid
from cotrec.retriever.stage import train_variant

__all__ = ["retriever_grid", "train_variant"]
