"""Train room: the pretraining job under DeepSpeed.

- ``main``      the job: flags -> typed run config (``config``) -> set-up (``setup``) -> the loop (``loop``);
                ``launch/pretrain.py`` and ``python -m mrm_scale.train.main`` run it
- ``launcher``  the one way other code starts it as a subprocess (the experiment, ``bench scaling``, the tests)
- ``config``    flags, ``DataArgs``/``ModelArgs``/``TrainArgs``, the resolved DeepSpeed config and ``Schedule``
- ``setup``     distributed start, run folder and record, checks before compute, loader, model, engine
- ``loop``      micro-steps, the non-finite guard, checkpoints (``checkpoint``), metrics and TensorBoard
                (``metrics``), the image-use probe of every run (``image_use``); ``LoopHooks`` for callers
"""
