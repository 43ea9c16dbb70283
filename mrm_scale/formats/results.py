"""The downstream output folders: fine-tuning (``launch/finetune.py --out DIR``, written by
``mrm_scale.eval.finetune``, read by ``mrm-scale eval table``) and segmentation (``launch/segment.py --out DIR``,
written by ``mrm_scale.eval.segment``: the same names, ``results.json`` with ``"task": "segment"`` and Dice/IoU
in ``val`` / ``test``, plus ``test_per_image.tsv``).

- ``results.json``         ``recipe`` (every resolved setting, ``overrides``), ``dataset``, ``percent``, ``seed``,
                           ``init`` (what was loaded), ``data`` (sources, samples, skipped), ``classes``,
                           ``val`` / ``test`` (``auc`` per class, ``mean_auc``, ``skipped``), ``history``, ``hyper``
- ``train_subset.txt``     the training keys used, one per line (``--train-subset`` reads it back)
- ``skipped_images.txt``   ``split<TAB>listed path<TAB>reason`` for every listed image not used
- ``best_model.safetensors`` (fine-tune) or ``best_head.safetensors`` (linear probe): the best-validation weights
- ``test_per_image.tsv``   segmentation: ``key, dice, iou, truth_px, pred_px`` per test image
- ``tb/``                  TensorBoard scalars (segmentation: and the ``val/overlay`` images)
"""

RESULTS_FILE = "results.json"
SUBSET_FILE = "train_subset.txt"
SKIPPED_FILE = "skipped_images.txt"
MODEL_FILE = "best_model.safetensors"
HEAD_FILE = "best_head.safetensors"
TB_DIR = "tb"
PER_IMAGE_FILE = "test_per_image.tsv"
