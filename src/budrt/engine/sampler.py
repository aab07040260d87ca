"""Pick the next token of every sequence in a batch from its logits, each with its own params.

Everything is vectorized over the batch except what is inherently per request: logit_bias (sparse),
and the random noise of seeded requests (each has its own torch.Generator).

Sampling inverts each row's cumulative distribution at one uniform draw. The draw for a row is
independent of every other row, so a seeded request consumes exactly one draw per step from its
own generator whatever else is in the batch, and its output is reproducible across batch mixes.
(An "exponential race", argmax(p / E) with E ~ Exp(1) per vocabulary entry, needs 49k random
draws per row and step for SmolLM2: 1.8 ms per step at one row, 106 ms at 64, against 0.1 and
2.3 ms for the inversion; `bench/sampler_bench.py`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from budrt.engine import kernels
from budrt.engine.grammar import apply_masks
from budrt.engine.interface import Tokenizer, TokenLogprob
from budrt.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, tokenizer: Tokenizer, seed: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.generator = torch.Generator()  # unseeded requests share this one
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], masks: tuple[list[int], torch.Tensor] | None = None
    ) -> SampleResult:
        """`masks`: the rows a grammar constrains and their allowed tokens (`engine.grammar`),
        applied after penalties and bias so that nothing can bring a forbidden token back."""
        # Sampling runs on the CPU (per-request generators are CPU ones; the runner hands over CPU
        # logits, so this is a no-op there) whatever device the model ran on.
        logits = logits.float().cpu()
        logits = self._apply_penalties(logits, seqs)
        for i, seq in enumerate(seqs):
            if seq.params.logit_bias:
                ids = torch.tensor(list(seq.params.logit_bias.keys()), dtype=torch.long)
                logits[i, ids] += torch.tensor(list(seq.params.logit_bias.values()), dtype=logits.dtype)
        if masks is not None:
            apply_masks(logits, *masks)

        temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
        greedy = temps <= 1e-5
        # The first index of each row's maximum (NaN wins), in vector lanes (csrc/argmax.cpp);
        # torch's max().indices gives the same where the kernel is not built.
        tokens = kernels.argmax_rows(logits)
        if tokens is None:
            tokens = logits.max(dim=-1).indices
        if not bool(greedy.all()):
            probs = torch.softmax(logits / torch.where(greedy, 1.0, temps).unsqueeze(1), dim=-1)
            probs = self._truncate(probs, seqs)
            sampled = self._invert(probs, self._uniforms(seqs, greedy))
            tokens = torch.where(greedy, tokens, sampled)
        token_ids = tokens.tolist()
        return SampleResult(token_ids, self._logprobs(logits, token_ids, seqs))

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Repetition (prompt + output tokens), presence and frequency (output tokens) penalties."""
        rows = [
            i
            for i, s in enumerate(seqs)
            if s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
        ]
        if not rows:
            return logits
        vocab = logits.shape[1]
        sub = logits[rows]
        counts = torch.zeros((len(rows), vocab), dtype=torch.float32)
        seen = torch.zeros((len(rows), vocab), dtype=torch.bool)
        for j, i in enumerate(rows):
            out = seqs[i].output_token_ids
            if out:
                counts[j].index_add_(0, torch.tensor(out), torch.ones(len(out)))
            seen[j, torch.tensor(seqs[i].prompt_token_ids)] = True
        seen |= counts > 0
        rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows]).unsqueeze(1)
        # Like transformers/vLLM: shrink positive logits, push negative ones further down.
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows]).unsqueeze(1)
        pres = torch.tensor([seqs[i].params.presence_penalty for i in rows]).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[rows] = sub
        return logits

    @staticmethod
    def _truncate(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Zero out tokens outside min_p, top_k and top_p (in that order, as vLLM does)."""
        vocab = probs.shape[1]
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs])
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32)
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32)
        if bool((min_p > 0).any()):
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        rows = ((top_k < vocab) | (top_p < 1.0)).nonzero().squeeze(1)
        if len(rows) == 0:
            return probs
        return probs.index_copy(0, rows, Sampler._nucleus(probs[rows], top_k[rows], top_p[rows]))

    @staticmethod
    def _nucleus(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Each row keeps its `top_k` most likely tokens, and of those the smallest prefix whose
        mass reaches `top_p` of the row's total (the first token always stays).

        Sorting the whole vocabulary costs ~5 ms a row (49k entries); the cut usually falls
        within the first few hundred tokens, so each row is first tried on a window of its
        largest entries (`topk`), and only rows whose cut lies beyond it get a wider one. A cut
        inside the window is final: both rules drop every rank after their first drop."""
        vocab = probs.shape[1]
        total = probs.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(probs)
        pending = torch.arange(probs.shape[0])
        for width in (256, 4096, vocab):
            width = min(width, vocab)
            if width < vocab:
                values, order = probs[pending].topk(width, dim=-1)
            else:
                values, order = probs[pending].sort(dim=-1, descending=True)
            ranks = torch.arange(width).unsqueeze(0)
            mass_before = values.cumsum(dim=-1) - values
            drop = (ranks >= top_k[pending].unsqueeze(1)) | (
                mass_before >= top_p[pending].unsqueeze(1) * total[pending]
            )
            drop[:, 0] = False
            settled = drop.any(dim=-1) if width < vocab else torch.ones(len(pending), dtype=torch.bool)
            done = pending[settled]
            kept = values[settled].masked_fill(drop[settled], 0.0)
            out[done] = torch.zeros((len(done), vocab), dtype=probs.dtype).scatter(1, order[settled], kept)
            pending = pending[~settled]
            if len(pending) == 0:
                break
        return out

    def _uniforms(self, seqs: list[Sequence], greedy: torch.Tensor) -> torch.Tensor:
        """One U[0, 1) draw per sampling row: from the request's own generator if it has a seed,
        else from the shared one; greedy rows draw nothing."""
        draws = torch.zeros(len(seqs), dtype=torch.float64)
        shared = [i for i, s in enumerate(seqs) if s.generator is None and not bool(greedy[i])]
        if shared:
            draws[shared] = torch.rand(len(shared), dtype=torch.float64, generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None and not bool(greedy[i]):
                draws[i] = torch.rand(1, dtype=torch.float64, generator=seq.generator)[0]
        return draws

    @staticmethod
    def _invert(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The token of each row whose cumulative-probability interval holds `draw x row total`.
        The fp32 running sum never decreases, so zero-probability tokens (truncated away) have
        empty intervals and are never chosen; its rounding (~1e-5 of the total over 49k terms)
        only shifts interval edges, and the target scales with the same sum."""
        cdf = probs.float().cumsum(dim=-1)
        target = (draws.float() * cdf[:, -1]).unsqueeze(1)
        chosen = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return chosen.clamp_(max=probs.shape[1] - 1)

    def _logprobs(
        self, logits: torch.Tensor, token_ids: list[int], seqs: list[Sequence]
    ) -> list[TokenLogprob | None]:
        """Log-probabilities of the model's distribution (after penalties and bias, before
        temperature and truncation), as vLLM reports them."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return result
        logp = torch.log_softmax(logits[rows], dim=-1)
        max_top = max(seqs[i].params.logprobs or 0 for i in rows)
        top_vals, top_ids = logp.topk(max_top, dim=-1) if max_top else (None, None)
        for j, i in enumerate(rows):
            token = token_ids[i]
            n = seqs[i].params.logprobs or 0
            top: list[tuple[int, str, float]] = []
            if n and top_ids is not None and top_vals is not None:
                ids, vals = top_ids[j, :n].tolist(), top_vals[j, :n].tolist()
                top = [(t, self._text(t), v) for t, v in zip(ids, vals, strict=True)]
            result[i] = TokenLogprob(token, self._text(token), float(logp[j, token]), top)
        return result

    def _text(self, token_id: int) -> str:
        token_text = getattr(self.tokenizer, "token_text", None)
        if token_text is not None:
            return token_text(token_id)
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
