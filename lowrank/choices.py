"""The names a user can pass to the library's layers and optimiser, in one place.

Torch-free, so that the experiment engine's configuration (``lowrank.engine.config``) validates TOML files
against the same tuples without importing torch. The layers, the network and the DLRT optimiser check
their arguments against these; nothing else writes them.
"""

#: ``NeuralNetwork`` layer kinds: ``z = a W + b``; ``W = U S Vᵀ`` at a fixed rank; DLRT (rank-adaptive).
LAYER_TYPES = ("dense", "lowrank", "dynamical")
#: Activations after a layer (``lowrank.network.ACTIVATION_MODULES``); identity for the output layer.
ACTIVATIONS = ("relu", "identity", "tanh", "sigmoid")
#: Initialisations of a factorised layer (``lowrank.layers`` module docstring); dense layers take the first
#: and ``"normal"``.
INITS = ("kaiming", "kaiming-flat", "normal", "spectral", "spectral-ones", "sorted-normal")
DENSE_INITS = ("kaiming", "normal")
#: The default ``init_scale`` of a ``DynamicalLowRank`` with the ``"kaiming"`` init: W starts at 20 % of the
#: Kaiming scale and training sets the spectrum; every other layer and init: 1.
DYNAMICAL_INIT_SCALE = 0.2
#: ``LowRank`` parametrisations: ``W = U S Vᵀ`` or ``W = U Vᵀ``.
FACTORIZATIONS = ("usv", "uv")
#: How DLRT and its companion optimiser step: plain SGD (with momentum) or Adam.
OPTIMIZERS = ("sgd", "adam")
#: DLRT steps: ``kls`` (an extra forward/backward for the S-step), ``single-pass`` (one pass).
INTEGRATORS = ("kls", "single-pass")
#: DLRT optimiser state when the bases change: carried to the new bases, or dropped.
BASIS_STATES = ("project", "reset")
#: How the truncation at the end of a DLRT cycle of k steps picks the rank: with the new block scaled to one
#: step (divided by sqrt(k)), or from the accumulated coefficients as they are.
RANK_TESTS = ("per-step", "accumulated")
#: Adam's step counts of the coefficients S: one count per tensor, or one per coordinate (new coordinates at 0).
NEW_COORDINATES = ("shared", "per-coordinate")
