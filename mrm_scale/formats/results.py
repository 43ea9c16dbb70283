"""The fine-tuning output folder (``launch/finetune.py --out DIR``), written by ``mrm_scale.eval.finetune`` and
read by ``mrm-scale eval table``.

- ``results.json``         ``recipe`` (every resolved setting, ``overrides``), ``dataset``, ``percent``, ``seed``,
                           ``init`` (what was loaded), ``data`` (sources, samples, skipped), ``classes``,
                           ``val`` / ``test`` (``auc`` per class, ``mean_auc``, ``skipped``), ``history``, ``hyper``
- ``train_subset.txt``     the training keys used, one per line (``--train-subset`` reads it back)
- ``skipped_images.txt``   ``split<TAB>listed path<TAB>reason`` for every listed image not used
- ``best_model.safetensors`` (fine-tune) or ``best_head.safetensors`` (linear probe): the best-validation weights
- ``tb/``                  TensorBoard scalars
"""

RESULTS_FILE = "results.json"
SUBSET_FILE = "train_subset.txt"
SKIPPED_FILE = "skipped_images.txt"
MODEL_FILE = "best_model.safetensors"
HEAD_FILE = "best_head.safetensors"
TB_DIR = "tb"
