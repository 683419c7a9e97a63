"""LLM-as-Ranker: a LlamaRec-style ranker that orders a retriever's top-M candidates.

- `prompts`: the ranking prompt (llm, llm+, llm++), candidates labelled A, B, C, ...
- `lists`: the candidate lists of a retriever variant with the history, preference and key terms
  each prompt shows, and the seeded order the candidates are shown in.
- `finetune`: the LoRA + DeepSpeed recipe under Ray Train, then merging the adapter.
- `letters`: ranking by the probabilities of the index letters (one forward step per list).
- `mapb`: NDCG over all users and MAPB, the mean absolute position bias.
- `stage`: `ranker train`, `ranker eval`, `ranker grid` (Table 2).
"""
