"""``mrm-scale tokenizer train``: one WordPiece vocabulary over the reports of several corpora.

Inputs are shard folders (the cleaned reports of their ``train`` split, exactly as stored, read through the index
files without touching the images), CSV/JSONL tables (``--report-column``, cleaned as prep cleans them) or text
files (one report per line). The vocabulary keeps accents and non-Latin scripts; the special tokens take ids
0..4 in the project's order (:data:`~mrm_scale.formats.tokenizer.SPECIAL_TOKENS`). Prepare every corpus with
``mrm-scale prep --tokenizer tokenizer.json`` and they can be mixed in one run.
"""

from __future__ import annotations

import argparse
import os
import sys

from mrm_scale.formats import files
from mrm_scale.formats import shards as sf

from .reports import ReportError, check_report
from .sources import SourceError, table_rows
from .tokenizer import tokenizer_bytes, train_wordpiece, unknown_rate

TABLE_REPORT_COLUMNS = ("report_content", "report", "Report", "text")


class TokenizerInputError(ValueError):
    pass


def _shard_reports(folder: str) -> list[str]:
    try:
        manifest = sf.read_manifest(folder)
    except sf.ManifestError as e:
        raise TokenizerInputError(str(e)) from None
    out = []
    for entry in (manifest["splits"].get("train") or {}).get("shards") or []:
        tar, idx = os.path.join(folder, entry["tar"]), os.path.join(folder, entry.get("idx") or sf.index_name(entry["tar"]))
        if not (os.path.isfile(tar) and os.path.isfile(idx)):
            raise TokenizerInputError(f"{tar}: listed in {sf.manifest_path(folder)} but missing (or its index); run "
                                      f"`mrm-scale verify {folder}`")
        with open(tar, "rb") as f:
            for key, members in sf.read_index(idx):
                txt = next(((off, size) for ext, off, size in members if ext == "txt"), None)
                if txt is None:
                    raise TokenizerInputError(f"{tar}: sample {key} has no .txt member; run `mrm-scale verify {folder}`")
                f.seek(txt[0])
                out.append(f.read(txt[1]).decode("utf-8"))
    if not out:
        raise TokenizerInputError(f"{folder}: no train samples to read reports from")
    return out


def _table_reports(path: str, column: str | None) -> tuple[list[str], int]:
    kind = "jsonl" if path.lower().endswith((".jsonl", ".jsonl.gz")) else "csv"
    out, skipped, col = [], 0, column
    try:
        for n, row in table_rows(path, kind):
            if col is None:
                col = next((c for c in TABLE_REPORT_COLUMNS if c in row), None)
                if col is None:
                    raise TokenizerInputError(f"{path}: no report column among {sorted(row)}; name it with "
                                              "--report-column")
            if col not in row:
                raise TokenizerInputError(f"{path}:{n}: no column {col!r}; name the report column with --report-column")
            try:
                out.append(check_report(row.get(col), f"{path}:{n}"))
            except ReportError:
                skipped += 1  # an empty or missing report adds nothing to a vocabulary
    except SourceError as e:
        raise TokenizerInputError(str(e)) from None
    return out, skipped


def reports_of(path: str, report_column: str | None = None) -> tuple[list[str], int]:
    """(reports, rows without a usable report) of one input: shard folder, CSV/JSONL table or text file."""
    if os.path.isdir(path):
        return _shard_reports(path), 0
    if not os.path.isfile(path):
        raise TokenizerInputError(f"{path}: not a shard folder or a file (give shard folders, .csv/.jsonl tables or "
                                  ".txt files with one report per line)")
    if path.lower().endswith((".csv", ".jsonl", ".csv.gz")):
        if path.endswith(".gz"):
            raise TokenizerInputError(f"{path}: unpack it first (gzip tables are read by prep, not here)")
        return _table_reports(path, report_column)
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [x for x in lines if x], sum(1 for x in lines if not x)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train one WordPiece vocabulary over several corpora")
    t.add_argument("--input", nargs="+", required=True, metavar="SHARDS_OR_TABLE",
                   help="shard folders (their train reports), .csv/.jsonl tables or .txt files (one report per line)")
    t.add_argument("--vocab-size", type=int, default=30000)
    t.add_argument("--report-column", default=None,
                   help=f"report column of the tables (default: the first of {', '.join(TABLE_REPORT_COLUMNS)})")
    t.add_argument("--out", required=True, help="tokenizer JSON to write (pass it to `mrm-scale prep --tokenizer`)")


def run(args: argparse.Namespace) -> int:
    if args.vocab_size < 100:
        print(f"mrm-scale tokenizer: error: --vocab-size {args.vocab_size}: too small for WordPiece (use >= 100)",
              file=sys.stderr)
        return 2
    per_input = []
    try:
        for path in args.input:
            reports, skipped = reports_of(path, args.report_column)
            per_input.append((path, reports, skipped))
    except TokenizerInputError as e:
        print(f"mrm-scale tokenizer: error: {e}", file=sys.stderr)
        return 2
    union = [r for _, reports, _ in per_input for r in reports]
    tok = train_wordpiece(union, args.vocab_size)
    data = tokenizer_bytes(tok)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    files.write_atomic(args.out, data)
    unk = tok.token_to_id("[UNK]")
    print(f"tokenizer {args.out}: vocabulary {tok.get_vocab_size(with_added_tokens=True)}, sha256 "
          f"{files.sha256_bytes(data)}, {len(union)} reports")
    for path, reports, skipped in per_input:
        v = unknown_rate(tok, reports, unk)
        print(f"  {path}: {len(reports)} reports" + (f" ({skipped} rows without one)" if skipped else "")
              + f", [UNK] {100 * v['unk_rate']:.2f}% of {v['pieces']:,} pieces")
    return 0
