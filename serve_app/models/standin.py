"""Stand-in checkpoints: the real GPT-2 architecture of a named size with random weights.

The hub is not always reachable (air-gapped machines, CI), yet the serving path (batching,
KV cache, multiplexing, memory and latency at the real size) should still be exercised at
full fidelity. A stand-in is exactly the GPT-2 graph of the configured size, with weights
drawn from a seed and a byte-level BPE tokenizer trained locally on a generated corpus, so
it is reproducible bit for bit on any machine without a download.

Each stand-in is built once into a directory under `root` that `from_pretrained` loads
offline. Builders in several processes (Ray replicas) serialise on a `flock` and publish
with an atomic rename, so a reader never sees a half-written directory.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve_app.errors import ModelUnavailableError

logger = logging.getLogger("ray.serve").getChild(__name__)

STANDIN_VERSION = 2
"""Bump whenever the recipe (corpus, tokenizer training, weight init) changes: it is part of
every stand-in's directory name and revision, so stale builds and cache entries are not
reused."""

INIT_STD = 0.2
"""Weight init std of stand-ins. GPT-2's own 0.02 makes a random model's residual stream
little more than the input embedding; with tied embeddings greedy decoding then just echoes the
last prompt token ("fox fox fox"), for every seed. At 0.2 the text depends on the context and the
seed, so tests comparing outputs (determinism, batching, model switching) can actually fail."""

EOS_TOKEN = "<|endoftext|>"
MARKER_FILE = "standin.json"

ARCHITECTURES: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=4096),
}
"""`GPT2Config` keyword arguments of each stand-in size (the published GPT-2 shapes)."""


def architecture_config(arch: str, n_layer: int | None = None) -> dict:
    """The `GPT2Config` kwargs of `arch`, with the layer count overridden by `n_layer`."""
    if arch not in ARCHITECTURES:
        raise ModelUnavailableError(
            f"unknown stand-in architecture {arch!r}; known: {sorted(ARCHITECTURES)}",
            architecture=arch,
        )
    if n_layer is not None and n_layer < 1:
        raise ModelUnavailableError(f"n_layer must be >= 1, got {n_layer}", n_layer=n_layer)
    kwargs = dict(ARCHITECTURES[arch])
    if n_layer is not None:
        kwargs["n_layer"] = n_layer
    return kwargs


def standin_revision(arch: str, seed: int, n_layer: int | None) -> str:
    """The weights identity of a stand-in, e.g. `standin-v1:gpt2:s0:L12` (used in cache keys)."""
    layers = architecture_config(arch, n_layer)["n_layer"]
    return f"standin-v{STANDIN_VERSION}:{arch}:s{seed}:L{layers}"


def standin_path(arch: str, seed: int, n_layer: int | None, root: Path) -> Path:
    """Where `ensure_standin` puts (or finds) this stand-in; nothing is built."""
    if seed < 0:
        raise ModelUnavailableError(f"seed must be >= 0, got {seed}", seed=seed)
    layers = architecture_config(arch, n_layer)["n_layer"]
    return Path(root) / f"standin-v{STANDIN_VERSION}-{arch}-s{seed}-L{layers}"


def ensure_standin(arch: str, seed: int, n_layer: int | None, root: Path) -> Path:
    """Return a directory loadable by `GPT2LMHeadModel`/`AutoTokenizer.from_pretrained`,
    building it first if needed (safe to call from many processes at once)."""
    root = Path(root)
    target = standin_path(arch, seed, n_layer, root)
    revision = standin_revision(arch, seed, n_layer)
    if _is_complete(target, revision):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / ".locks" / f"{target.name}.lock"):
        if _is_complete(target, revision):  # another process built it while we waited
            return target
        started = time.perf_counter()
        _build_standin(arch, seed, n_layer, root, target, revision)
        logger.info(
            "built stand-in %s in %.1f s at %s", revision, time.perf_counter() - started, target
        )
    return target


def ensure_tokenizer(vocab_size: int, root: Path) -> Path:
    """Return the directory of the byte-level BPE tokenizer with at most `vocab_size` ids,
    training it on first use. Shared by every stand-in of that vocabulary under `root`."""
    root = Path(root)
    target = root / "tokenizers" / f"bpe-v{STANDIN_VERSION}-{vocab_size}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / ".locks" / f"{target.name}.lock"):
        if (target / "tokenizer.json").is_file():
            return target
        _remove_stale_temp_dirs(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            started = time.perf_counter()
            tokenizer = train_tokenizer(vocab_size)
            tokenizer.save_pretrained(tmp)
            _publish(tmp, target)
            logger.info(
                "trained stand-in tokenizer (%d ids, asked %d) in %.1f s",
                len(tokenizer),
                vocab_size,
                time.perf_counter() - started,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_tokenizer(vocab_size: int):
    """Train GPT-2's kind of tokenizer (byte-level BPE, `<|endoftext|>` as bos/eos/unk/pad)
    on the generated corpus; returns a `PreTrainedTokenizerFast` with <= `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generate_corpus(vocab_size), trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:  # would index past the embedding matrix
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} ids > {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # decode(encode(x)) == x: never rewrite " ," to "," and the like.
        clean_up_tokenization_spaces=False,
    )


# --- the generated corpus ------------------------------------------------------------------

_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v",
    "w", "y", "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "ph", "pl", "pr",
    "sc", "sh", "sk", "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "tw", "wh", "wr",
)  # fmt: skip
_NUCLEI = (
    "a", "e", "i", "o", "u", "y", "ai", "au", "ea", "ee", "ei", "ie", "oa", "oo", "ou", "oi",
)  # fmt: skip
_CODAS = (
    "", "", "", "b", "ck", "d", "ff", "g", "l", "ll", "m", "n", "nd", "ng", "nk", "nt", "p",
    "r", "rd", "rn", "rt", "s", "sh", "ss", "st", "t", "th", "x", "ct", "ft", "lt", "mp", "ps",
    "ts",
)  # fmt: skip
_COMMON_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run don't while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile
river car feet care second book carry took science eat room friend began idea fish mountain
stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green oh quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane dry
wonder laugh thousand ago ran check game shape hot miss brought heat snow tire bring yes
distant fill east paint language among model server request response token cache batch hello
quick brown fox jumps lazy I'm it's can't won't isn't didn't you're we're they're
""".split()
_END_PUNCTUATION = ".....?!;:"
_CORPUS_SEED = 20240917  # fixed: the tokenizer depends on the vocabulary size only


def generate_corpus(vocab_size: int) -> Iterator[str]:
    """Deterministic pseudo-English paragraphs for tokenizer training (no download).

    Words are built from syllables and drawn with a Zipf-like law, mixed with real common
    English words, capitalisation, punctuation, numbers and line breaks, so BPE learns the
    same kinds of merges it learns on web text. The lexicon grows with `vocab_size` so that
    training can reach the requested size (every lexicon word also appears once, in a glossary,
    which gives the rare-word merges that fill a 50k vocabulary)."""
    rng = random.Random(_CORPUS_SEED + vocab_size)
    lexicon = _lexicon(rng, max(3000, int(vocab_size * 2.4)))
    cum_weights = list(
        itertools.accumulate(1.0 / (rank + 2.7) ** 1.07 for rank in range(len(lexicon)))
    )
    n_words = max(100_000, vocab_size * 20)
    chunk = 20_000
    sentence: list[str] = []
    paragraph: list[str] = []
    for _ in range(0, n_words, chunk):
        for word in rng.choices(lexicon, cum_weights=cum_weights, k=chunk):
            roll = rng.random()
            if not sentence or roll < 0.02:  # sentence start, or a proper noun
                word = word[:1].upper() + word[1:]
            elif roll > 0.995:
                word = str(rng.randint(0, 10 ** rng.randint(1, 5)))
            sentence.append(word)
            if 0.02 <= roll < 0.08:
                sentence[-1] += ","
            elif len(sentence) > 4 and roll > 0.88:
                sentence[-1] += rng.choice(_END_PUNCTUATION)
                paragraph.append(" ".join(sentence))
                sentence = []
                if rng.random() < 0.2:
                    yield " ".join(paragraph) + rng.choice(("\n", "\n\n"))
                    paragraph = []
    if paragraph:
        yield " ".join(paragraph)
    for start in range(0, len(lexicon), 12):
        yield " ".join(lexicon[start : start + 12]) + "."
    for _ in range(n_words // 200):
        yield (
            f'In {rng.randint(1800, 2030)} "{rng.choice(lexicon)}" had '
            f"{rng.randint(0, 10 ** rng.randint(1, 6))} ({rng.randint(1, 99)}%) - "
            f"{rng.choice(lexicon)}'s {rng.choice(lexicon)}."
        )


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words = dict.fromkeys(_COMMON_WORDS)  # ordered set: deterministic, unlike set()
    while len(words) < size:
        n_syllables = rng.choices((1, 2, 3, 4), weights=(3, 5, 3, 1))[0]
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(n_syllables)
        )
        words.setdefault(word)
    return list(words)


# --- building ------------------------------------------------------------------------------


def _build_standin(
    arch: str, seed: int, n_layer: int | None, root: Path, target: Path, revision: str
) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    kwargs = architecture_config(arch, n_layer)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        ensure_tokenizer(kwargs["vocab_size"], root), local_files_only=True
    )
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    tokenizer.model_max_length = kwargs["n_positions"]

    _remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        tokenizer.save_pretrained(tmp)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(seed)
            config = GPT2Config(
                **kwargs, initializer_range=INIT_STD, bos_token_id=eos_id, eos_token_id=eos_id
            )
            model = GPT2LMHeadModel(config)
        model.save_pretrained(tmp)  # safetensors: the only format in transformers 5
        marker = {
            "arch": arch,
            "seed": seed,
            "n_layer": kwargs["n_layer"],
            "version": STANDIN_VERSION,
            "revision": revision,
            "tokenizer_vocab_size": len(tokenizer),
            "model_vocab_size": kwargs["vocab_size"],
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")  # last: complete
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(target: Path, revision: str) -> bool:
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("revision") == revision


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished build into place (callers hold the target's lock)."""
    for path in tmp.iterdir():  # make the data durable before the rename makes it visible
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    if target.exists():  # an incomplete leftover (e.g. copied by hand): replace it
        shutil.rmtree(target)
    os.replace(tmp, target)


def _remove_stale_temp_dirs(target: Path) -> None:
    # Builders of `target` hold its lock, so any temp dir of it seen now is a crash's leftover.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


__all__ = [
    "ARCHITECTURES",
    "STANDIN_VERSION",
    "architecture_config",
    "ensure_standin",
    "ensure_tokenizer",
    "generate_corpus",
    "standin_path",
    "standin_revision",
    "train_tokenizer",
]
