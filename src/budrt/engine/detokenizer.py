"""Token ids -> text increments, safe for UTF-8 and for stop strings.

Byte-level BPE can split one character across tokens, so decoding a single new token may give a
broken "\ufffd". We keep two offsets into the generated ids (the prefix-offset scheme of vLLM/TGI):
text is only taken once decoding `ids[prefix:]` is longer than decoding `ids[prefix:read]` and does
not end in "\ufffd".

Stop strings may also span tokens. Text that could still turn out to be the start of a stop string
is held back until it cannot; a matched stop string and everything after it is dropped. Both checks
follow each stop string with a Knuth-Morris-Pratt automaton fed each new character once, so a step
costs O(new text) whatever the stop strings' lengths (rescanning a long stop string's prefixes at
every step was quadratic in its length and slowed every sequence sharing the engine's steps).
"""

from __future__ import annotations

from budrt.engine.interface import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self.ids: list[int] = []
        self.text = ""  # all complete text so far (cut at a matched stop string)
        self.stopped = False  # a stop string matched
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0  # len(text) already handed out

    def add_token(self, token_id: int) -> None:
        """Feed one generated token; afterwards `stopped` says whether a stop string matched."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return  # an incomplete character (or a skipped special token): wait for more tokens
        self._append(full[len(prefix) :])
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)

    def _append(self, delta: str) -> None:
        before = len(self.text)
        self.text += delta
        # Each matcher stops at its stop string's first occurrence; the earliest-starting one wins.
        hits = [i for i in (m.feed(self.text, before) for m in self._matchers) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def flush(self) -> None:
        """At the end of generation, take any text still waiting for more bytes.

        A trailing incomplete character (the generation ended inside it) is not a character, so
        it is dropped rather than emitted as "\ufffd".
        """
        if self.stopped or self._read_offset == len(self.ids):
            return
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset :]).rstrip(REPLACEMENT)
        if len(full) > len(prefix):
            self._append(full[len(prefix) :])
        self._prefix_offset = self._read_offset = len(self.ids)

    def take(self, final: bool) -> str:
        """Text not handed out yet, minus a tail that may still become a stop string (unless final)."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._partial_stop_len()
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        return max((m.state for m in self._matchers), default=0)


class _StopMatcher:
    """Knuth-Morris-Pratt for one stop string over a text that only grows.

    `state` is the length of the longest prefix of the stop string that ends the text fed so far.
    Each character costs amortized O(1), so the work is linear in the text, not in len(stop)**2.
    """

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        # fail[k]: the longest proper prefix of stop[: k + 1] that is also its suffix.
        self.fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, text: str, start: int) -> int:
        """Advance over `text[start:]`; where the first complete match starts, or -1."""
        stop, fail, k = self.stop, self.fail, self.state
        for i in range(start, len(text)):
            char = text[i]
            while k and stop[k] != char:
                k = fail[k - 1]
            if stop[k] == char:
                k += 1
            if k == len(stop):
                self.state = fail[k - 1]
                return i + 1 - k
        self.state = k
        return -1
