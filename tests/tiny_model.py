"""A two-layer Llama with the embedded model's tokenizer and a LoRA adapter for it: the merge's,
the fine-tune's and the served ranker's code paths on a model of a few MB (random weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

from cotrec.llm.embedded import resolve_model


def make_tiny_base(folder: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    embedded = resolve_model("embedded")
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         vocab_size=len(tokenizer), tie_word_embeddings=True,
                                         pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copy(Path(embedded) / "chat_template.jinja", Path(folder) / "chat_template.jinja")
    return str(folder)


def tiny_adapter(base: str, folder: Path) -> str:
    """A LoRA adapter whose B is not zero, so it moves the letter probabilities."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    return str(folder)
