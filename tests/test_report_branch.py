"""The report branch, pinned to the method: image conditioning after BERT's embeddings, its loss against a plain
statement of the paper's branch, tokens that stay distinguishable, an image that changes the prediction, dropout
that never touches the image vector, and a small training in which the image must decide a word."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrm_scale.model import build_model, get_preset
from mrm_scale.model.diagnostics import image_use
from mrm_scale.model.presets import PRESETS
from test_model import IDS, VOCAB, random_batch, tiny


def encoder_output(model, batch, seed):
    """(model output, the encoder's output on the kept patches) of one forward."""
    seen = {}
    handle = model.encoder.register_forward_hook(lambda mod, args, out: seen.__setitem__("latent", out))
    try:
        out = model(batch, seed=seed)
    finally:
        handle.remove()
    return out, seen["latent"]


def plain_report_loss(model, latent, masked_ids, attention_mask, token_mask, labels):
    """The paper's report branch written out: BERT embeddings (word + position + type, LayerNorm) -> + the projected
    mean of the visible patch tokens at every position -> BERT layers -> MLM head -> cross-entropy at the masked
    positions. Only the weights come from the model."""
    mlm = model.report.mlm
    c = mlm.config
    emb = mlm.bert.embeddings
    length = masked_ids.shape[1]
    x = (emb.word_embeddings.weight[masked_ids] + emb.position_embeddings.weight[:length][None]
         + emb.token_type_embeddings.weight[0])
    x = F.layer_norm(x, (c.hidden_size,), emb.LayerNorm.weight, emb.LayerNorm.bias, c.layer_norm_eps)
    proj = model.report.image_proj
    patches = latent[:, 1:]  # the class token is not pooled
    x = x + (patches @ proj.weight.T + proj.bias).mean(dim=1, keepdim=True)  # project each token, then mean
    heads = c.num_attention_heads
    dh = c.hidden_size // heads
    bias = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill(attention_mask == 0, float("-inf"))
    b = x.shape[0]
    for layer in mlm.bert.encoder.layer:
        s = layer.attention.self

        def split(t):
            return t.view(b, length, heads, dh).transpose(1, 2)

        q, k, v = split(F.linear(x, s.query.weight, s.query.bias)), split(F.linear(x, s.key.weight, s.key.bias)), \
            split(F.linear(x, s.value.weight, s.value.bias))
        att = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5 + bias[:, None, None, :], dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, length, c.hidden_size)
        o = layer.attention.output
        x = F.layer_norm(F.linear(ctx, o.dense.weight, o.dense.bias) + x, (c.hidden_size,), o.LayerNorm.weight,
                         o.LayerNorm.bias, c.layer_norm_eps)
        h = F.gelu(F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
        o = layer.output
        x = F.layer_norm(F.linear(h, o.dense.weight, o.dense.bias) + x, (c.hidden_size,), o.LayerNorm.weight,
                         o.LayerNorm.bias, c.layer_norm_eps)
    t = mlm.cls.predictions.transform
    h = F.layer_norm(F.gelu(F.linear(x, t.dense.weight, t.dense.bias)), (c.hidden_size,), t.LayerNorm.weight,
                     t.LayerNorm.bias, c.layer_norm_eps)
    logits = h @ emb.word_embeddings.weight.T + mlm.cls.predictions.bias  # the output matrix is tied
    return F.cross_entropy(logits[token_mask], labels[token_mask])


def mean_token_cosine(x: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Mean cosine similarity between the distinct real tokens of each report (padding left out)."""
    sims = []
    for row, att in zip(x.float(), attention_mask.bool()):
        t = F.normalize(row[att], dim=-1)
        c = t @ t.T
        n = t.shape[0]
        sims.append((c.sum() - c.diagonal().sum()) / (n * (n - 1)))
    return float(torch.stack(sims).mean())


def test_report_loss_equals_plain_statement_of_the_paper():
    model = tiny().eval()
    # train the weights a little away from their init so the comparison is not only about initial values
    batch = random_batch(model.cfg, b=4, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for i in range(3):
        opt.zero_grad()
        model(batch, seed=i).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out, latent = encoder_output(model, batch, seed=17)
        ref = plain_report_loss(model, latent, out.masked_input_ids, batch["attention_mask"], out.token_mask,
                                batch["input_ids"])
    assert out.token_mask.sum() > 20
    torch.testing.assert_close(out.report_loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_tokens_stay_distinguishable_at_the_input_of_the_bert_layers(preset):
    torch.manual_seed(0)
    model = build_model(preset, vocab_size=VOCAB, **IDS, text_dropout=0.0).eval()
    batch = random_batch(model.cfg, b=2, seed=1)
    with torch.no_grad():
        out, latent = encoder_output(model, batch, seed=5)
        x = model.report.embed(latent, out.masked_input_ids)
        ours = mean_token_cosine(x, batch["attention_mask"])
        # the placement that washed every token into one vector: the image vector added *before* the LayerNorm
        emb = model.report.mlm.bert.embeddings
        cond = model.report.condition(latent)
        washed = emb(inputs_embeds=emb.word_embeddings(out.masked_input_ids) + cond[:, None])
        before_norm = mean_token_cosine(washed, batch["attention_mask"])
    assert ours < 0.9, f"{preset}: tokens of one report look alike at the BERT input (mean cosine {ours:.3f})"
    assert before_norm > 0.95  # the check can tell the two placements apart


def test_two_images_give_different_report_logits_for_the_same_masked_report():
    model = tiny().eval()
    batch = random_batch(model.cfg, b=4, seed=2)
    with torch.no_grad():
        out, latent = encoder_output(model, batch, seed=9)
        ids, att = out.masked_input_ids, batch["attention_mask"]
        own = model.report.mlm.cls(model.report.encode(latent, ids, att))
        other = model.report.mlm.cls(model.report.encode(latent.roll(1, 0), ids, att))
    diff = (own - other).abs().amax(dim=-1)  # (B, L)
    assert bool((diff[out.token_mask] > 1e-3).all())
    scores = image_use(model, batch, seed=9)
    assert scores["loss_own_image"] == pytest.approx(float(out.report_loss), rel=1e-5)
    assert scores["loss_shuffled_image"] != pytest.approx(scores["loss_own_image"], abs=1e-6)


def test_text_dropout_is_the_originals_and_never_touches_the_image_vector():
    for name in PRESETS:
        assert get_preset(name).text_dropout == 0.1
    model = tiny(text_dropout=0.1)
    assert model.report.mlm.config.hidden_dropout_prob == model.report.mlm.config.attention_probs_dropout_prob == 0.1
    model.train()
    batch = random_batch(model.cfg, b=3, seed=4)
    latent_a = torch.randn(3, 1 + model.cfg.num_visible, model.cfg.embed_dim)
    latent_b = torch.randn_like(latent_a)
    ids = batch["input_ids"]
    torch.manual_seed(7)
    xa = model.report.embed(latent_a, ids)
    torch.manual_seed(7)  # the same dropout draws
    xb = model.report.embed(latent_b, ids)
    torch.manual_seed(8)
    xa2 = model.report.embed(latent_a, ids)
    assert not torch.allclose(xa, xa2)  # dropout acts on the embeddings in training
    expected = (model.report.condition(latent_a) - model.report.condition(latent_b))[:, None].expand_as(xa)
    torch.testing.assert_close(xa - xb, expected)  # the image vector itself passes undropped


def test_report_branch_learns_a_word_only_the_image_decides():
    """Images are dark or bright; the report's first word says which; every word is masked. The fillers are
    predictable from their positions, the first word only from the image: after a short training the model must
    get it right with its own image, and lose when the images are swapped."""
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=64, **IDS, text_dropout=0.0, word_mask_prob=1.0, max_tokens=8)
    cfg = model.cfg

    def records(b, g=None, alternate=False):
        cls = (torch.arange(b) % 2) if alternate else torch.randint(0, 2, (b,), generator=g)
        image = (cls.float() * 2 - 1)[:, None, None, None] + 0.3 * torch.randn(
            b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
        ids = torch.tensor([IDS["cls_token_id"], 0, 20, 21, 22, IDS["sep_token_id"], 0, 0]).repeat(b, 1)
        ids[:, 1] = 10 + cls
        att = (torch.arange(8) < 6).long().repeat(b, 1)
        word_start = ((torch.arange(8) >= 1) & (torch.arange(8) <= 4)).repeat(b, 1)
        return {"image": image, "input_ids": ids, "attention_mask": att, "word_start": word_start,
                "key": [str(i) for i in range(b)]}

    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        opt.zero_grad()
        model(records(16, g), seed=step).loss.backward()
        opt.step()
    model.eval()
    held_out = records(16, torch.Generator().manual_seed(99), alternate=True)  # neighbours differ in class
    first_word = torch.zeros(16, 8, dtype=torch.bool)
    first_word[:, 1] = True
    res = image_use(model, held_out, seed=1234, words=first_word)
    assert res["masked_finding_tokens"] == 16
    assert res["masked_accuracy_finding_words"] >= 0.9, res
    assert res["image_gain_finding_words"] > 0.5, res
    assert res["image_gain"] > 0.1, res


def test_finding_word_positions_cover_every_piece_of_the_chosen_words():
    from mrm_scale.data.synthetic import FINDING_WORDS, make_report
    from mrm_scale.data.tokenizer import encode_reports, train_wordpiece, word_positions

    reports = [make_report(i)[0] for i in range(200)]
    tok = train_wordpiece(reports, vocab_size=120)  # small: long words split into ## pieces
    text = "Small right pleural effusion. No pneumothorax. Mild cardiomegaly."
    (ids, ws, _), = encode_reports(tok, [text], 64)
    pad = 64 - len(ids)
    ids_a = torch.tensor([ids + [0] * pad])
    ws_a = torch.tensor([ws + [False] * pad])
    att = torch.tensor([[1] * len(ids) + [0] * pad])
    pos = word_positions(tok, ids_a.numpy(), ws_a.numpy(), att.numpy(), FINDING_WORDS)[0]
    pieces = [tok.id_to_token(i) for i in ids]
    assert any(p.startswith("##") for p, m in zip(pieces, pos) if m)  # a split word is marked whole
    marked = []
    for p, m, start in zip(pieces, pos, ws):
        if m:
            if start:
                marked.append(p)
            else:
                marked[-1] += p.removeprefix("##")
    assert marked == ["small", "right", "effusion", "pneumothorax", "mild", "cardiomegaly"], marked
    assert not pos[len(ids):].any()  # padding never
