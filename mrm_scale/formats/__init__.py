"""The bottom floor: every on-disk contract of mrm-scale, each written down once (README, "Architecture").

- :mod:`~mrm_scale.formats.shards`      the shard sample members, tar and DALI index files, ``manifest.json``
- :mod:`~mrm_scale.formats.tokenizer`   tokenizer identity: file name, special tokens and their ids, sha256
- :mod:`~mrm_scale.formats.checkpoints` checkpoint tags, the ``COMPLETE.json`` marker, the newest complete tag
- :mod:`~mrm_scale.formats.run_record`  the run folder layout and ``run_config.json`` (typed)
- :mod:`~mrm_scale.formats.files`       atomic writes and sha256, used by all of the above

Nothing here imports torch or any other room of the package: data, model, train, eval and the jobs import it.
"""
