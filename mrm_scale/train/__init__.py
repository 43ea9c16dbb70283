"""Train room: DeepSpeed engine set-up, the loop, checkpoint state, metrics/TensorBoard, schedules.

``launch/pretrain.py`` is the entry point; it calls :func:`mrm_scale.train.config.add_arguments`,
:func:`mrm_scale.train.setup.setup_run` and :func:`mrm_scale.train.loop.train`.
"""
