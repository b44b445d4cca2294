"""Incremental detokenization with stop strings, for rows whose text is needed while they
decode (streamed, or with stop strings).

Text is released in whole characters only: a token that ends inside a multi-byte UTF-8
character decodes to U+FFFD, so its bytes are held until a later token completes them (the
windowed decode vLLM uses). A stop string is matched on the decoded text across token
boundaries; the text is cut before it, and text that could still become one is held back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextTracker:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(stop)
        self.text = ""  # decoded so far (cut before a stop string once one is found)
        self.sent = 0  # characters of `text` released as deltas
        self.stopped = False
        self._prefix = 0  # tokens [_prefix, _read) decode to the tail of `text`
        self._read = 0

    def add(self, tokens: Sequence[int]) -> None:
        """`tokens` is the row's whole completion so far, one token longer than last time."""
        if self.stopped:
            return
        before = self._decode(tokens[self._prefix : self._read])
        after = self._decode(tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # an incomplete character: wait for its next bytes
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(tokens)
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self) -> str:
        """Text not released yet, less a tail that may turn out to begin a stop string."""
        end = len(self.text) if self.stopped else len(self.text) - self._held()
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def final(self, tokens: Sequence[int]) -> str:
        """The whole completion once the row is done; `take()` then releases the rest."""
        if not self.stopped:
            self.text = self._decode(tokens)  # flushes a character left incomplete at the end
            self.stopped = True
        return self.text

    def _held(self) -> int:
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
