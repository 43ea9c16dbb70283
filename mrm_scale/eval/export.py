"""``mrm-scale export RUN_OR_CHECKPOINT --out DIR``: a pretraining checkpoint -> standalone, loadable weights.

Input: a run folder (``runs/<name>``: its newest *complete* checkpoint is taken) or one checkpoint folder
(``runs/<name>/checkpoints/stepNNNNNNNN``). The ZeRO shards (stage 1, 2 or 3; any number of ranks) are
consolidated with DeepSpeed's own fp32 consolidation (``get_fp32_state_dict_from_zero_checkpoint``: the fp32
master weights of the optimizer partitions), then written as

- ``image_encoder.safetensors``  timm ``VisionTransformer`` keys (no head); one ``timm.create_model`` call loads
                                 it (the exact call, with the kwargs a preset needs, is in ``mrm_config.json``
                                 under ``timm`` and in the model card);
- ``report_model/``              the BERT masked-LM (``AutoModelForMaskedLM.from_pretrained``) with its tokenizer
                                 (``AutoTokenizer.from_pretrained``, ``[CLS] ... [SEP]`` like the shards) and
                                 ``image_proj.safetensors`` (the image-conditioning projection); absent for
                                 image-only runs (``report_weight`` 0);
- ``mrm_full.safetensors``       every weight of the MRM model (decoder included), and ``mrm_config.json`` (model
                                 config, tokenizer ids, source checkpoint): :func:`load_full_model` (or
                                 ``build_model`` + ``load_state_dict``) restores the model;
- ``tokenizer.json``             the shards' tokenizer, copied (the export stands alone);
- ``README.md``                  a model card: preset, data, steps, final losses, load snippets.

A checkpoint without ``COMPLETE.json`` or with missing DeepSpeed files is refused with the list of missing files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from mrm_scale.data import shardformat as sf
from mrm_scale.model import MRM, MRMConfig, build_model
from mrm_scale.model.diagnostics import IMAGE_USE_KEYS

log = logging.getLogger("mrm_scale.eval.export")

FORMAT = "mrm-scale-export/1"
ENCODER_FILE = "image_encoder.safetensors"
FULL_FILE = "mrm_full.safetensors"
CONFIG_FILE = "mrm_config.json"
REPORT_DIR = "report_model"
IMAGE_PROJ_FILE = "image_proj.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"
COMPLETE = "COMPLETE.json"  # written by the trainer once every rank has saved (mrm_scale/train/checkpoint.py)
TAG_RE = re.compile(r"^step(\d{8})$")
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}
# timm architecture whose kwargs are overridden for presets without a timm name of their own (``tiny``)
TIMM_FALLBACK_ARCH = "vit_tiny_patch16_224"


class ExportError(ValueError):
    """The input cannot be exported; the message names the folder/files and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# finding and checking the checkpoint
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointRef:
    root: str  # folder holding the tag folders (DeepSpeed's ``checkpoint_dir``)
    tag: str  # stepNNNNNNNN
    run_dir: str | None  # the run folder, when the layout is <run>/checkpoints/<tag>

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)


def _step_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if TAG_RE.match(n) and os.path.isdir(os.path.join(root, n)))


def _looks_like_checkpoint(path: str) -> bool:
    return (TAG_RE.match(os.path.basename(path)) is not None or os.path.isfile(os.path.join(path, COMPLETE))
            or bool(glob.glob(os.path.join(path, "*_model_states.pt"))))


def resolve_checkpoint(path: str) -> CheckpointRef:
    """A run folder (newest complete checkpoint) or a checkpoint folder -> :class:`CheckpointRef`."""
    path = os.path.abspath(os.fspath(path).rstrip("/"))
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such run or checkpoint folder")
    if _looks_like_checkpoint(path):
        root = os.path.dirname(path)
        run_dir = os.path.dirname(root) if os.path.basename(root) == "checkpoints" else None
        return CheckpointRef(root, os.path.basename(path), run_dir)
    for root in (os.path.join(path, "checkpoints"), path):
        tags = _step_folders(root)
        if not tags:
            continue
        complete = [t for t in tags if os.path.isfile(os.path.join(root, t, COMPLETE))]
        if not complete:
            raise ExportError(
                f"{root}: no complete checkpoint ({', '.join(tags)} lack {COMPLETE}, which the trainer writes once "
                "every rank has saved); let the run save one (it saves every --save-every steps and at the end) "
                "or resume it with --resume auto")
        return CheckpointRef(root, complete[-1], path)
    raise ExportError(f"{path}: neither a run folder (with checkpoints/stepNNNNNNNN/) nor a checkpoint folder "
                      "(with *_model_states.pt)")


def read_run_config(ref: CheckpointRef) -> dict:
    """The run's resolved config: ``<run>/run_config.json``, else the ``client_state`` stored in the checkpoint."""
    if ref.run_dir and os.path.isfile(os.path.join(ref.run_dir, "run_config.json")):
        with open(os.path.join(ref.run_dir, "run_config.json")) as f:
            return json.load(f)
    files = sorted(glob.glob(os.path.join(ref.path, "*model_states.pt")))
    if files:
        state = torch.load(files[0], map_location="cpu", weights_only=False)
        if isinstance(state, dict) and isinstance(state.get("run_config"), dict):
            return state["run_config"]
    raise ExportError(f"{ref.path}: no run_config.json in the run folder and no run config in the checkpoint's "
                      "client state; export a checkpoint written by launch/pretrain.py, inside its run folder")


def _zero_stage(run_config: dict, ckpt: str) -> int:
    stage = run_config.get("ds_config", {}).get("zero_optimization", {}).get("stage")
    if stage is not None:
        return int(stage)
    if glob.glob(os.path.join(ckpt, "zero_pp_rank_*_model_states.pt")):
        return 3
    return 2 if glob.glob(os.path.join(ckpt, "*zero_pp_rank_*_optim_states.pt")) else 0


def expected_files(stage: int, world_size: int, bf16: bool | None) -> list[str]:
    """DeepSpeed's files of one checkpoint tag. ``bf16=None``: optimizer files may carry either prefix
    (reported as ``[bf16_]zero_pp_rank_...``)."""
    prefix = {True: "bf16_", False: "", None: "[bf16_]"}[bf16]
    if stage >= 3:
        files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    else:
        files = ["mp_rank_00_model_states.pt"]
    if stage >= 1:
        files += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    return files


def _present(ckpt: str, name: str) -> bool:
    if name.startswith("[bf16_]"):
        rest = name[len("[bf16_]"):]
        return os.path.isfile(os.path.join(ckpt, rest)) or os.path.isfile(os.path.join(ckpt, "bf16_" + rest))
    return os.path.isfile(os.path.join(ckpt, name))


def check_checkpoint(ref: CheckpointRef, run_config: dict) -> dict:
    """Refuse an incomplete checkpoint, naming every missing file. Returns ``{step, world_size, zero_stage}``."""
    ckpt = ref.path
    missing, info = [], {}
    if os.path.isfile(os.path.join(ckpt, COMPLETE)):
        with open(os.path.join(ckpt, COMPLETE)) as f:
            info = json.load(f)
    else:
        missing.append(COMPLETE)
    world = int(info.get("world_size") or run_config.get("world_size") or 1)
    stage = _zero_stage(run_config, ckpt)
    bf16_cfg = run_config.get("ds_config", {}).get("bf16")
    bf16 = bool(bf16_cfg.get("enabled")) if isinstance(bf16_cfg, dict) else None
    missing += [f for f in expected_files(stage, world, bf16) if not _present(ckpt, f)]
    if missing:
        why = (f"{COMPLETE} is written only after every rank has saved, so the save was interrupted or is still "
               "running" if COMPLETE in missing else "DeepSpeed files are gone")
        raise ExportError(
            f"{ckpt}: incomplete checkpoint (ZeRO stage {stage}, {world} ranks), missing: {', '.join(missing)} "
            f"({why}); export another checkpoint of the run (the run folder takes the newest complete one) or "
            "copy the missing files back")
    m = TAG_RE.match(ref.tag)
    step = int(info.get("step", int(m.group(1)) if m else -1))
    return {"step": step, "world_size": world, "zero_stage": stage}


# ----------------------------------------------------------------------------------------------------------------
# consolidation
# ----------------------------------------------------------------------------------------------------------------
def consolidate(ref: CheckpointRef, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the module (parameters from the optimizer's fp32 master partitions, buffers
    from the model states), via DeepSpeed's own consolidation; stage 0 reads the module weights directly."""
    if zero_stage == 0:
        state = torch.load(os.path.join(ref.path, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)
        sd = state["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # DeepSpeed prints its progress; keep it for debugging, not the console
        try:
            with contextlib.redirect_stdout(chatter):
                sd = get_fp32_state_dict_from_zero_checkpoint(ref.root, tag=ref.tag)
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(f"{ref.path}: DeepSpeed could not consolidate this checkpoint: {e}") from None
        finally:
            log.debug("zero_to_fp32 said:\n%s", chatter.getvalue())
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().to(torch.float32).contiguous()
    return out


def model_config(run_config: dict) -> MRMConfig:
    fields = {f.name for f in dataclasses.fields(MRMConfig)}
    saved = dict(run_config["model"])
    extra = sorted(set(saved) - fields)
    if extra:
        log.warning("run config has model fields this version does not know (ignored): %s", ", ".join(extra))
    return MRMConfig(**{k: v for k, v in saved.items() if k in fields}).validate()


def token_ids(tok: dict) -> dict:
    return dict(vocab_size=tok["vocab_size"], pad_token_id=tok["pad_id"], cls_token_id=tok["cls_id"],
                sep_token_id=tok["sep_id"], mask_token_id=tok["mask_id"])


def build_loaded_model(cfg: MRMConfig, tok: dict, state_dict: dict[str, torch.Tensor], origin: str) -> MRM:
    """``build_model`` + a strict ``load_state_dict``; mismatches raise :class:`ExportError` naming the keys."""
    model = build_model(cfg, **token_ids(tok))
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{origin}: weights do not fit the run's model config ({cfg.name}): missing "
            f"{result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, unexpected "
            f"{result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}")
    return model.eval()


def load_checkpoint_model(path: str) -> tuple[MRM, dict]:
    """A run or checkpoint folder -> (the consolidated MRM model in fp32, info). Used by fine-tuning's
    ``--init RUN`` so it takes exactly the export's code path."""
    ref = resolve_checkpoint(path)
    run_config = read_run_config(ref)
    info = check_checkpoint(ref, run_config)
    cfg = model_config(run_config)
    model = build_loaded_model(cfg, run_config["tokenizer"], consolidate(ref, info["zero_stage"]), ref.path)
    return model, {**info, "checkpoint": ref.path, "run_dir": ref.run_dir, "run_config": run_config}


# ----------------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _timm_arch(name: str) -> dict:
    import timm

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0)
    blk = m.blocks[0]
    return dict(img_size=m.patch_embed.img_size[0], patch_size=m.patch_embed.patch_size[0],
                in_chans=m.patch_embed.proj.in_channels, embed_dim=m.embed_dim, depth=len(m.blocks),
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / m.embed_dim,
                qkv_bias=blk.attn.qkv.bias is not None)


def timm_spec(cfg: MRMConfig) -> tuple[str, dict]:
    """(timm model name, kwargs) that build the encoder's architecture: the preset's ``timm_name`` (or
    ``vit_tiny_patch16_224``) with the fields that differ from it as kwargs."""
    name = cfg.timm_name or TIMM_FALLBACK_ARCH
    have = _timm_arch(name)
    want = dict(img_size=cfg.input_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias)
    kwargs = {k: v for k, v in want.items() if have[k] != v}
    if abs(cfg.mlp_ratio - have["mlp_ratio"]) > 1e-6:
        kwargs["mlp_ratio"] = cfg.mlp_ratio
    return name, kwargs


def timm_call(cfg: MRMConfig, path: str) -> str:
    """The one-line ``timm.create_model`` call that loads ``image_encoder.safetensors`` at ``path``."""
    name, kwargs = timm_spec(cfg)
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={path!r}), "
            f"num_classes=0{extra})")


def check_timm_keys(cfg: MRMConfig, encoder_sd: dict[str, torch.Tensor]) -> None:
    """The timm model of :func:`timm_spec` must have exactly the encoder's keys and shapes (checked on the meta
    device, no memory): timm loads with ``strict=False`` when the head is dropped, so a mismatch would pass
    silently there."""
    import timm

    name, kwargs = timm_spec(cfg)
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    theirs = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in encoder_sd.items()}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:8]
        raise ExportError(f"the encoder does not match timm {name} {kwargs}: differing keys/shapes {diff}")


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------
def _save_safetensors(sd: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors sharing memory (BERT's tied output matrix)
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}, path,
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def hf_tokenizer(tokenizer_json: str, max_tokens: int):
    """A transformers fast tokenizer over the shards' ``tokenizer.json`` that encodes like prep did:
    ``[CLS] pieces [SEP]``, truncated to ``max_tokens``."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(tokenizer_json)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_tokens, **SPECIAL_TOKENS)


def final_losses(run_dir: str | None, step: int) -> dict | None:
    """Last logged losses at or before ``step``: TensorBoard (``<run>/tb``), else the trace."""
    if not run_dir:
        return None
    tb = os.path.join(run_dir, "tb")
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
    trace = os.path.join(run_dir, "trace", "rank0.jsonl")
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


def _manifest_summary(shards: str | None) -> dict | None:
    if not shards or not os.path.isfile(os.path.join(shards, sf.MANIFEST)):
        return None
    with open(os.path.join(shards, sf.MANIFEST)) as f:
        m = json.load(f)
    stats = m.get("stats", {})
    return {"path": shards, "source": m.get("source", {}).get("kind") or m.get("options", {}).get("source"),
            "input": m.get("source", {}).get("input"),
            "samples": {k: v.get("samples") for k, v in m.get("splits", {}).items()},
            "shards": {k: len(v.get("shards", [])) for k, v in m.get("splits", {}).items()},
            "rejected": stats.get("rejected", len(m.get("rejected", []))),
            "label_positives": stats.get("label_positives"),
            "tokenizer": {k: m["tokenizer"].get(k) for k in ("sha256", "vocab_size")}}


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def model_card(cfg: MRMConfig, meta: dict, has_report: bool) -> str:
    src, data, losses = meta["source"], meta.get("data"), meta.get("final_losses")
    counts = meta["parameters"]
    name, kwargs = timm_spec(cfg)
    lines = [
        f"# MRM image encoder — preset `{cfg.name}`",
        "",
        "Masked Record Modeling (image + report) pretraining, exported by `mrm-scale export`."
        if has_report else "Image-only masked-image (MAE-style, report_weight 0) pretraining, exported by "
        "`mrm-scale export`; no report model (the run had no report head).",
        "",
        "## Model",
        "",
        f"- preset `{cfg.name}`: ViT {cfg.embed_dim} wide, {cfg.depth} deep, {cfg.num_heads} heads, "
        f"{cfg.patch_size}-px patches, in_chans {cfg.in_chans}; encoder input {cfg.input_size} px (the "
        f"{cfg.img_size}-px image resized by 1/{cfg.sr_scale}, bicubic)",
        f"- timm architecture `{name}`" + (f" with {kwargs}" if kwargs else ""),
        f"- parameters: encoder {counts['encoder']:,}, decoder {counts['decoder']:,}, report {counts['report']:,}",
        f"- report weight λ = {cfg.report_weight}, mask ratio {cfg.mask_ratio}, word mask {cfg.word_mask_prob}",
        f"- image normalisation: grayscale (replicated to {cfg.in_chans} channels), mean {sf.IMAGE_MEAN}, "
        f"std {sf.IMAGE_STD}",
        "",
        "## Training",
        "",
        f"- checkpoint `{src['checkpoint']}` (step {src['step']}, {src['world_size']} ranks, ZeRO stage "
        f"{src['zero_stage']})",
    ]
    if losses:
        lines.append(f"- final losses (step {losses.get('step')}, from {losses['source']}): total "
                     f"{_fmt(losses.get('loss'))}, image {_fmt(losses.get('image_loss'))}, report "
                     f"{_fmt(losses.get('report_loss'))}")
    else:
        lines.append("- final losses: not found (no TensorBoard or trace in the run folder)")
    use = (losses or {}).get("image_use")
    if use and use.get("image_gain") is not None:
        line = (f"- image use (fixed val batch, step {use['step']}): report loss {_fmt(use.get('loss_own_image'))} "
                f"with each record's own image, {_fmt(use.get('loss_shuffled_image'))} with another record's; "
                f"image gain {use['image_gain']:+.4f} nats per masked token, masked accuracy "
                f"{_fmt(use.get('masked_accuracy'))}")
        if use.get("image_gain_finding_words") is not None:
            line += (f"; on the words naming a finding, side or severity: gain "
                     f"{use['image_gain_finding_words']:+.4f}, accuracy {_fmt(use.get('masked_accuracy_finding_words'))}")
        lines.append(line)
    if data:
        lines.append(f"- data: `{data['path']}` (source {data['source']}" + (f", input {data['input']}"
                     if data.get("input") else "") + f"): samples {data['samples']}, shards {data['shards']}, "
                     f"rejected {data['rejected']}")
        if data.get("label_positives"):
            lines.append(f"- label positives: {data['label_positives']}")
    tok = meta["tokenizer"]
    lines.append(f"- tokenizer `tokenizer.json`: vocabulary {tok['vocab_size']}, sha256 {tok.get('sha256')}, "
                 f"ids pad {tok['pad_id']} unk {tok.get('unk_id')} cls {tok['cls_id']} sep {tok['sep_id']} "
                 f"mask {tok['mask_id']}")
    lines += [
        "",
        "## Load",
        "",
        "Image encoder (timm; features = mean of the patch tokens, class token excluded):",
        "",
        "```python",
        "import timm, torch",
        f"model = {timm_call(cfg, ENCODER_FILE)}.eval()",
        f"x = torch.randn(1, {cfg.in_chans}, {cfg.input_size}, {cfg.input_size})  # normalised radiograph",
        "features = model.forward_features(x)[:, 1:].mean(1)  # (1, %d)" % cfg.embed_dim,
        "```",
        "",
    ]
    if has_report:
        lines += [
            "Report model (transformers; the MLM alone, without the image conditioning):",
            "",
            "```python",
            "from transformers import AutoModelForMaskedLM, AutoTokenizer",
            f"mlm = AutoModelForMaskedLM.from_pretrained({REPORT_DIR!r})",
            f"tok = AutoTokenizer.from_pretrained({REPORT_DIR!r})  # [CLS] ... [SEP] like the shards",
            "logits = mlm(**tok(['no acute cardiopulmonary process .'], return_tensors='pt')).logits",
            "```",
            "",
            f"MRM's conditioning: `{REPORT_DIR}/{IMAGE_PROJ_FILE}` holds `weight`/`bias` of the projection; add "
            "`image_proj(features)` at every position to the *output* of `mlm.bert.embeddings` (after its "
            "LayerNorm), then run `mlm.bert.encoder` (attention mask as a (B, 1, 1, L) boolean, True = attend) "
            "and `mlm.cls`.",
            "",
        ]
    else:
        lines += ["No `report_model/`: this was an image-only run (report_weight 0).", ""]
    lines += [
        "Full model (decoder included):",
        "",
        "```python",
        "from mrm_scale.eval.export import load_full_model",
        "model = load_full_model('.')  # build_model(mrm_config.json) + load_state_dict(mrm_full.safetensors)",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(src: str, out: str, *, tokenizer: str | None = None, overwrite: bool = False) -> dict:
    """Export a run/checkpoint folder into ``out``; returns what was written (also in ``mrm_config.json``)."""
    ref = resolve_checkpoint(src)
    run_config = read_run_config(ref)
    info = check_checkpoint(ref, run_config)
    cfg = model_config(run_config)
    tok = dict(run_config["tokenizer"])
    shards = run_config.get("shards")
    tok_path = tokenizer or (os.path.join(shards, tok.get("file", sf.TOKENIZER)) if shards else None)
    if not tok_path or not os.path.isfile(tok_path):
        raise ExportError(f"the run's tokenizer {tok_path!r} (from run_config.json 'shards') is not there; pass "
                          "--tokenizer PATH to the shards' tokenizer.json")
    with open(tok_path, "rb") as f:
        tok_bytes = f.read()
    if tok.get("sha256") and hashlib.sha256(tok_bytes).hexdigest() != tok["sha256"]:
        raise ExportError(f"{tok_path}: sha256 differs from the run's tokenizer ({tok['sha256']}); pass --tokenizer "
                          "with the tokenizer.json of the shards the run was trained on")
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out}: folder exists and is not empty; choose another --out or pass --overwrite")

    log.info("consolidating %s (ZeRO stage %d, %d ranks)", ref.path, info["zero_stage"], info["world_size"])
    model = build_loaded_model(cfg, tok, consolidate(ref, info["zero_stage"]), ref.path)
    full_sd = model.state_dict()
    encoder_sd = {k[len("encoder."):]: v for k, v in full_sd.items() if k.startswith("encoder.")}
    check_timm_keys(cfg, encoder_sd)

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out) or ".")
    try:
        meta_common = {"format": FORMAT, "preset": cfg.name, "step": info["step"]}
        _save_safetensors(encoder_sd, os.path.join(stage, ENCODER_FILE), meta_common)
        _save_safetensors(full_sd, os.path.join(stage, FULL_FILE), meta_common)
        shutil.copyfile(tok_path, os.path.join(stage, TOKENIZER_FILE))
        has_report = model.report is not None
        if has_report:
            rdir = os.path.join(stage, REPORT_DIR)
            model.report.mlm.save_pretrained(rdir, safe_serialization=True)
            hf_tokenizer(tok_path, cfg.max_tokens).save_pretrained(rdir)
            _save_safetensors(model.report.image_proj.state_dict(), os.path.join(rdir, IMAGE_PROJ_FILE), meta_common)
        name, kwargs = timm_spec(cfg)
        meta = {
            "format": FORMAT,
            "model": cfg.to_dict(),
            "tokenizer": {**tok, "file": TOKENIZER_FILE},
            "source": {"checkpoint": ref.path, "run_dir": ref.run_dir, **info},
            "timm": {"name": name, "kwargs": kwargs, "call": timm_call(cfg, ENCODER_FILE)},
            "image": {"img_size": cfg.img_size, "input_size": cfg.input_size, "in_chans": cfg.in_chans,
                      "mean": sf.IMAGE_MEAN, "std": sf.IMAGE_STD},
            "report_model": REPORT_DIR if has_report else None,
            "parameters": model.parameter_counts(),
            "data": _manifest_summary(shards),
            "final_losses": final_losses(ref.run_dir, info["step"]),
            "files": sorted([ENCODER_FILE, FULL_FILE, TOKENIZER_FILE, CONFIG_FILE, CARD_FILE]
                            + ([REPORT_DIR + "/"] if has_report else [])),
        }
        with open(os.path.join(stage, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(stage, CARD_FILE), "w") as f:
            f.write(model_card(cfg, meta, has_report))
        if os.path.isdir(out):
            for name_ in os.listdir(out):  # --overwrite (or an empty folder)
                p = os.path.join(out, name_)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            os.rmdir(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return meta


# ----------------------------------------------------------------------------------------------------------------
# reading an export back
# ----------------------------------------------------------------------------------------------------------------
def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, ENCODER_FILE))


def read_export_config(path: str) -> tuple[MRMConfig, dict]:
    """(model config, the whole ``mrm_config.json``) of an export folder."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ExportError(f"{path}: no {CONFIG_FILE}; not an export folder (make one with `mrm-scale export`)")
    with open(cfg_path) as f:
        meta = json.load(f)
    return model_config(meta), meta


def load_full_model(path: str) -> MRM:
    """``build_model`` from ``mrm_config.json`` + ``load_state_dict`` of ``mrm_full.safetensors``."""
    from safetensors.torch import load_file

    cfg, meta = read_export_config(path)
    return build_loaded_model(cfg, meta["tokenizer"], load_file(os.path.join(path, FULL_FILE)), path)


def load_encoder_weights(path: str) -> tuple[MRMConfig, dict[str, torch.Tensor], dict]:
    """(config, encoder state dict with timm keys, info) from an export folder, a run folder or a checkpoint."""
    path = os.fspath(path)
    if is_export(path):
        from safetensors.torch import load_file

        cfg, meta = read_export_config(path)
        return cfg, load_file(os.path.join(path, ENCODER_FILE)), {"export": os.path.abspath(path),
                                                                    "source": meta.get("source")}
    model, info = load_checkpoint_model(path)
    sd = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    return model.cfg, sd, {k: v for k, v in info.items() if k != "run_config"}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (newest complete checkpoint) or a checkpoint folder runs/<name>/checkpoints/stepN")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--tokenizer", default=None,
                   help="the shards' tokenizer.json, when the run's shards folder has moved")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    try:
        meta = export(args.path, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = meta["source"]
    print(f"exported {src['checkpoint']} (step {src['step']}, ZeRO stage {src['zero_stage']}, "
          f"{src['world_size']} ranks) to {os.path.abspath(args.out)}: {', '.join(meta['files'])}")
    if meta["report_model"] is None:
        print("no report_model/: image-only run (report_weight 0), nothing to export on the text side")
    print(f"timm: {meta['timm']['call']}")
    return 0
