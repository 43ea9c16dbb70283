"""WordPiece tokenizer for reports: train one with ``tokenizers`` or load an existing tokenizers JSON.

Reports are encoded as ``[CLS] pieces... [SEP]`` (at most ``max_tokens``), with a word-start flag on the
first piece of every pre-tokenised word (so ``##`` pieces follow their word under whole-word masking).
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from mrm_scale.formats.files import sha256_bytes
from mrm_scale.formats.tokenizer import (
    CLS, HF_SPECIAL_TOKENS, SEP, SPECIAL_TOKENS, TOKENIZER_FILE, UNK, TokenizerIdentity, id_field,
)

PLACEHOLDERS = ("___", "xxxx")  # de-identification placeholders, one token each (after lower-casing)


MOSTLY_UNKNOWN = 0.5  # a report with more than this share of [UNK] pieces is "mostly unknown"


class TokenizerError(ValueError):
    pass


def train_wordpiece(reports: list[str], vocab_size: int) -> Tokenizer:
    """Train a lower-casing WordPiece vocabulary on ``reports`` (deterministic for the same input). Accents and
    non-Latin scripts are kept (NFC, no accent stripping): ``derrame`` and ``pleural`` of a Spanish report, or a
    Cyrillic word, are pieces of their own, not ``[UNK]`` or another word."""
    tok = Tokenizer(WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                               show_progress=False)
    tok.train_from_iterator(reports, trainer=trainer, length=len(reports))
    tok = _canonical_ids(tok, reports)
    missing = [p for p in PLACEHOLDERS if tok.token_to_id(p) is None]
    if missing:
        tok.add_tokens([AddedToken(p, single_word=True, normalized=True) for p in missing])
    return tok


def _canonical_ids(tok: Tokenizer, reports: list[str]) -> Tokenizer:
    """Make a trained vocabulary reproducible: keep the single characters (plain and ``##``) and the pieces
    the training reports actually use, numbered in a fixed order (specials first, then sorted pieces).

    The trainer breaks ties between equally frequent merges in hash-map order, so intermediate pieces and
    ids change from run to run while the pieces that encode the corpus do not — whenever ``vocab_size``
    covers the corpus. (When it does not, ties at the budget's edge can still swap a few pieces between
    runs: prep keeps the ``tokenizer.json`` it wrote and reuses it on re-runs; ``--tokenizer PATH`` pins one.)
    """
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    used = {t for enc in tok.encode_batch(reports, add_special_tokens=False) for t in enc.tokens}
    keep = {t for t in vocab if t in used or len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    rest = sorted((t for t in keep if t not in SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), t))
    spec["model"]["vocab"] = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])}
    spec["added_tokens"] = [dict(a, id=spec["model"]["vocab"][a["content"]]) for a in spec["added_tokens"]]
    return Tokenizer.from_str(json.dumps(spec))


def special_ids(tok: Tokenizer, origin: str) -> dict[str, int]:
    ids = {}
    for name in SPECIAL_TOKENS:
        i = tok.token_to_id(name)
        if i is None:
            raise TokenizerError(
                f"{origin}: tokenizer has no {name} token; MRM needs {', '.join(SPECIAL_TOKENS)} "
                "(train one with --tokenizer train)")
        ids[id_field(name)] = i
    return ids


def load_tokenizer(path: str) -> tuple[Tokenizer, list[str]]:
    """Load a tokenizers JSON file; special tokens it lacks are appended (returned as the second value).

    (The original MRM WordPiece vocabulary, for one, has no ``[SEP]``.)
    """
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: tokenizer file not found; pass --tokenizer train or a tokenizers JSON file")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise TokenizerError(f"{path}: not a Hugging Face tokenizers JSON file ({e})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    special_ids(tok, path)
    return tok, missing


def tokenizer_info(tok: Tokenizer, data: bytes, origin: str) -> dict:
    """The manifest's ``tokenizer`` entry (:class:`~mrm_scale.formats.tokenizer.TokenizerIdentity`)."""
    return TokenizerIdentity(vocab_size=tok.get_vocab_size(with_added_tokens=True), sha256=sha256_bytes(data),
                             file=TOKENIZER_FILE, **special_ids(tok, origin)).to_dict()


def encode_reports(tok: Tokenizer, reports: list[str], max_tokens: int) -> list[tuple[list[int], list[bool], int]]:
    """Tokenise reports: ``(ids, word_start, n_pieces_before_truncation)`` each, ``[CLS] ... [SEP]``."""
    ids_ = special_ids(tok, "tokenizer")
    cls, sep = ids_["cls_id"], ids_["sep_id"]
    out = []
    for enc in tok.encode_batch(reports, add_special_tokens=False):
        n = len(enc.ids)
        body = enc.ids[: max_tokens - 2]
        words = enc.word_ids[: max_tokens - 2]
        ws = [w is not None and (i == 0 or words[i - 1] != w) for i, w in enumerate(words)]
        out.append(([cls, *body, sep], [False, *ws, False], n))
    return out


def unknown_rate(tok, reports: list[str], unk_id: int) -> dict:
    """How much of ``reports`` the tokenizer does not know: the share of [UNK] pieces and the reports that are
    mostly [UNK] (the manifest's ``stats.vocabulary``)."""
    pieces = unknown = mostly = 0
    for enc in tok.encode_batch(reports, add_special_tokens=False) if reports else []:
        n, u = len(enc.ids), sum(1 for i in enc.ids if i == unk_id)
        pieces, unknown = pieces + n, unknown + u
        mostly += n > 0 and u > MOSTLY_UNKNOWN * n
    return {"unk_rate": round(unknown / pieces, 6) if pieces else 0.0, "unk_pieces": unknown, "pieces": pieces,
            "reports": len(reports), "reports_mostly_unknown": mostly}


def decode_ids(tok: Tokenizer, ids: np.ndarray, attention: np.ndarray) -> str:
    """Text of stored token ids (specials and padding dropped) — for checks and visualisation."""
    return tok.decode([int(i) for i, a in zip(ids, attention) if a], skip_special_tokens=True)


def tokenizer_bytes(tok: Tokenizer) -> bytes:
    """A canonical serialisation (sorted keys) so the same vocabulary always hashes the same."""
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False, indent=1).encode()


def word_positions(tok: Tokenizer, input_ids, word_start, attention_mask, words) -> np.ndarray:
    """(B, L) bool: every piece of each whole word (pieces joined, ``##`` dropped, lower case) that is in
    ``words``. Arrays or CPU tensors. Used to score the report branch on a chosen set of words (e.g. the
    synthetic corpus' finding words)."""
    ids = np.asarray(input_ids)
    start = np.asarray(word_start, dtype=bool)
    att = np.asarray(attention_mask, dtype=bool)
    words = {w.lower() for w in words}
    out = np.zeros(ids.shape, dtype=bool)
    for r in range(ids.shape[0]):
        spans: list[list[tuple[int, str]]] = []  # the words of row r: (column, piece) each
        for c in np.flatnonzero(att[r]):
            piece = tok.id_to_token(int(ids[r, c])) or ""
            if spans and not start[r, c] and piece.startswith("##"):
                spans[-1].append((c, piece[2:]))
            elif start[r, c]:
                spans.append([(c, piece)])
        for span in spans:
            if "".join(p for _, p in span).lower() in words:
                out[r, [c for c, _ in span]] = True
    return out


def hf_tokenizer(tokenizer_json: str, max_tokens: int):
    """A transformers fast tokenizer over the shards' ``tokenizer.json`` that encodes like prep did:
    ``[CLS] pieces [SEP]``, truncated to ``max_tokens``."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(tokenizer_json)
    cls, sep = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[(CLS, cls), (SEP, sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_tokens, **HF_SPECIAL_TOKENS)
