"""Encode & Map: texts -> sentence encoder -> scikit-learn reduction to the SASRec width -> L2 norm.

- `encoder.py` loads the sentence encoder and encodes texts in batches with progress.
- `mapping.py` fits the reduction ("Map") and normalises rows.
- `texts.py` builds the texts: item caption, caption + description, user preference per horizon.
- `stage.py` the `embed` stage: one staged folder per text kind under `<run>/embed/`.
"""

from cotrec.embed.stage import EMBED_KINDS, embed, format_summary, load_embedding

__all__ = ["EMBED_KINDS", "embed", "format_summary", "load_embedding"]
