"""Model-family adapters, one module per family, found by :mod:`tokenprune.registry` (importing a
module registers it by its declared ``model_types``); nothing here lists them."""
