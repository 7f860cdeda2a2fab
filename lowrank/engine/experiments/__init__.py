"""Each figure's own experiment code, declared and validated like the network studies (lowrank.engine.config).

    analysis     what trained networks are made of: layer inputs, neural collapse, truncation (figures h, i)
    matrix_ode   dynamical low-rank integrators on a rotating matrix (figure j)
    adapters     low-rank adapters with bilevel rank selection (figure k)
    benchmark    the cost of one training step against torch dense (figure n)
    rank_study   what decides the rank of a DLRT network: scale spreads, dense tau-ranks (figure p)
"""
