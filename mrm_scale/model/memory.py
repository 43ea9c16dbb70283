"""Activation memory of one training sample: by formula (any preset, any size) and measured (on this CPU).

What the planner (``mrm-scale plan``) needs per GPU besides the model states is the memory that grows with the
micro-batch: the tensors autograd keeps from the forward for the backward, plus the largest transient the
backward adds on top of them. Both are counted here per sample, in bytes, for the bf16 step the engine runs.

Formula (:func:`activation_bytes`), per sample, ``a`` = bytes per activation element (2 in bf16), over the
stacks of :mod:`mrm_scale.model.mrm`, with T tokens of width D, MLP width H and h heads:

- a pre-norm ViT block (encoder on K + 1 visible tokens, pixel decoder on N + 1) keeps ``T (8 D + 2 H) a``: the
  block input and the normed input of both halves (4 D), q, k, v (3 D, views of one qkv product), the attention
  output (D), the MLP's pre- and post-GELU (2 H); plus fp32 LayerNorm statistics ``2 * 2 * 4 T`` and the fused
  kernel's fp32 log-sum-exp ``4 h T``. An unfused ("math") kernel also keeps the h T^2 probabilities
  (``attention="math"``);
- a BERT layer (L report tokens) keeps the same ``L (8 D + 2 H) a`` plus its two dropout masks ``2 L D`` (1 byte
  each); its attention dropout lives inside the fused kernel on a GPU. As a CPU runs it (``attention="math"``):
  SDPA's unfused kernel computes half precision in fp32, so q, k and v are kept as fp32 copies (``3 L D 4``) and
  the probabilities, their dropout mask and the dropped probabilities as three fp32 ``h L^2`` tensors, and the CPU's
  dropout keeps its masks in the activation dtype (``2 L D a``);
- around the stacks: the patch projection's input, the encoder's final norm, the decoder's embedding and head
  inputs and its prediction (returned with the losses), the pixel loss's fp32 difference ``4 N P`` (P target
  pixels per patch; the square's backward keeps only that), the report embeddings (LayerNorm and dropout), and
  the MLM head on the M scored tokens: transform and GELU
  ``4 M D a`` and the fp32 log-softmax ``4 M V`` (the logits themselves are not kept);
- transient at the backward's peak: the cross-entropy's two fp32 gradients of the logits, ``2 * 4 M V``.

With activation checkpointing (``grad_checkpointing=True``) a block keeps only its input (``T D a``) and the
backward recomputes one block at a time; the peak is then the larger of the cross-entropy's transient and the
largest single block's full set.

Measured (:func:`measure_activation_bytes`): the same step on CPU, with ``malloc``'s bytes in use
(:func:`mrm_scale.host_memory.heap_in_use`) sampled at every tensor autograd saves or reads back and after every
backward node; the weights' gradients are allocated before the step (as DeepSpeed's gradient buffers are), and
the slope of the peak above the start between two batch sizes is the per-sample figure (anything else that does
not grow with the batch cancels). Both sizes must peak at the same place: at batch 2 a checkpointed ``base`` peaked
late in the backward, at the word embedding's dense gradient (vocabulary x width, the same at any batch), and
at batch 4 at the cross-entropy's backward, which made the slope 23.5 MiB where batches 4 and 8 (both at the
cross-entropy) give 22.6; hence 4 and 8. The ViT stacks use the fused kernel for it
(``cpu_math_attention_max_tokens=0``), as on a GPU; BERT's attention with dropout runs unfused on CPU, so the
comparison uses ``text_attention="math"``.
"""

from __future__ import annotations

from .presets import MRMConfig

LN_STATS = 2 * 2 * 4  # two LayerNorms per block, fp32 mean and rstd per token


def _vit_block(tokens: int, dim: int, hidden: int, heads: int, a: int, attention: str) -> float:
    t = tokens
    out = t * (8 * dim + 2 * hidden) * a + LN_STATS * t + 4 * heads * t
    if attention == "math":
        out += heads * t * t * a
    return out


def _bert_layer(tokens: int, dim: int, hidden: int, heads: int, a: int, attention: str) -> float:
    t = tokens
    if attention == "math":  # as a CPU runs it: see the module doc
        return (t * (5 * dim * a + 3 * dim * 4 + 2 * hidden * a) + 3 * 4 * heads * t * t  # q, k, v, probabilities
                + LN_STATS * t + 2 * t * dim * a)  # dropout masks in the activation dtype
    return t * (8 * dim + 2 * hidden) * a + LN_STATS * t + 4 * heads * t + 2 * t * dim


def _stack(kind, depth: int, tokens: int, dim: int, hidden: int, heads: int, a: int, attention: str,
           checkpointed: bool) -> tuple[float, float]:
    """(bytes kept through the forward, bytes of the one block a checkpointed backward recomputes at a time)."""
    one = kind(tokens, dim, hidden, heads, a, attention)
    if not checkpointed:
        return depth * one, 0.0
    return depth * tokens * dim * a, one  # block inputs kept


def activation_bytes(
    cfg: MRMConfig,
    vocab_size: int = 30522,
    *,
    masked_tokens: float | None = None,
    bytes_per_element: int = 2,
    attention: str = "flash",
    text_attention: str | None = None,
    grad_checkpointing: bool | None = None,
) -> dict[str, float]:
    """Activation bytes per training sample, by part (``encoder``, ``decoder``, ``report``, ``losses``,
    ``backward_peak``) and ``total``. ``attention``: ``flash`` (fused, as on a GPU) or ``math`` for the ViT stacks;
    ``text_attention`` for BERT's layers (default: the same). ``masked_tokens``: scored report tokens per sample
    (default ``word_mask_prob * (max_tokens - 2)``)."""
    for name, value in (("attention", attention), ("text_attention", text_attention)):
        if value not in (None, "flash", "math"):
            raise ValueError(f"{name} must be 'flash' or 'math', got {value!r}")
    text_attention = text_attention or attention
    ckpt = cfg.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    a = bytes_per_element
    n, k = cfg.num_patches, cfg.num_visible
    d, dd, dt = cfg.embed_dim, cfg.decoder_embed_dim, cfg.text_width

    encoder = cfg.input_size**2 * cfg.in_chans * a  # the resized image, kept by the patch projection
    kept, enc_one = _stack(_vit_block, cfg.depth, k + 1, d, int(d * cfg.mlp_ratio), cfg.num_heads, a, attention, ckpt)
    encoder += kept
    encoder += (k + 1) * d * a + LN_STATS / 2 * (k + 1)  # final norm's input

    decoder = (k + 1) * d * a  # embedding input (the normed latent)
    kept, dec_one = _stack(_vit_block, cfg.decoder_depth, n + 1, dd, int(dd * cfg.decoder_mlp_ratio),
                           cfg.decoder_num_heads, a, attention, ckpt)
    decoder += kept
    decoder += (n + 1) * dd * a * 2 + LN_STATS / 2 * (n + 1)  # final norm input, head input
    decoder += n * cfg.pred_dim * a  # the prediction itself: the model returns it (TensorBoard's reconstructions)
    losses = 4 * n * cfg.pred_dim  # pixel loss: the fp32 difference (what the square's backward keeps)

    report = backward_peak = text_one = 0.0
    if cfg.has_report_head:
        length = cfg.max_tokens
        m = cfg.word_mask_prob * (length - 2) if masked_tokens is None else float(masked_tokens)
        report = length * dt * (2 * a + 1) + LN_STATS / 2 * length  # embeddings: LayerNorm input, output, dropout
        kept, text_one = _stack(_bert_layer, cfg.text_depth, length, dt, cfg.text_intermediate, cfg.text_heads, a,
                                text_attention, ckpt)
        report += kept
        report += 4 * m * dt * a  # MLM transform: gathered rows, pre-/post-GELU, LayerNorm output
        losses += 4 * m * vocab_size  # the fp32 log-softmax (the bf16 and fp32 logits are not kept)
        backward_peak = 2 * 4 * m * vocab_size  # cross-entropy backward: two fp32 gradients of the logits
    # The backward's peak: the cross-entropy's gradients right at its start, or (checkpointed) one recomputed block
    # later on, when those are gone.
    recompute = max(enc_one, dec_one, text_one)
    total = encoder + decoder + report + losses + max(backward_peak, recompute)
    return {"encoder": float(encoder), "decoder": float(decoder), "report": float(report), "losses": float(losses),
            "backward_peak": float(backward_peak), "recompute": float(recompute), "total": float(total)}


def _hook_every_node(root, sample) -> None:
    """``sample`` after every backward node has made its gradients (they and its inputs' are alive then)."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        node.register_hook(lambda grad_inputs, grad_outputs: sample(None))
        todo.extend(nxt for nxt, _ in node.next_functions)


def measure_activation_bytes(cfg: MRMConfig, vocab_size: int = 30522, batches: tuple[int, int] = (4, 8),
                             seed: int = 0) -> dict:
    """Per-sample activation peak of a bf16 training forward + backward, measured on CPU (see the module doc).
    Returns ``per_sample`` (bytes), ``peaks`` {batch: bytes above the start}, ``masked_tokens_per_sample`` and the
    attention kernels used. Raises RuntimeError where ``malloc``'s counters are not readable (not glibc)."""
    import torch

    from mrm_scale import host_memory
    from mrm_scale.formats.tokenizer import TokenizerIdentity

    from .flops import synthetic_batch
    from .mrm import build_model

    in_use = host_memory.heap_in_use()
    if in_use is None:
        raise RuntimeError("measuring activation memory needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
    cfg = cfg.replace(cpu_math_attention_max_tokens=0).validate()  # fused attention in the ViT stacks, as on GPU
    torch.manual_seed(seed)
    model = build_model(cfg, **TokenizerIdentity.canonical(vocab_size).model_ids()).to(torch.bfloat16).train()
    peaks, masked = {}, {}
    for b in (*batches, *batches):  # each size twice, the second kept: one-off allocations land in the first
        batch = synthetic_batch(cfg, b, vocab_size=vocab_size, seed=seed)
        batch["image"] = batch["image"].to(torch.bfloat16)
        for p in model.parameters():  # gradients exist before the step (model states, not activations): the
            p.grad = torch.zeros_like(p)  # backward accumulates into them, as into DeepSpeed's gradient buffers
        base = in_use()
        top = [0]

        def sample(t):
            top[0] = max(top[0], in_use() - base)
            return t

        with torch.autograd.graph.saved_tensors_hooks(sample, sample):
            out = model(batch, seed=seed)
            _hook_every_node(out.loss.grad_fn, sample)
            out.loss.backward()
        sample(None)
        model.zero_grad(set_to_none=True)
        peaks[b] = top[0]
        masked[b] = float(out.token_mask.sum()) if out.token_mask is not None else 0.0
        del out
    lo, hi = batches
    return {
        "per_sample": (peaks[hi] - peaks[lo]) / (hi - lo),
        "peaks": {b: peaks[b] for b in batches},
        # the slope's own count: the head's terms grow with the tokens scored, (M_hi - M_lo) / (hi - lo)
        "masked_tokens_per_sample": (masked[hi] - masked[lo]) / (hi - lo),
        "attention": "flash", "text_attention": "math",
    }
