"""The sampler on its own: draws follow the distribution, truncation holds, seeds are per row."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from budrt.engine.interface import SamplingParams
from budrt.engine.sampler import Sampler

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0])


def rows(count: int, seed: int | None = None, **params: object) -> list[SimpleNamespace]:
    """Stand-ins for Sequence: what the sampler reads of one."""
    return [
        SimpleNamespace(
            params=SamplingParams(max_tokens=1, temperature=1.0, **params),
            generator=None if seed is None else torch.Generator().manual_seed(seed),
            output_token_ids=[],
            prompt_token_ids=[],
        )
        for _ in range(count)
    ]


def sample(sampler: Sampler, seqs: list[SimpleNamespace]) -> list[int]:
    logits = PROBS.log().expand(len(seqs), -1).clone()
    return sampler(logits, seqs).token_ids  # type: ignore[arg-type]


def test_draws_follow_the_distribution_and_never_pick_impossible_tokens() -> None:
    tokens = torch.tensor(sample(Sampler(None, seed=0), rows(20_000)))  # type: ignore[arg-type]
    freq = torch.bincount(tokens, minlength=len(PROBS)).float() / len(tokens)
    assert torch.allclose(freq, PROBS, atol=0.015), freq
    assert freq[4:].sum() == 0


def test_truncation_removes_the_tail() -> None:
    sampler = Sampler(None, seed=1)  # type: ignore[arg-type]
    assert set(sample(sampler, rows(2_000, top_k=2))) == {0, 1}
    assert set(sample(sampler, rows(2_000, top_p=0.7))) == {0, 1}  # 0.5 alone is below 0.7
    assert set(sample(sampler, rows(2_000, min_p=0.5))) == {0, 1}  # >= half the top probability


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch() -> None:
    alone_row, mixed_row = rows(1, seed=7), rows(1, seed=7)
    alone = [sample(Sampler(None), alone_row)[0] for _ in range(50)]  # type: ignore[arg-type]
    shared = Sampler(None)  # type: ignore[arg-type]
    # Each step a different number of unseeded rows before it and other seeded rows after it.
    mixed = [sample(shared, rows(k % 5) + mixed_row + rows(2, seed=k))[k % 5] for k in range(50)]
    assert mixed == alone
    assert len(set(alone)) > 1  # it really sampled


def test_windowed_nucleus_equals_a_full_sort() -> None:
    """The top-k/top-p cut tried on a window of the largest entries first gives exactly what
    sorting the whole vocabulary gives, for cuts inside the first window, the second and beyond."""
    torch.manual_seed(0)
    vocab = 49_152
    top_k = torch.tensor([vocab, 5, 300, 5000] * 2)
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.5, 0.99, 0.3, 1.0, 0.8])
    for scale in (0.1, 1.0, 3.0, 10.0):  # flat to peaked: nuclei of ~40k down to a few tokens
        probs = torch.softmax(torch.randn(len(top_k), vocab) * scale, dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        drop = torch.arange(vocab).unsqueeze(0) >= top_k.unsqueeze(1)
        drop |= ordered.cumsum(dim=-1) - ordered >= top_p.unsqueeze(1) * ordered.sum(dim=-1, keepdim=True)
        drop[:, 0] = False
        expected = probs.scatter(1, order, ordered.masked_fill(drop, 0.0))
        assert torch.equal(Sampler._nucleus(probs, top_k, top_p), expected), scale
