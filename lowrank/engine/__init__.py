"""The experiment engine: TOML configs, datasets, the training loop, the results store, the report.

It is built on the library (``lowrank.layers``, ``lowrank.optim``, ...) and the library never imports
it. Its modules, each importing only those above it:

    config        TOML files -> validated, frozen dataclasses; the one validator of every figure kind
    determinism   threads, deterministic algorithms, default dtype, seeded batch order, the machine
    distributed   the World of a torchrun job (gradient all-reduce of every layer kind)
    store         run folders keyed by a config, checkpoints, the run lock, one atomic write
    data          MNIST / Fashion-MNIST: fetch, check, cache, split, load
    training      the loop: train and evaluate one ModelConfig, resumable
    summary       what notebooks show and glue: seed statistics, verdicts, durations
    plots         the figures' matplotlib plots
    experiments   the figures that are not network studies: matrix ODE (j), adapters (k), analysis (h, i),
                  step benchmark (n)
    report        discover, execute and record the figure notebooks, build the book
    cli           ``python -m lowrank ...``
"""
