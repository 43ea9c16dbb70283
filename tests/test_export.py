"""`mrm-scale export`: a real 2-rank ZeRO-3 pretraining run on CPU, consolidated and loaded back by timm and
transformers in one call each."""

import glob
import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

from mrm_scale.data.prep import PrepOptions, run_prep
from test_train import deepspeed_cmd, run  # the trainer's launcher and subprocess runner

pytestmark = pytest.mark.slow


def export_cli(*args, check=True):
    return run([sys.executable, "-m", "mrm_scale.cli", "export", *map(str, args)], check=check)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 3-step `tiny` MRM run: 2 ranks, ZeRO-3, bf16, with the per-rank trace (final parameter digest)."""
    root = tmp_path_factory.mktemp("export")
    shards = root / "syn"
    run_prep(PrepOptions(source="synthetic", out=str(shards), num=96, synthetic_size=128, shard_size=8,
                         val_fraction=0.2, progress=False, workers=2))
    run(deepspeed_cmd("zero3.json", "--shards", str(shards), "--out-root", str(root / "runs"), "--name", "z3",
                      "--max-steps", "3", "--vis-every", "0", "--backend", "wds", "--trace"))
    run_dir = root / "runs" / "z3"
    out = root / "export"
    _, log = export_cli(run_dir, "--out", out)
    return {"root": root, "shards": shards, "run_dir": run_dir, "export": out, "log": log,
            "ckpt": run_dir / "checkpoints" / "step00000003"}


def test_export_writes_every_file_and_a_model_card(pretrained):
    out = pretrained["export"]
    for name in ("image_encoder.safetensors", "mrm_full.safetensors", "mrm_config.json", "README.md",
                 "tokenizer.json", "report_model/config.json", "report_model/model.safetensors",
                 "report_model/tokenizer.json", "report_model/image_proj.safetensors"):
        assert (out / name).is_file(), f"{name} missing from the export"
    meta = json.loads((out / "mrm_config.json").read_text())
    assert meta["model"]["name"] == "tiny" and meta["source"]["zero_stage"] == 3 and meta["source"]["step"] == 3
    assert meta["source"]["world_size"] == 2
    assert (out / "tokenizer.json").read_bytes() == (pretrained["shards"] / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert meta["timm"]["call"] in card and "AutoModelForMaskedLM.from_pretrained" in card
    assert "source synthetic" in card and "'train': " in card and "step 3" in card
    assert "final losses (step 3, from tensorboard)" in card  # the run's TensorBoard scalars
    assert "image use (fixed val batch, step 3)" in card and "finding, side or severity: gain" in card
    assert "timm: timm.create_model('vit_tiny_patch16_224'" in pretrained["log"]


def test_consolidated_weights_are_the_trained_ones(pretrained):
    """The trainer's trace holds a digest of the final (bf16) parameters gathered from the ZeRO-3 shards; the
    exported fp32 master weights rounded to bf16 must give the same digest."""
    from mrm_scale.eval.loading import load_full_model

    final = [json.loads(line) for line in open(pretrained["run_dir"] / "trace" / "rank0.jsonl")][-1]
    model = load_full_model(str(pretrained["export"]))
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode() + p.detach().to(torch.bfloat16).float().numpy().tobytes())
    assert h.hexdigest() == final["param_sha256"]


def test_timm_and_transformers_one_call_loads_reproduce_the_model(pretrained):
    import timm
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mrm_scale.formats import shards as sf
    from mrm_scale.model import build_model

    out = pretrained["export"]
    meta = json.loads((out / "mrm_config.json").read_text())
    # the full model: build_model + a strict load_state_dict
    tok = meta["tokenizer"]
    model = build_model("tiny", vocab_size=tok["vocab_size"], pad_token_id=tok["pad_id"], cls_token_id=tok["cls_id"],
                        sep_token_id=tok["sep_id"], mask_token_id=tok["mask_id"], **{
                            k: v for k, v in meta["model"].items() if k != "name"}).eval()
    model.load_state_dict(load_file(str(out / "mrm_full.safetensors")), strict=True)

    # timm, in the one call the card gives
    encoder_file = str(out / "image_encoder.safetensors")
    assert meta["timm"]["name"] == "vit_tiny_patch16_224"
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=encoder_file),
                            num_classes=0, **meta["timm"]["kwargs"]).eval()
    assert meta["timm"]["kwargs"] == {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
    torch.manual_seed(0)
    image = torch.randn(4, 3, 128, 128)  # a high-resolution batch; the encoder sees it at 64 px
    from mrm_scale.model import downsample

    x = downsample(image, 64)
    with torch.no_grad():
        theirs = vit.forward_features(x)
        ours = model.encoder(x)
    assert theirs.shape == ours.shape == (4, 65, 64)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (theirs[:, 1:].mean(1) - ours[:, 1:].mean(1)).abs().max().item() < 1e-4
    with torch.no_grad():  # and not a fresh init: the pretrained weights changed the features
        fresh = build_model("tiny", report_weight=0).encoder.eval()(x)
    assert (fresh - ours).abs().max().item() > 1e-3

    # transformers: model and tokenizer from one folder each call
    mlm = AutoModelForMaskedLM.from_pretrained(str(out / "report_model")).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out / "report_model"))
    # the tokenizer encodes a report exactly like prep stored it
    key, parts = next(iter(sf.iter_tar_samples(sorted(glob.glob(str(pretrained["shards"] / "val-*.tar")))[0])))
    ids, att, _ = sf.decode_tokens(parts["ids"], parts["flags"])
    enc = hf_tok(parts["txt"].decode(), truncation=True, max_length=100)
    assert enc["input_ids"] == ids[att.astype(bool)].tolist(), key
    batch = hf_tok(["left pleural effusion .", "no acute cardiopulmonary process"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = mlm(**batch).logits
        b = model.report.mlm(**batch).logits
    assert (a - b).abs().max().item() < 1e-4

    # MRM's conditioning recipe from the card: image_proj(mean patch tokens) added at every position to the output
    # of the embeddings module, then BERT's layers and the MLM head
    proj = torch.nn.Linear(64, 64)
    proj.load_state_dict(load_file(str(out / "report_model" / "image_proj.safetensors")))
    ids_t, mask_t = torch.from_numpy(ids)[None], torch.from_numpy(att)[None]
    with torch.no_grad():
        cond = proj(theirs[:1, 1:].mean(1))
        hidden = mlm.bert.embeddings(input_ids=ids_t) + cond[:, None]
        keep = mask_t.bool()[:, None, None, :]  # (B, 1, 1, L), True = attend
        logits = mlm.cls(mlm.bert.encoder(hidden, attention_mask=keep).last_hidden_state)
        latent = model.encoder(x[:1])
        token_mask = mask_t.bool()
        loss, pred = model.report(latent, ids_t, mask_t, token_mask, ids_t, "all")
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids_t.reshape(-1))
    assert abs(float(loss) - float(ref)) < 1e-4
    assert torch.equal(pred[token_mask], logits.argmax(-1)[token_mask])


def test_checkpoint_folder_and_run_folder_give_the_same_export(pretrained, tmp_path):
    from safetensors.torch import load_file

    from mrm_scale.eval.export import export
    from mrm_scale.eval.loading import load_encoder_weights

    meta = export(str(pretrained["ckpt"]), str(tmp_path / "from_ckpt"))
    assert meta["source"]["checkpoint"] == str(pretrained["ckpt"])
    a = load_file(str(tmp_path / "from_ckpt" / "mrm_full.safetensors"))
    b = load_file(str(pretrained["export"] / "mrm_full.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # fine-tuning's --init RUN takes the export's consolidation path
    _, from_run, _ = load_encoder_weights(str(pretrained["run_dir"]))
    _, from_export, _ = load_encoder_weights(str(pretrained["export"]))
    assert from_run.keys() == from_export.keys() and all(torch.equal(from_run[k], from_export[k]) for k in from_run)
    # an existing non-empty --out is not overwritten silently
    code, out = export_cli(pretrained["ckpt"], "--out", tmp_path / "from_ckpt", check=False)
    assert code == 2 and "--overwrite" in out


def test_export_refuses_incomplete_checkpoints_naming_the_missing_files(pretrained, tmp_path):
    from mrm_scale.eval.export import ExportError, export

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained["run_dir"], run_dir)
    ckpt = run_dir / "checkpoints" / "step00000003"
    os.remove(ckpt / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.remove(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    code, out = export_cli(ckpt, "--out", tmp_path / "x", check=False)
    assert code == 2 and "incomplete checkpoint" in out
    assert ("missing: zero_pp_rank_0_mp_rank_00_model_states.pt, bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt ("
            in out)
    assert not (tmp_path / "x").exists()
    os.remove(ckpt / "COMPLETE.json")  # an interrupted save: the run has no complete checkpoint left
    with pytest.raises(ExportError, match="no complete checkpoint .*step00000003 lack COMPLETE.json"):
        export(str(run_dir), str(tmp_path / "x"))
    with pytest.raises(ExportError, match="missing: COMPLETE.json, zero_pp_rank_0_mp_rank_00_model_states.pt"):
        export(str(ckpt), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_export_of_a_truncated_checkpoint_names_the_file(pretrained, tmp_path):
    from mrm_scale.eval.loading import CheckpointRef, ExportError, consolidate, unreadable_files

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained["run_dir"], run_dir)
    ckpt = run_dir / "checkpoints" / "step00000003"
    cut = ckpt / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(size // 2)
    code, out = export_cli(ckpt, "--out", tmp_path / "x", check=False)
    assert code == 2 and f"{cut} is {size // 2} bytes, {size} when saved" in out, out[-2000:]
    assert "Traceback" not in out and not (tmp_path / "x").exists()
    # past the size record (a checkpoint saved before sizes were recorded): the unreadable file is named
    assert str(cut) in unreadable_files(str(ckpt))
    with pytest.raises(ExportError, match=f"{cut}.*cannot be read"):
        consolidate(CheckpointRef(str(ckpt.parent), ckpt.name, str(run_dir)), 3)


def test_timm_spec_for_every_preset():
    """Presets with a timm name load into exactly that architecture, without kwargs (input 224, patch 16/14)."""
    from mrm_scale.eval.timm_interop import timm_call, timm_spec
    from mrm_scale.model import get_preset

    assert timm_spec(get_preset("base")) == ("vit_base_patch16_224", {})
    assert timm_call(get_preset("base"), "P") == ("timm.create_model('vit_base_patch16_224', pretrained=True, "
                                                  "pretrained_cfg_overlay=dict(file='P'), num_classes=0)")
    for name, timm_name in (("small", "vit_small_patch16_224"), ("large", "vit_large_patch16_224"),
                            ("huge", "vit_huge_patch14_224"), ("giant", "vit_giant_patch14_224")):
        assert timm_spec(get_preset(name)) == (timm_name, {}), name
    assert timm_spec(get_preset("base", img_size=256, in_chans=1)) == ("vit_base_patch16_224",
                                                                      {"img_size": 128, "in_chans": 1})
