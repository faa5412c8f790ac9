"""Tokens to text as they come: what may be sent now, and whether a stop string has appeared.

Each call decodes every token so far and sends the new suffix: a tokenizer may merge bytes or
spaces across tokens, so decoding one token at a time would not add up to the whole text. Two
things are held back until the next token says more: a trailing U+FFFD (an incomplete UTF-8
sequence the next byte token completes) and a suffix that could be the start of a stop string
(sent, it could not be taken back when the stop string completes). The streamed deltas therefore
concatenate to exactly the text a non-streamed response returns.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """One choice's text: feed tokens with ``add``; ``flush`` when the request has finished."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""   # the whole text so far (cut at a stop string once one appears)
        self.sent = 0    # characters of ``text`` handed out

    def add(self, token: int) -> tuple[str, bool]:
        """Take one token; the text that may be sent now, and whether a stop string ended the text."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at()
        if cut is not None:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        return self._take(self._safe_end()), False

    def flush(self) -> str:
        """The rest of the text, held-back characters included: the request produced its last token."""
        return self._take(len(self.text))

    def _stop_at(self) -> int | None:
        """Where the earliest stop string starts in the text, or None."""
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """How much of the text cannot change or turn out to be part of a stop string."""
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == REPLACEMENT:
            end -= 1
        return end - max((self._stop_prefix(stop, end) for stop in self.stop), default=0)

    def _stop_prefix(self, stop: str, end: int) -> int:
        """Length of the longest unsent suffix of ``text[:end]`` that ``stop`` begins with."""
        for k in range(min(len(stop) - 1, end - self.sent), 0, -1):
            if self.text[end - k:end] == stop[:k]:
                return k
        return 0

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta
