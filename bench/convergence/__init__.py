"""``python -m bench.convergence``: does ALR make training insensitive to the initial lr?

Sweeps the initial learning rate over six or more decades on three small real tasks that
run on a CPU in seconds (scikit-learn's digits with logistic regression and an MLP, and a
character-level language model on ``bench/data/genesis-kjv.txt``), for torch-identical
baselines (``alr.Adam``/``AdamW``/``SGD``: adaptation off) against ALR variants, and writes
a JSON file with every run, a markdown summary and PNG plots. The metrics are defined in
:mod:`bench.convergence.metrics`; the tasks in :mod:`bench.convergence.tasks`.
"""
