"""``mrm-scale checkpoint``: look at a run's checkpoints, and convert one for another world size or ZeRO stage.

    mrm-scale checkpoint inspect runs/mrm-base                       every tag: step, ranks, stage, complete, size
    mrm-scale checkpoint inspect runs/mrm-base --nproc 1 --deepspeed ds_configs/zero3.json
                                                                     ... and what --resume auto would do with these
    mrm-scale checkpoint convert runs/mrm-base/checkpoints/step00001000   DeepSpeed's universal form, kept in
                                                                     <tag>/universal (what --resume auto does itself
                                                                     when the world size or stage differs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mrm_scale.formats import checkpoints as layout
from mrm_scale.formats import files
from mrm_scale.formats.run_record import RunRecord, RunRecordError, checkpoints_dir, offload_of, zero_stage_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = sub.add_parser("inspect", help="list a run's checkpoints and what --resume auto would take")
    i.add_argument("run", help="a run folder (or its checkpoints/ folder)")
    i.add_argument("--nproc", type=int, default=None, help="ranks of the resume to judge (default: the run's own)")
    i.add_argument("--deepspeed", default=None, help="DeepSpeed JSON of that resume (default: the run's own)")
    i.add_argument("--json", action="store_true", help="print the table as JSON")
    c = sub.add_parser("convert", help="write a tag's universal form (any world size, ZeRO stage 1-3)")
    c.add_argument("tag", help="a checkpoint tag folder, or a run folder (its newest complete tag)")


def _folder_size(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def _stage_and_offload(ds_json: str | None, record: RunRecord | None) -> tuple[int | None, bool]:
    if ds_json:
        with open(ds_json) as f:
            cfg = json.load(f)
        return zero_stage_of(cfg), offload_of(cfg)
    if record is not None:
        return record.zero_stage, record.offload
    return None, False


def inspect_run(run: str, nproc: int | None = None, ds_json: str | None = None) -> dict:
    """Every tag of a run with its facts, and the decision ``--resume auto`` would take."""
    from . import checkpoint, universal

    run = os.path.abspath(run.rstrip("/"))
    ckpt = run if os.path.basename(run) == layout.CHECKPOINTS_DIR else checkpoints_dir(run)
    run_dir = os.path.dirname(ckpt)
    record = None
    try:
        record = RunRecord.read(run_dir)
    except RunRecordError:
        pass
    rows = []
    for tag in layout.tag_folders(ckpt):
        path = os.path.join(ckpt, tag)
        row = {"tag": tag, "step": layout.step_of(tag), "complete": layout.is_complete(path),
               "bytes": _folder_size(path), "universal": layout.has_universal(path)}
        if row["complete"]:
            try:
                rec = layout.CompleteRecord.read(path)
                row.update(world_size=rec.world_size, zero_stage=rec.zero_stage, offload=rec.offload,
                           damaged=rec.check_files(path),
                           data=(rec.loader[0].get("epoch"), rec.loader[0].get("batch")) if rec.loader else None,
                           samples_by_source=rec.samples_by_source)
            except layout.CheckpointLayoutError as e:
                row.update(damaged=[str(e)])
        rows.append(row)
    world = nproc or (record.world_size if record else None)
    stage, offload = _stage_and_offload(ds_json, record)
    try:
        point = checkpoint.find_resume(ckpt, "auto")
    except FileNotFoundError as e:
        decision = f"refuses: {e}"
    else:
        if point is None:
            decision = "starts from scratch (no complete checkpoint)"
        else:
            why = universal.why_universal(point.record, world or point.record.world_size, stage, offload)
            how = "loads it as saved" if not why else (
                f"loads it through DeepSpeed's universal form ({why}; "
                f"{'already converted' if layout.has_universal(point.path) else 'converted once, on first resume'})")
            refusal = universal.refusal(point.record, stage, point.path) if why else None
            decision = f"takes {point.tag}: " + (f"refused: {refusal}" if refusal else how)
            decision += _data_note(point.record, world or point.record.world_size)
            if point.warnings:
                decision += " — after passing over: " + "; ".join(point.warnings)
    return {"checkpoints": ckpt, "resume": {"ranks": world, "zero_stage": stage, "offload": offload},
            "tags": rows, "resume_auto": decision}


def _data_note(rec: layout.CompleteRecord, world: int) -> str:
    """What becomes of the saved data position under ``world`` ranks (same worker count assumed)."""
    if not rec.loader or not isinstance(rec.loader[0], dict):
        return ""
    st = rec.loader[0]
    epoch, batch = st.get("epoch"), st.get("batch")
    if not batch or world == rec.world_size:
        return f"; data continues at epoch {epoch}, batch {batch}"
    if st.get("backend") in ("dali", "mix/dali"):
        return (f"; but its DALI data position is mid-epoch (epoch {epoch}, batch {batch}) and cannot be re-split "
                f"over {world} ranks: the resume is refused before compute (resume with {rec.world_size} ranks)")
    return f"; the rest of epoch {epoch} is re-split over {world} ranks"


def _table(report: dict) -> str:
    lines = [f"{report['checkpoints']}:",
             f"  {'tag':<14} {'step':>8} {'ranks':>5} {'ZeRO':>4} {'offload':>7} {'complete':>8} {'size':>10}  notes"]
    for r in report["tags"]:
        notes = []
        if r.get("universal"):
            notes.append("universal form kept")
        if r.get("damaged"):
            notes.append("DAMAGED: " + "; ".join(r["damaged"]))
        if r.get("data"):
            notes.append(f"data at epoch {r['data'][0]}, batch {r['data'][1]}")
        if r.get("samples_by_source"):
            notes.append("samples " + ", ".join(f"{k} {v}" for k, v in r["samples_by_source"].items()))
        off = r.get("offload")
        lines.append(f"  {r['tag']:<14} {r['step']:>8} {r.get('world_size', '?'):>5} {r.get('zero_stage', '?')!s:>4} "
                     f"{'-' if off is None else ('on' if off else 'off'):>7} {'yes' if r['complete'] else 'NO':>8} "
                     f"{files.human_size(r['bytes']):>10}  {', '.join(notes)}")
    if not report["tags"]:
        lines.append("  (no checkpoints)")
    res = report["resume"]
    lines.append(f"--resume auto with {res['ranks'] or '?'} rank(s), ZeRO stage {res['zero_stage']}"
                 f"{', offload' if res['offload'] else ''}: {report['resume_auto']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "inspect":
        if not os.path.isdir(args.run):
            print(f"mrm-scale checkpoint: error: {args.run}: no such run folder", file=sys.stderr)
            return 2
        try:
            report = inspect_run(args.run, args.nproc, args.deepspeed)
        except (OSError, ValueError) as e:
            print(f"mrm-scale checkpoint: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=1) if args.json else _table(report))
        return 0
    from . import universal

    try:
        ref = layout.locate(args.tag)
    except layout.CheckpointLayoutError as e:
        print(f"mrm-scale checkpoint: error: {e}", file=sys.stderr)
        return 2
    if not layout.is_complete(ref.path):
        print(f"mrm-scale checkpoint: error: {ref.path}: not complete (no {layout.COMPLETE}); convert a complete tag",
              file=sys.stderr)
        return 2
    try:
        rec = layout.CompleteRecord.read(ref.path)
    except layout.CheckpointLayoutError as e:
        print(f"mrm-scale checkpoint: error: {e}", file=sys.stderr)
        return 2
    bad = rec.check_files(ref.path) or ([] if rec.zero_stage not in (None, 0) else
                                        [universal.refusal(rec, 1, ref.path)])
    if bad:
        print(f"mrm-scale checkpoint: error: {ref.path}: {'; '.join(bad)}", file=sys.stderr)
        return 2
    had = layout.has_universal(ref.path)
    try:
        out = universal.convert(ref.path)
    except universal.ConversionError as e:
        print(f"mrm-scale checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {'already there' if had else 'written'} ({files.human_size(_folder_size(out))}); a run resumes "
          "from it by itself under any world size and ZeRO stage 1-3 (--resume auto)")
    return 0
