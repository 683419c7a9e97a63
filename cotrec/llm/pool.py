"""One engine at a time, reused while consecutive users ask for the same model.

A machine may hold one engine only (a CPU, one GPU); a grid of evaluations over several
fine-tuned models starts each model's engine once when same-model jobs come back to back.
"""

from __future__ import annotations

from cotrec.config import LLMConfig
from cotrec.llm import make_engine
from cotrec.llm.base import LLMEngine
from cotrec.progress import log


class EnginePool:
    """`model` is the (model, dtype) whose engine is held, None when none is."""

    def __init__(self, config: LLMConfig):
        self.config, self.model, self.engine = config, None, None

    def get(self, model: str, dtype: str | None = None) -> LLMEngine:
        """The engine of `model` (in `dtype` rather than the configured one, when given)."""
        key = (model, dtype)
        if self.model != key:
            self.close()
            log(f"starting {self.config.backend} on {model}" + (f" in {dtype}" if dtype else ""))
            update = {"model": model, **({"dtype": dtype} if dtype else {})}
            self.engine, self.model = make_engine(self.config.model_copy(update=update)), key
        return self.engine  # type: ignore[return-value]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.model = None, None
