"""Byte-level BPE with the paper's pre-tokenization regex (METHOD.md section 2).

The regex lets a run of punctuation absorb a trailing newline, so tokens such as `("`, `]\n` and
`],` can be learned. Strings the task suite needs as single tokens but the corpus makes too rarely
(`]]\n` on the standard library) are added as extra BPE merges of lowest priority: the regex split is
untouched, the rest of the vocabulary keeps its learned order, and the vocabulary keeps its size by
dropping as many of the rarest learned merges. The end-of-text token is the last id.
"""

import hashlib
import json
from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.errors import DataError

PRETOKENIZE_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOT_TOKEN = "<|endoftext|>"
NUM_BYTE_TOKENS = 256
Merge = tuple[str, str]


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the paper's pre-tokenization."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    texts: Sequence[str], *, vocab_size: int, required_tokens: Sequence[str], progress: bool = True
) -> Tokenizer:
    """Train on `texts`; the result has exactly `vocab_size` ids, end-of-text last."""
    tokenizer = new_tokenizer()
    pieces = [_single_pretoken(tokenizer, s) for s in required_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    state = json.loads(tokenizer.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in state["model"]["merges"]]
    alphabet = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])][:NUM_BYTE_TOKENS]
    if len(alphabet) + len(merges) < vocab_size - 1:
        raise DataError(
            f"data.vocab_size: the corpus supports only {len(alphabet) + len(merges) + 1} tokens, "
            f"asked for {vocab_size}; lower data.vocab_size or add sources"
        )
    merges = _merges_with_required(alphabet, merges, pieces, budget=vocab_size - 1)
    state["model"]["vocab"] = _vocab_from_merges(alphabet, merges)
    state["model"]["merges"] = [list(m) for m in merges]
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.add_special_tokens([EOT_TOKEN])
    _check_trained(tokenizer, vocab_size, required_tokens)
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(EOT_TOKEN)


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _single_pretoken(tokenizer: Tokenizer, text: str) -> str:
    """The byte-level form of `text`, which the regex must keep as one piece."""
    parts = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    if len(parts) != 1:
        raise DataError(
            f"data.required_tokens: {text!r} is split by the pre-tokenization regex into "
            f"{len(parts)} pieces, so it can never be one token"
        )
    return parts[0]


def _merges_with_required(
    alphabet: list[str], merges: list[Merge], pieces: list[str], *, budget: int
) -> list[Merge]:
    """Drop the k rarest merges, append chain merges for `pieces`, refill up to `budget` tokens."""
    dropped = 0
    while True:
        kept = merges[: len(merges) - dropped]
        chain = _chain_merges(alphabet, kept, pieces)
        if len(chain) <= dropped:
            break
        dropped = len(chain)
    result = list(kept) + chain
    vocab = set(alphabet) | {a + b for a, b in result}
    for a, b in merges[len(merges) - dropped :]:
        if len(vocab) >= budget:
            break
        if a in vocab and b in vocab and a + b not in vocab:
            result.append((a, b))
            vocab.add(a + b)
    assert len(vocab) == budget, (len(vocab), budget)
    return result


def _chain_merges(alphabet: list[str], merges: list[Merge], pieces: list[str]) -> list[Merge]:
    """Merges that fuse each required piece from its current tokenization, left to right."""
    chain: list[Merge] = []
    for piece in pieces:
        bpe = models.BPE(_vocab_from_merges(alphabet, merges + chain), list(merges + chain))
        parts = [t.value for t in bpe.tokenize(piece)]
        current = parts[0]
        for part in parts[1:]:
            chain.append((current, part))
            current += part
    return chain


def _vocab_from_merges(alphabet: list[str], merges: list[Merge]) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def _check_trained(tokenizer: Tokenizer, vocab_size: int, required_tokens: Sequence[str]) -> None:
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    assert eot_id(tokenizer) == vocab_size - 1
    for text in required_tokens:
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) == 1, text
