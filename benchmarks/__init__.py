"""The measurements behind ``benchmark.py``: training speed (``train_speed``), evaluation speed (``eval_speed``),
one ``retrieve.py`` query (``retrieval_speed``), a bare ResNet-18 step (``resnet_ceiling``), the summary of a
``tools/gpu_bench.sh`` folder (``report``); the presets, timers, system information and JSON output they share
(``common``) and their inputs, synthetic data and a random BERT (``inputs``)."""
