"""Eval room: export of pretrained checkpoints, downstream fine-tuning / linear probing, AUC.

- :mod:`.export`      ``mrm-scale export``: a DeepSpeed checkpoint (any ZeRO stage) -> timm image encoder
                      (safetensors), transformers report model + tokenizer, full MRM weights, model card.
- :mod:`.datasets`    labelled inputs: shard folders (labels from ``KEY.json``) and split files in the original
                      MRM format (``path label1 label2 ...``), the same eval/train image transforms as the loader,
                      and seeded label-fraction subsets.
- :mod:`.probe`       the downstream model (encoder + head, mean-pooled patch tokens), layer-wise lr decay,
                      the standardised linear probe, per-class ROC AUC.
- :mod:`.finetune`    the ``launch/finetune.py`` job (linear probe or fine-tune, results.json, TensorBoard).

Room rule: imports ``mrm_scale.model`` and ``mrm_scale.data``, nothing from ``mrm_scale.train``. The
label-efficiency experiment, which uses all of them, is a job: :mod:`mrm_scale.experiments.label_efficiency`.
"""
