"""Runs the model: builds each forward's inputs and attention context from the sequences."""

from __future__ import annotations

import torch

from budrt.engine.kv_cache import KVCache
from budrt.engine.llama import AttentionContext, LlamaForCausalLM
from budrt.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Run a whole prompt into the sequence's slot; the logits `[1, vocab]` of its last token."""
        assert seq.slot is not None
        ids = torch.tensor([seq.prompt_token_ids], dtype=torch.long)
        length = ids.shape[1]
        ctx = AttentionContext(
            is_prefill=True,
            slots=torch.tensor([seq.slot]),
            positions=torch.arange(length).unsqueeze(0),
            kv_len=length,
        )
        return self.model(ids, ctx, self.cache)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token at its own position; logits `[B, vocab]`."""
        ids = torch.tensor([[s.last_token_id] for s in seqs], dtype=torch.long)
        positions = torch.tensor([s.num_tokens - 1 for s in seqs], dtype=torch.long)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long)
        kv_len = int(positions.max()) + 1
        mask = None
        if len(seqs) > 1:
            # Row b sees its own cache entries 0..positions[b]; the rest of the slice is stale.
            mask = (torch.arange(kv_len).unsqueeze(0) <= positions.unsqueeze(1))[:, None, None, :]
        packed = bool(torch.equal(slots, torch.arange(len(seqs))))
        ctx = AttentionContext(
            is_prefill=False,
            slots=slots,
            positions=positions.unsqueeze(1),
            kv_len=kv_len,
            mask=mask,
            packed=packed,
        )
        return self.model(ids, ctx, self.cache)
