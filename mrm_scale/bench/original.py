"""The original MRM code's training step on today's libraries: the baseline of ``mrm-scale bench step --original``.

What the paper's code computes per step, written plainly here (it is not imported: it is a 2022 script tree), with
the same sizes as the preset and on the same batch:

- the 448-px image resized to 224 px (bicubic) inside the step;
- encoder: timm ``PatchEmbed`` and timm ``Block`` layers (LayerNorm eps 1e-6, qkv bias), fixed 2-D sin-cos
  positions, random masking by argsort of uniform noise with gathers, class token; all the ViT's tokens
  normalised;
- report: a linear map of *every* encoder token to the text width, then the mean over the patch tokens; a
  ``transformers`` BERT masked-LM (its pooler kept and run, unused) whose embedding output gets that vector
  added; the vocabulary projection and the cross-entropy over **every** position of the report (unmasked and
  padding ones included: the labels are the input ids everywhere);
- pixel decoder: a linear embed, mask tokens appended and unshuffled with a gather, fixed positions, timm blocks
  over all patches + class token, the 32-px prediction, then ``norm_pix_loss`` MSE on the removed patches;
- mixed precision as the original loop: fp32 weights, forward *and backward* under autocast (bf16 here; the
  original's fp16 needs a loss scaler on CUDA), the total gradient norm computed (its loss scaler does that even
  without clipping), ``torch.optim.AdamW`` with its defaults for the device (betas 0.9/0.95, weight decay 0.05 on
  matrices).

The word mask is drawn once, before timing: the original masks words in its data loader, on the CPU workers, so
the masked ids are an input of its step as they are of ours (ours masks inside the step).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mrm_scale.model.masking import apply_token_mask, make_generator, random_patch_mask, whole_word_mask
from mrm_scale.model.mrm import pixel_loss
from mrm_scale.model.patches import patchify, sincos_table_2d
from mrm_scale.model.presets import MRMConfig

ORIGINAL_LN_EPS = 1e-6
ORIGINAL_ADAMW = dict(lr=1.5e-4, betas=(0.9, 0.95))
ORIGINAL_WEIGHT_DECAY = 0.05


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    from functools import partial

    from timm.models.vision_transformer import Block

    norm = partial(nn.LayerNorm, eps=ORIGINAL_LN_EPS)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


class OriginalMRM(nn.Module):
    """The original model's forward (see the module docstring) at the sizes of ``cfg``."""

    def __init__(self, cfg: MRMConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        from timm.layers import PatchEmbed
        from transformers import BertConfig, BertForMaskedLM, BertModel

        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.register_buffer("pos_embed", sincos_table_2d(d, cfg.grid_size, cls_token=True))
        self.blocks = _blocks(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=ORIGINAL_LN_EPS)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dd) * 0.02)
        self.register_buffer("decoder_pos_embed", sincos_table_2d(dd, cfg.grid_size, cls_token=True))
        self.decoder_blocks = _blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dd, eps=ORIGINAL_LN_EPS)
        self.decoder_pred = nn.Linear(dd, cfg.pred_dim)
        self.bert_mlp = nn.Linear(d, cfg.text_width)
        bert_cfg = BertConfig(
            vocab_size=vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
            num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=cfg.max_tokens,
            type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=pad_token_id,
            attn_implementation="sdpa",  # today's default, named: the boolean key-padding mask below is SDPA's form
        )
        self.bert = BertForMaskedLM(bert_cfg)
        # the original's BERT keeps its pooler (its subclass drops the flag that would remove it) and runs it
        self.bert.bert = BertModel(bert_cfg, add_pooling_layer=True)
        self.bert.tie_weights()

    def _encode(self, imgs: torch.Tensor, gen: torch.Generator | None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        n, length, d = x.shape
        # the original's masking is ours (argsort of uniform noise, keep the first part); its gather repeats the index
        ids_keep, ids_restore, removed = random_patch_mask(n, length, self.cfg.mask_ratio, gen, x.device)
        x = x.gather(1, ids_keep[..., None].repeat(1, 1, d))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), removed, ids_restore

    def _report_loss(self, latent: torch.Tensor, batch: dict) -> torch.Tensor:
        vec = self.bert_mlp(latent)[:, 1:].mean(dim=1)
        bert = self.bert.bert
        h = bert.embeddings(input_ids=batch["masked_ids"]) + vec.unsqueeze(1)
        keep = batch["attention_mask"].bool()[:, None, None, :]
        h = bert.encoder(h, attention_mask=keep).last_hidden_state
        bert.pooler(h)  # computed and unused, as in the original
        logits = self.bert.cls(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"].reshape(-1))

    def _decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        masks = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
        rest = torch.cat([x[:, 1:], masks], dim=1).gather(1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], rest], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, batch: dict, seed: int):
        big = batch["image"]
        imgs = F.interpolate(big, size=(self.cfg.input_size,) * 2, mode="bicubic", antialias=True)
        latent, removed, ids_restore = self._encode(imgs, make_generator(seed, big.device))
        report_loss = self._report_loss(latent, batch)
        pred = self._decode(latent, ids_restore)
        # the original's loss is ours: per-patch normalised 32-px targets, MSE over the removed patches
        image_loss = pixel_loss(pred, patchify(big, self.cfg.out_patch_size), removed, self.cfg.norm_pix_loss)
        return image_loss, report_loss


class OriginalStep:
    """:class:`OriginalMRM` with its optimizer and the batch, stepped as the original loop does."""

    def __init__(self, cfg: MRMConfig, batch: dict, vocab_size: int, ids: dict, precision: str, seed: int):
        device = batch["image"].device
        torch.manual_seed(seed)
        self.model = OriginalMRM(cfg, vocab_size, ids["pad_token_id"]).to(device).train()
        gen = make_generator(seed, device)
        specials = tuple(ids[k] for k in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"))
        token_mask = whole_word_mask(batch["input_ids"], batch["attention_mask"], batch["word_start"],
                                     cfg.word_mask_prob, specials, gen)
        self.batch = {**batch, "image": batch["image"].float(),
                      "masked_ids": apply_token_mask(batch["input_ids"], token_mask, ids["mask_token_id"])}
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": ORIGINAL_WEIGHT_DECAY},
                                      {"params": no_decay, "weight_decay": 0.0}], **ORIGINAL_ADAMW)
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.device = device
        self.grad_norm = float("nan")

    def step(self, seed: int) -> float:
        torch.manual_seed(seed)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            image_loss, report_loss = self.model(self.batch, seed)
            loss = image_loss + report_loss
            loss.backward()  # inside autocast, as the original loop
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())
