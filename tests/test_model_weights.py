"""Initialising the image encoder from timm/MAE weights and the report head from BERT weights; export round trips."""

from __future__ import annotations

import pytest
import torch

from mrm_scale.model import build_model, get_preset
from mrm_scale.model.mrm import ImageEncoder
from mrm_scale.model.weights import WeightLoadError, load_image_encoder, load_report_head

IDS = dict(vocab_size=500, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)


def _timm_vit(cfg, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    return VisionTransformer(**{**cfg.timm_kwargs(), **kw}).eval()


@pytest.fixture(scope="module")
def vit_b_files(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    d = tmp_path_factory.mktemp("vitb")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "vit_b.safetensors"))
    torch.save(sd, d / "vit_b.pth")
    return sd, d


@pytest.mark.parametrize("name", ["vit_b.safetensors", "vit_b.pth"])
def test_timm_vit_b_loads_into_base_encoder(vit_b_files, name):
    sd, d = vit_b_files
    enc = ImageEncoder(get_preset("base"))
    rep = load_image_encoder(enc, d / name)
    assert rep.missing == [] and rep.unexpected == [] and not rep.adapted
    assert len(rep.loaded) == len(sd) == len(enc.state_dict())
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_mae_checkpoint_wrapper_and_extra_keys(tmp_path):
    cfg = get_preset("tiny")
    sd = _timm_vit(cfg).state_dict()
    mae = {**sd, "decoder_embed.weight": torch.zeros(4, 4), "mask_token": torch.zeros(1, 1, 4)}
    torch.save({"model": mae, "optimizer": {}, "epoch": 3}, tmp_path / "checkpoint-399.pth")
    m = build_model(cfg, **IDS)
    rep = load_image_encoder(m, tmp_path / "checkpoint-399.pth")
    assert rep.missing == [] and rep.unexpected == ["decoder_embed.weight", "mask_token"]  # named
    assert torch.equal(m.encoder.cls_token, sd["cls_token"])
    # one of our own MRM state dicts ("encoder." prefix) works too
    other = build_model(cfg, **IDS)
    rep = load_image_encoder(other, m.state_dict())
    assert rep.missing == [] and torch.equal(other.encoder.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_encoder_matches_timm_forward_after_export():
    cfg = get_preset("tiny")
    m = build_model(cfg, **IDS)
    vit = _timm_vit(cfg)
    vit.load_state_dict(m.encoder.state_dict(), strict=True)  # 1:1 keys, nothing left over
    x = torch.randn(2, 3, cfg.input_size, cfg.input_size)
    m.eval()
    torch.testing.assert_close(m.encoder(x), vit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_different_grid_is_interpolated():
    from timm.layers import resample_abs_pos_embed

    cfg = get_preset("tiny")  # 8 x 8 grid
    src = _timm_vit(cfg, img_size=96).state_dict()  # 12 x 12 grid
    m = build_model(cfg, **IDS)
    rep = load_image_encoder(m, src)
    assert "pos_embed" in rep.adapted and rep.missing == []
    want = resample_abs_pos_embed(src["pos_embed"], new_size=[8, 8], old_size=[12, 12], num_prefix_tokens=1)
    torch.testing.assert_close(m.encoder.pos_embed, want)
    assert torch.equal(m.encoder.blocks[1].mlp.fc2.weight, src["blocks.1.mlp.fc2.weight"])


def test_patch_embed_channels_adapt_both_ways():
    cfg3 = get_preset("tiny")
    src3 = _timm_vit(cfg3).state_dict()
    gray = build_model(cfg3.replace(in_chans=1), **IDS)
    rep = load_image_encoder(gray, src3)
    assert "patch_embed.proj.weight" in rep.adapted
    torch.testing.assert_close(gray.encoder.patch_embed.proj.weight, src3["patch_embed.proj.weight"].sum(1, keepdim=True))
    # a replicated gray image gives the same patch embedding through both
    x = torch.randn(1, 1, 64, 64)
    src_model = _timm_vit(cfg3)
    torch.testing.assert_close(gray.encoder.patch_embed(x), src_model.patch_embed(x.expand(-1, 3, -1, -1)),
                               rtol=1e-5, atol=1e-5)

    src1 = _timm_vit(cfg3.replace(in_chans=1)).state_dict()
    rgb = build_model(cfg3, **IDS)
    load_image_encoder(rgb, src1)
    torch.testing.assert_close(rgb.encoder.patch_embed.proj.weight, src1["patch_embed.proj.weight"].repeat(1, 3, 1, 1) / 3)


def test_nothing_matching_raises_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unrelated.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(path))
    m = build_model("tiny", **IDS)
    with pytest.raises(WeightLoadError, match="unrelated.safetensors.*no key matches"):
        load_image_encoder(m, path)
    with pytest.raises(WeightLoadError, match="unrelated.safetensors.*no key matches"):
        load_report_head(m, path)
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_image_encoder(m, tmp_path / "absent.pth")
    big = _timm_vit(get_preset("tiny", embed_dim=96, num_heads=4)).state_dict()  # wrong width: loud, named
    with pytest.raises(WeightLoadError, match="blocks.0.attn.qkv.weight"):
        load_image_encoder(m, big)


def test_bert_save_pretrained_directory_loads_into_report_head(tmp_path):
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    m = build_model("tiny", **IDS)
    torch.manual_seed(3)
    src = BertForMaskedLM(m.report.mlm.config)
    src.save_pretrained(tmp_path / "bert")
    rep = load_report_head(m, tmp_path / "bert")
    assert rep.missing == [] and rep.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(m.report.mlm.state_dict()[k], v), k
    mlm = m.report.mlm
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight  # still tied

    # and the report head exports the other way: AutoModelForMaskedLM reads it back
    mlm.save_pretrained(tmp_path / "export")
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(4, 500, (2, 12))
    mlm.eval()
    torch.testing.assert_close(back(input_ids=ids).logits, mlm(input_ids=ids).logits)

    other = build_model("tiny", **{**IDS, "vocab_size": 600})
    with pytest.raises(WeightLoadError, match="vocabulary mismatch.*500 rows.*600 tokens"):
        load_report_head(other, tmp_path / "bert")
