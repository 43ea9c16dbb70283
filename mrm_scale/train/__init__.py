"""Train room: DeepSpeed engine set-up, the loop, checkpoint state, metrics/TensorBoard, schedules, and the
image-use probe of every run (``image_use``: does the report branch gain from the image?).

``launch/pretrain.py`` is the entry point; it calls :func:`mrm_scale.train.config.add_arguments`,
:func:`mrm_scale.train.setup.setup_run` and :func:`mrm_scale.train.loop.train`.
"""
