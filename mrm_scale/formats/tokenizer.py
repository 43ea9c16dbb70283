"""Tokenizer identity: which file, which special tokens, which ids — as the manifest, the run record and an
export all record it (``manifest.json["tokenizer"]``).

The tokenizer itself (training, loading, encoding) lives in :mod:`mrm_scale.data.tokenizer`; this is what every
other room needs to know about it without loading it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

TOKENIZER_FILE = "tokenizer.json"
# The special tokens MRM needs, in the order a trained vocabulary numbers them (ids 0..4).
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# transformers' names for them (``PreTrainedTokenizerFast(**HF_SPECIAL_TOKENS)``)
HF_SPECIAL_TOKENS = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}


def id_field(token: str) -> str:
    """``[CLS]`` -> ``cls_id``: the entry's field holding that token's id."""
    return token.strip("[]").lower() + "_id"


@dataclass(frozen=True)
class TokenizerIdentity:
    """The manifest's ``tokenizer`` entry, typed."""

    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    sha256: str | None = None
    file: str = TOKENIZER_FILE  # relative to the folder that holds it (the shards, an export)

    @classmethod
    def from_dict(cls, entry: dict, origin: str = "tokenizer entry") -> "TokenizerIdentity":
        if not isinstance(entry, dict):
            raise ValueError(f"{origin}: tokenizer entry is {type(entry).__name__}, not a mapping; re-run "
                             "`mrm-scale prep`")
        need = ["vocab_size", *(id_field(t) for t in SPECIAL_TOKENS)]
        missing = [k for k in need if k not in entry]
        if missing:
            raise ValueError(f"{origin}: tokenizer entry lacks {', '.join(missing)}; re-run `mrm-scale prep` (the "
                             "manifest of an older version)")
        return cls(vocab_size=int(entry["vocab_size"]), **{k: int(entry[k]) for k in need[1:]},
                   sha256=entry.get("sha256"), file=entry.get("file") or TOKENIZER_FILE)

    @classmethod
    def canonical(cls, vocab_size: int) -> "TokenizerIdentity":
        """The ids a vocabulary trained by ``mrm-scale prep`` gives the specials (their order above): for
        benchmarks and FLOP counts that build a model without shards."""
        return cls(vocab_size=vocab_size, **{id_field(t): i for i, t in enumerate(SPECIAL_TOKENS)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_ids(self) -> dict[str, int]:
        """The keyword arguments :func:`mrm_scale.model.build_model` takes."""
        return dict(vocab_size=self.vocab_size, pad_token_id=self.pad_id, cls_token_id=self.cls_id,
                    sep_token_id=self.sep_id, mask_token_id=self.mask_id)

    def path(self, folder: str) -> str:
        return os.path.join(folder, self.file)

    def replace(self, **changes) -> "TokenizerIdentity":
        return dataclasses.replace(self, **changes)
