"""Experiments: the jobs that compose the rooms (data, model, train, eval) into one question answered end to end.

- :mod:`.label_efficiency`  ``mrm-scale experiment label-efficiency``: does pretraining with reports help when
                            labels are few? MRM vs image-only MAE vs random init, linearly probed with 1%, 10%
                            and 100% of the labels; the pretrainings run the real trainer through
                            :mod:`mrm_scale.train.launcher`.

A job may import any room; no room imports a job.
"""
