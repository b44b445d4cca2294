"""Incremental detokenization: whole characters only, stop strings across token boundaries."""

from serve_app.generation.detokenize import TextTracker

# A byte-level toy tokenizer: each token is some bytes; decoding joins them like a BPE decoder
# does, turning an incomplete UTF-8 sequence into U+FFFD.
VOCAB = {i: bytes([i]) for i in range(256)}


def decode(tokens) -> str:
    return b"".join(VOCAB[t] for t in tokens).decode("utf-8", errors="replace")


def feed(tracker: TextTracker, data: bytes) -> list[str]:
    tokens, deltas = [], []
    for byte in data:
        tokens.append(byte)
        tracker.add(tokens)
        deltas.append(tracker.take())
    return deltas


def test_multibyte_characters_are_released_whole():
    tracker = TextTracker(decode)
    deltas = feed(tracker, "a€b☃".encode())
    assert "".join(deltas) == "a€b☃"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1:3] == ["", ""]  # the first two bytes of € are held


def test_a_stop_string_across_tokens_cuts_the_text_before_it():
    tracker = TextTracker(decode, stop=["\nUser:"])
    deltas = feed(tracker, b"Hi there.\nUser: more")
    assert tracker.stopped and tracker.text == "Hi there."
    assert "".join(deltas) == "Hi there."  # nothing of the stop string was ever released


def test_a_possible_stop_prefix_is_held_then_released():
    tracker = TextTracker(decode, stop=["END"])
    deltas = feed(tracker, b"aEN")
    assert "".join(deltas) == "a"  # "EN" may become "END"
    tracker.add(list(b"aENd"))
    assert tracker.take() == "ENd" and not tracker.stopped


def test_the_earliest_of_several_stops_wins():
    tracker = TextTracker(decode, stop=["xyz", "b"])
    feed(tracker, b"abcxyz")
    assert tracker.text == "a"


def test_final_flushes_what_was_held():
    tracker = TextTracker(decode, stop=["END"])
    tokens = list(b"okEN")
    feed(tracker, bytes(tokens))
    assert tracker.final(tokens) == "okEN"
    assert tracker.take() == "EN"
