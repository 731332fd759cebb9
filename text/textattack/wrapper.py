"""The model wrapper TextAttack queries: batched, eval-mode, padded per batch."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from samat.common.attacks import eval_mode


class BatchedModelWrapper:
    """A TextAttack model wrapper for ``transformers`` classifiers that is fast where the stock
    ``HuggingFaceModelWrapper`` is slow: it queries in eval mode under ``inference_mode``, pads each batch only
    to its longest member (the stock wrapper pads every query to ``model_max_length``, 512 for BERT), and sorts
    queries by length so batches hold similar lengths.

    ``__call__(texts)`` takes a list of strings (or of ``(text, text_pair)`` tuples for sentence pairs) and
    returns logits, a float32 CPU tensor ``(N, K)``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 128, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def _encode(self, texts: Sequence[Any]) -> dict:
        if texts and isinstance(texts[0], tuple):
            first, second = [t[0] for t in texts], [t[1] for t in texts]
            enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        else:
            enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    def __call__(self, text_input_list: Sequence[Any]) -> torch.Tensor:
        n = len(text_input_list)
        if n == 0:
            return torch.empty(0, 0)
        lengths = [sum(len(part) for part in t) if isinstance(t, tuple) else len(t) for t in text_input_list]
        order = sorted(range(n), key=lambda i: lengths[i])
        out: list[Optional[torch.Tensor]] = [None] * n
        with eval_mode(self.model), torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                logits = self.model(**self._encode([text_input_list[i] for i in idx])).logits.float().cpu()
                for row, i in enumerate(idx):
                    out[i] = logits[row]
        return torch.stack(out)  # type: ignore[arg-type]

    def get_grad(self, text_input: Any) -> dict:
        """Gradient of the loss w.r.t. the input word embeddings, in eval mode (gradient-based recipes such as
        A2T's word-importance ranking). Returns ``{"ids": (L,) list, "gradient": (L, D) ndarray}``."""
        outputs: list[torch.Tensor] = []
        handle = self.model.get_input_embeddings().register_forward_hook(lambda m, i, out: outputs.append(out))
        try:
            with eval_mode(self.model), torch.enable_grad():
                enc = self._encode([text_input])
                logits = self.model(**enc).logits
                loss = torch.nn.functional.cross_entropy(logits, logits.argmax(dim=1))
                # autograd.grad w.r.t. the embedding output only: parameters' .grad stay untouched.
                (grad,) = torch.autograd.grad(loss, outputs[0])
        finally:
            handle.remove()
        return {"ids": enc["input_ids"][0].tolist(), "gradient": grad[0].cpu().numpy()}

    def _tokenize(self, inputs: Sequence[Any]) -> list[list[str]]:
        """Tokens of each input, without special tokens (used by TextAttack's gradient WIR)."""
        return [self.tokenizer.convert_ids_to_tokens(self.tokenizer(x, add_special_tokens=False)["input_ids"])
                for x in inputs]
