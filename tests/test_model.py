"""MRM model: masking, losses, attention paths, determinism, gradients, presets, FLOPs, model-info."""

from __future__ import annotations

import json

import pytest
import torch

from mrm_scale.model import (
    build_model,
    get_preset,
    materialize,
    param_groups,
    patchify,
    unpatchify,
    whole_word_mask,
)
from mrm_scale.model.flops import count_training_flops, formula_training_flops, synthetic_batch
from mrm_scale.model.masking import apply_token_mask, make_generator, random_patch_mask

VOCAB = 500
IDS = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
SPECIALS = (0, 1, 2, 3)


def random_batch(cfg, b: int = 4, seed: int = 0, vocab: int = VOCAB) -> dict:
    """Contract batch: [CLS] pieces... [SEP] [PAD]..., random report lengths, ~35% of words split in pieces."""
    g = torch.Generator().manual_seed(seed)
    length = cfg.max_tokens
    pos = torch.arange(length)
    n_content = torch.randint(10, length - 1, (b, 1), generator=g)  # content tokens between [CLS] and [SEP]
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = IDS["cls_token_id"]
    sep = (pos[None] == n_content + 1)
    ids[sep] = IDS["sep_token_id"]
    pad = pos[None] > n_content + 1
    ids[pad] = IDS["pad_token_id"]
    content = (pos[None] >= 1) & (pos[None] <= n_content)
    word_start = (torch.rand(b, length, generator=g) < 0.65) & content
    word_start[:, 1] = True
    return {
        "image": torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g),
        "input_ids": ids,
        "attention_mask": (~pad).long(),
        "word_start": word_start,
        "key": [f"s{i}" for i in range(b)],
    }


def tiny(**overrides):
    """The tiny model without text dropout (a forward is then a pure function of the seed) unless overridden."""
    torch.manual_seed(0)
    overrides.setdefault("text_dropout", 0.0)
    return build_model("tiny", vocab_size=VOCAB, **IDS, **overrides)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def batch():
    return random_batch(get_preset("tiny"))


# ---------------------------------------------------------------------------------------------------------------
# presets and geometry
# ---------------------------------------------------------------------------------------------------------------
def test_presets_and_errors():
    base = get_preset("base")
    assert (base.img_size, base.input_size, base.patch_size, base.num_patches, base.num_visible) == (448, 224, 16, 196, 49)
    assert (base.out_patch_size, base.pred_dim) == (32, 32 * 32 * 3)
    assert (base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads) == (768, 4, 6)
    assert (base.text_width, base.text_depth, base.text_heads, base.text_intermediate) == (384, 6, 6, 1536)
    huge = get_preset("huge")
    assert (huge.input_size, huge.patch_size, huge.out_patch_size) == (224, 14, 28)
    assert get_preset("giant").embed_dim == 1408
    assert get_preset("tiny", in_chans=1).in_chans == 1
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny, small, base, large, huge, giant"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown model config field"):
        get_preset("tiny", widht=3)
    with pytest.raises(ValueError, match="report_loss"):
        get_preset("tiny", report_loss="some")
    with pytest.raises(ValueError, match="needs .*vocab_size"):
        build_model("tiny", device="meta")


def test_patchify_target_is_the_32px_block_of_the_highres_image():
    cfg = get_preset("base")
    img = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    target = patchify(img, cfg.out_patch_size)
    assert target.shape == (2, 196, 32 * 32 * 3) == (2, cfg.num_patches, cfg.pred_dim)
    for k in (0, 15, 195):  # patch k of the 14 x 14 encoder grid <-> 32-px block (row k // 14, col k % 14)
        r, c = divmod(k, cfg.grid_size)
        block = img[1, :, 32 * r : 32 * r + 32, 32 * c : 32 * c + 32]
        assert torch.equal(target[1, k], block.permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(target, 32, 3), img)
    # the model's decoder predicts that many values for every patch (meta: shapes only)
    meta = build_model("base", vocab_size=VOCAB, **IDS, device="meta")
    out = meta(synthetic_batch(meta.cfg, 2, device="meta"))
    assert out.pred_pixels.shape == (2, 196, 3072) and out.patch_mask.shape == (2, 196)


# ---------------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------------
def _patch_box(cfg, k: int, inset: int = 0):
    r, c = divmod(k, cfg.grid_size)
    p = cfg.out_patch_size
    return slice(p * r + inset, p * r + p - inset), slice(p * c + inset, p * c + p - inset)


def test_image_loss_counts_removed_patches_only(model, batch):
    cfg = model.cfg
    out = model(batch, seed=7)
    mask = out.patch_mask[0]
    removed = int(torch.nonzero(mask == 1)[0])
    visible = int(torch.nonzero(mask == 0)[0])
    img = batch["image"]

    # targets: editing a visible patch's target changes nothing, a removed patch's target changes the loss
    for k, should_change in ((visible, False), (removed, True)):
        tgt = img.clone()
        rows, cols = _patch_box(cfg, k)
        tgt[0, :, rows, cols] = torch.randn_like(tgt[0, :, rows, cols]) * 3
        loss = model(batch, seed=7, target_image=tgt).image_loss
        assert (loss != out.image_loss).item() == should_change, (k, should_change)

    # end to end: the interior of a removed 2x-patch (2 px inside; bicubic reaches 2 px) never reaches the encoder
    edited = dict(batch)
    edited["image"] = img.clone()
    rows, cols = _patch_box(cfg, removed, inset=2)
    edited["image"][0, :, rows, cols] += 5.0
    out2 = model(edited, seed=7)
    assert torch.equal(out2.patch_mask, out.patch_mask)
    assert torch.equal(out2.pred_pixels, out.pred_pixels)  # the model saw nothing of it
    assert out2.image_loss != out.image_loss  # but its target changed
    edited["image"] = img.clone()
    rows, cols = _patch_box(cfg, visible, inset=2)
    edited["image"][0, :, rows, cols] += 5.0
    assert not torch.equal(model(edited, seed=7).pred_pixels, out.pred_pixels)


def test_norm_pix_loss_value(model, batch):
    out = model(batch, seed=3)
    t = patchify(batch["image"], model.cfg.out_patch_size)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per = ((out.pred_pixels - t) ** 2).mean(-1)
    expected = (per * out.patch_mask).sum() / out.patch_mask.sum()
    torch.testing.assert_close(out.image_loss, expected)
    assert model.cfg.norm_pix_loss and out.loss.dtype == torch.float32


def test_report_loss_masked_ignores_unmasked_and_padding_labels(model, batch):
    out = model(batch, seed=11)
    tm = out.token_mask
    assert tm.any()
    labels = batch["input_ids"].clone()
    unmasked = ~tm
    labels[unmasked] = (labels[unmasked] + 7) % VOCAB  # every unmasked position, special and padding included
    assert torch.equal(model(batch, seed=11, labels=labels).report_loss, out.report_loss)
    labels_m = batch["input_ids"].clone()
    labels_m[tm] = (labels_m[tm] + 7) % VOCAB
    assert model(batch, seed=11, labels=labels_m).report_loss != out.report_loss

    all_model = tiny(report_loss="all")
    all_model.load_state_dict(model.state_dict())
    ref = all_model(batch, seed=11)
    assert torch.equal(ref.token_mask, tm)
    pad_labels = batch["input_ids"].clone()
    pad = batch["attention_mask"] == 0
    assert pad.any()
    pad_labels[pad] = 9
    assert all_model(batch, seed=11, labels=pad_labels).report_loss != ref.report_loss
    # the total is image + lambda * report
    torch.testing.assert_close(out.loss, out.image_loss + model.cfg.report_weight * out.report_loss)


def test_report_is_conditioned_on_the_image(model, batch):
    out = model(batch, seed=5)
    other = dict(batch)
    other["image"] = torch.randn_like(batch["image"])
    out2 = model(other, seed=5)
    assert torch.equal(out2.token_mask, out.token_mask)
    assert out2.report_loss != out.report_loss


# ---------------------------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------------------------
def test_whole_word_masking_statistics_and_rules():
    cfg = get_preset("tiny")
    b = random_batch(cfg, b=400, seed=1)
    ids, am, ws = b["input_ids"], b["attention_mask"], b["word_start"]
    # make some continuation pieces run right up to [SEP] and give one sample no padding at all
    gen = make_generator(123, "cpu")
    tm = whole_word_mask(ids, am, ws, 0.5, SPECIALS, gen)

    word_id = torch.cumsum(ws.long(), 1)
    special = (am == 0) | torch.isin(ids, torch.tensor(SPECIALS))
    assert not (tm & special).any(), "special tokens or padding masked"
    in_word = (word_id > 0) & ~special
    # every piece carries the decision of its word's first piece
    start_pos = torch.where(ws, torch.arange(ids.shape[1]).expand_as(ids), 0)
    first_piece_of_word = torch.cummax(start_pos, dim=1).values
    assert torch.equal(tm[in_word], torch.gather(tm, 1, first_piece_of_word)[in_word])
    assert (in_word & ~ws).any(), "the test batch must contain continuation pieces"
    # about half the words: n ~ 20k words, sd ~ 0.0035 -> a 0.03 band is > 8 sd
    words = ws & ~special
    frac = tm[words].float().mean().item()
    assert abs(frac - 0.5) < 0.03, frac
    # masked pieces become [MASK]; nothing else changes
    mids = apply_token_mask(ids, tm, IDS["mask_token_id"])
    assert (mids[tm] == IDS["mask_token_id"]).all() and torch.equal(mids[~tm], ids[~tm])
    # probability is honoured
    assert not whole_word_mask(ids, am, ws, 0.0, SPECIALS, gen).any()
    assert torch.equal(whole_word_mask(ids, am, ws, 1.0, SPECIALS, gen), in_word)


def test_patch_masking_per_sample():
    gen = make_generator(0, "cpu")
    keep, restore, mask = random_patch_mask(64, 196, 0.75, gen, "cpu")
    assert keep.shape == (64, 49) and (mask.sum(1) == 147).all()
    assert torch.equal(torch.gather(mask, 1, keep), torch.zeros(64, 49))  # kept patches are the visible ones
    assert len({tuple(r) for r in mask.long().tolist()}) == 64  # every sample its own mask


def test_same_seed_same_masks_and_loss(model, batch):
    a, b = model(batch, seed=42), model(batch, seed=42)
    assert torch.equal(a.patch_mask, b.patch_mask) and torch.equal(a.token_mask, b.token_mask)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.masked_input_ids, b.masked_input_ids)
    c = model(batch, seed=43)
    assert not torch.equal(a.patch_mask, c.patch_mask)
    assert not torch.equal(a.token_mask, c.token_mask)
    g = torch.Generator().manual_seed(42)  # a generator works as well as an int
    assert torch.equal(model(batch, seed=g).patch_mask, a.patch_mask)
    assert (a.masked_input_ids[a.token_mask] == IDS["mask_token_id"]).all()
    assert torch.equal(a.report_pred_ids[~a.token_mask], a.masked_input_ids[~a.token_mask])


# ---------------------------------------------------------------------------------------------------------------
# attention paths, precision
# ---------------------------------------------------------------------------------------------------------------
def test_sdpa_matches_plain_softmax_attention(batch):
    m = tiny()
    blk = m.encoder.blocks[0]
    x = torch.randn(3, 17, m.cfg.embed_dim)
    assert blk.attn.fused_attn
    fused = blk(x)
    blk.attn.fused_attn = False
    torch.testing.assert_close(blk(x), fused, rtol=1e-5, atol=1e-5)
    blk.attn.fused_attn = True

    ref = m(batch, seed=1)
    assert m.report.mlm.config._attn_implementation == "sdpa"
    for b in list(m.encoder.blocks) + list(m.decoder.blocks):
        b.attn.fused_attn = False
    m.report.mlm.set_attn_implementation("eager")
    plain = m(batch, seed=1)
    torch.testing.assert_close(plain.image_loss, ref.image_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.report_loss, ref.report_loss, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_close_to_fp32(model, batch):
    ref = model(batch, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch, seed=2)
    assert low.loss.dtype == low.image_loss.dtype == low.report_loss.dtype == torch.float32
    assert low.pred_pixels.dtype == torch.bfloat16  # the matmuls did run in bf16
    torch.testing.assert_close(low.image_loss, ref.image_loss, rtol=3e-2, atol=0)
    torch.testing.assert_close(low.report_loss, ref.report_loss, rtol=3e-2, atol=0)
    # weights cast to bf16 (DeepSpeed's bf16 mode) with the loader's fp32 image: still fp32 losses, still close
    m16 = tiny()
    m16.load_state_dict(model.state_dict())
    m16.to(torch.bfloat16)
    pure = m16(batch, seed=2)
    assert pure.loss.dtype == torch.float32
    torch.testing.assert_close(pure.image_loss, ref.image_loss, rtol=3e-2, atol=0)
    torch.testing.assert_close(pure.report_loss, ref.report_loss, rtol=3e-2, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# gradients, scale features
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "report_weight,extra", [(1.0, {}), (0.0, {}), (1.0, {"pos_embed": "learned", "drop_path": 0.1})]
)
def test_every_parameter_gets_a_gradient(batch, report_weight, extra):
    m = tiny(report_weight=report_weight, **extra)
    assert isinstance(m.encoder.pos_embed, torch.nn.Parameter) == bool(extra)
    if report_weight == 0:
        assert m.report is None and not any(n.startswith("report") for n, _ in m.named_parameters())
    out = m(batch, seed=0)
    out.loss.backward()
    if report_weight == 0:
        assert out.report_loss is None and torch.equal(out.loss, out.image_loss)
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert all(p.requires_grad for p in m.parameters())


def test_activation_checkpointing_same_loss_and_grads(batch):
    plain, ckpt = tiny(), tiny(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    outs = []
    for m in (plain, ckpt):
        out = m(batch, seed=4)
        out.loss.backward()
        outs.append(out.loss)
    torch.testing.assert_close(outs[0], outs[1])
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bucketed_vocabulary_rows_change_nothing_but_the_shapes(batch):
    """report_rows_multiple pads the masked rows of the vocabulary projection to a few shapes: the loss, every
    gradient and the predictions are those of the exact row count, and the counted model FLOPs skip the padding."""
    exact, bucketed = tiny(report_rows_multiple=1), tiny(report_rows_multiple=64)
    bucketed.load_state_dict(exact.state_dict())
    seen = []
    hook = bucketed.report.mlm.cls.predictions.decoder.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    outs = []
    for m in (exact, bucketed):
        out = m(batch, seed=4)
        out.loss.backward()
        outs.append(out)
    hook.remove()
    n = int(outs[0].token_mask.sum())
    assert n % 64 and seen == [n + (64 - n % 64)]  # the projection really ran on the padded rows
    torch.testing.assert_close(outs[0].loss, outs[1].loss)
    assert torch.equal(outs[0].report_pred_ids, outs[1].report_pred_ids)
    for (name, p), (_, q) in zip(exact.named_parameters(), bucketed.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert count_training_flops(bucketed, batch, seed=4)["total"] == count_training_flops(exact, batch, seed=4)["total"]
    assert bucketed.report.rows_multiple == 64  # restored after counting
    with pytest.raises(ValueError, match="report_rows_multiple"):
        get_preset("tiny", report_rows_multiple=0)


def test_one_channel_model_and_shape_errors():
    m = tiny(in_chans=1)
    b = random_batch(m.cfg, b=2)
    out = m(b, seed=0)
    assert out.pred_pixels.shape == (2, 64, 16 * 16 * 1)
    b["image"] = torch.randn(2, 3, 128, 128)
    with pytest.raises(ValueError, match=r"expects \(B, 1, 128, 128\)"):
        m(b, seed=0)


def test_param_groups_split(model):
    groups = param_groups(model, 0.05)
    decay, no_decay = (dict(zip(g["names"], g["params"])) for g in groups)
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert not set(decay) & set(no_decay)
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    for name in ("encoder.cls_token", "decoder.mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias",
                 "report.mlm.bert.embeddings.position_embeddings.weight", "report.mlm.cls.predictions.bias"):
        assert name in no_decay, name
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "decoder.pred.weight",
                 "report.mlm.bert.embeddings.word_embeddings.weight", "report.image_proj.weight"):
        assert name in decay, name
    assert model.no_weight_decay() == set(no_decay)


def test_meta_build_then_materialize(batch):
    m = build_model("tiny", vocab_size=VOCAB, **IDS, device="meta")
    assert all(p.is_meta for p in m.parameters())
    materialize(m, "cpu")
    mlm = m.report.mlm
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    assert torch.equal(m.encoder.pos_embed, tiny().encoder.pos_embed)  # sin-cos table rebuilt
    out = m(batch, seed=0)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
# parameter counts, FLOPs, model-info
# ---------------------------------------------------------------------------------------------------------------
def test_base_parameter_counts_match_the_paper_architecture():
    import timm
    from transformers import BertConfig, BertForMaskedLM

    m = build_model("base", vocab_size=30522, **IDS, device="meta")
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        bert = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                          num_attention_heads=6, intermediate_size=1536))
    counts = m.parameter_counts()
    vit_count = sum(p.numel() for p in vit.parameters())
    assert counts["encoder"] == vit_count == 85_798_656
    ours = {k: tuple(v.shape) for k, v in m.encoder.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in vit.state_dict().items()}  # 1:1 onto timm's keys
    block = sum(p.numel() for p in vit.blocks[0].parameters())  # decoder: 4 ViT-B blocks + embed, head, tables
    assert counts["decoder"] == 4 * block + (768 * 768 + 768) + 768 + 197 * 768 + 2 * 768 + (768 * 3072 + 3072)
    bert_count = sum(p.numel() for p in bert.parameters())  # no pooler either side
    assert counts["report"] == bert_count + 768 * 384 + 384
    assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["report"]


def test_encoder_exports_to_every_presets_timm_model():
    import timm

    for name in ("small", "large", "huge", "giant"):
        cfg = get_preset(name)
        m = build_model(cfg, report_weight=0, device="meta")
        with torch.device("meta"):
            vit = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0)
        assert {k: v.shape for k, v in m.encoder.state_dict().items()} == {
            k: v.shape for k, v in vit.state_dict().items()
        }, name


def test_counted_flops_match_formula():
    tiny_model = tiny()
    cpu = count_training_flops(tiny_model, synthetic_batch(tiny_model.cfg, 2, vocab_size=VOCAB))
    f = formula_training_flops(tiny_model, masked_tokens=cpu["masked_tokens_per_sample"])
    assert abs(cpu["per_sample"] / f["total"] - 1) < 0.05
    assert all(p.grad is None for p in tiny_model.parameters())  # counting leaves .grad alone
    for name in ("tiny", "base"):  # meta: the same kernels' formulas, no memory
        m = build_model(name, vocab_size=30522, **IDS, device="meta")
        counted = count_training_flops(m, synthetic_batch(m.cfg, 2, device="meta"))
        f = formula_training_flops(m, masked_tokens=counted["masked_tokens_per_sample"])
        assert abs(counted["per_sample"] / f["total"] - 1) < 0.05, name
    # base trains at roughly 3 x (ViT-B on 50 tokens + decoder on 197 + BERT-small on 100) ~ 74 GFLOPs / sample
    assert 60e9 < f["total"] < 90e9


def test_model_info_runs_for_every_preset(capsys):
    from mrm_scale.cli import main

    assert main(["model-info", "all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["preset"]: r for r in data["rows"]}
    assert list(rows) == ["tiny", "small", "base", "large", "huge", "giant"]
    for name, r in rows.items():
        assert r["gflops_counted"] and abs(r["counted_vs_formula"]) < 0.05, name
    assert rows["giant"]["params"]["encoder"] == 1_011_202_432
    assert rows["base"]["params"]["encoder"] == 85_798_656
    assert main(["model-info", "tiny", "--set", "report_weight=0"]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "GFLOPs" in table
    assert main(["model-info", "nope"]) == 2
    assert "valid presets" in capsys.readouterr().err
