"""The export's model card (``README.md``): model, training, data, tokenizer, image use and how to load each part."""

from __future__ import annotations

from mrm_scale.data import transforms
from mrm_scale.formats import exports
from mrm_scale.model import MRMConfig

from .timm_interop import timm_call, timm_spec


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _provenance(d: dict) -> str:
    """Name, release and licence of a shard set, as its manifest records them."""
    what = d.get("corpus") or d.get("source") or "unnamed corpus"
    if d.get("version"):
        what += f" ({d['version']})"
    return f"{what}, licence: {d.get('licence') or 'not recorded'}"


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
        f"- image normalisation: grayscale (replicated to {cfg.in_chans} channels), mean {transforms.IMAGE_MEAN}, "
        f"std {transforms.IMAGE_STD}",
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
    mix = meta.get("data_mix") or []
    if mix:
        lines.append(f"- data: a weighted mix of {len(mix)} shard sets (shares of the samples drawn; each set cycles "
                     "at its own length):")
        for d in mix:
            lines.append(f"  - `{d['name']}` weight {d['weight']:.3f}: `{d['path']}`" + (
                f" — {_provenance(d)}; samples {d.get('samples')}, rejected {d.get('rejected')}" if "source" in d
                else " (no manifest there any more)"))
    elif data:
        lines.append(f"- data: `{data['path']}` (source {data['source']}" + (f", input {data['input']}"
                     if data.get("input") else "") + f"): samples {data['samples']}, shards {data['shards']}, "
                     f"rejected {data['rejected']}")
        lines.append(f"- corpus: {_provenance(data)}")
    if data and not mix:
        if data.get("label_positives"):
            lines.append(f"- label positives: {data['label_positives']}")
    tok = meta["tokenizer"]
    lines.append(f"- tokenizer `{exports.TOKENIZER_COPY}`: vocabulary {tok['vocab_size']}, sha256 {tok.get('sha256')}, "
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
        f"model = {timm_call(cfg, exports.ENCODER_FILE)}.eval()",
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
            f"mlm = AutoModelForMaskedLM.from_pretrained({exports.REPORT_DIR!r})",
            f"tok = AutoTokenizer.from_pretrained({exports.REPORT_DIR!r})  # [CLS] ... [SEP] like the shards",
            "logits = mlm(**tok(['no acute cardiopulmonary process .'], return_tensors='pt')).logits",
            "```",
            "",
            f"MRM's conditioning: `{exports.REPORT_DIR}/{exports.IMAGE_PROJ_FILE}` holds `weight`/`bias` of the projection; add "
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
        "from mrm_scale.eval.loading import load_full_model",
        "model = load_full_model('.')  # build_model(mrm_config.json) + load_state_dict(mrm_full.safetensors)",
        "```",
        "",
    ]
    return "\n".join(lines)
