"""What a finished run logged, read back: the last losses and image-use figures (TensorBoard, else the trace)."""

from __future__ import annotations

import glob
import json
import logging
import os

from mrm_scale.formats.run_record import tb_dir, trace_path
from mrm_scale.model.diagnostics import IMAGE_USE_KEYS

log = logging.getLogger("mrm_scale.eval.export")


def final_losses(run_dir: str | None, step: int) -> dict | None:
    """Last logged losses at or before ``step``: TensorBoard (``<run>/tb``), else the trace."""
    if not run_dir:
        return None
    tb = tb_dir(run_dir)
    if glob.glob(os.path.join(tb, "events.out.tfevents.*")):
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(tb, size_guidance={"scalars": 0})
            acc.Reload()
            tags = set(acc.Tags()["scalars"])

            def last(pairs) -> dict:  # {key: value at the last event at or before step, "step": its step}
                found = {}
                for key, tag in pairs:
                    events = [e for e in acc.Scalars(tag) if e.step <= step] if tag in tags else []
                    if events:
                        found[key], found["step"] = float(events[-1].value), int(events[-1].step)
                return found

            out = last((("loss", "loss/total"), ("image_loss", "loss/image"), ("report_loss", "loss/report")))
            # the image-use probe (mrm_scale.train.image_use)
            use = last((key, f"report/{key}") for key in IMAGE_USE_KEYS)
            if use:
                out["image_use"] = use
            if out:
                return {**out, "source": "tensorboard"}
        except Exception as e:  # noqa: BLE001 - the card is still useful without losses
            log.warning("could not read TensorBoard losses from %s: %s", tb, e)
    trace = trace_path(run_dir, 0)
    if os.path.isfile(trace):
        last = None
        with open(trace) as f:
            for line in f:
                rec = json.loads(line)
                if not rec.get("final") and rec.get("step", 1 << 60) <= step:
                    last = rec
        if last:
            return {k: last.get(k) for k in ("loss", "image_loss", "report_loss", "step")} | {"source": "trace"}
    return None
