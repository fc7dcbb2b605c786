"""Speed and memory benchmark: pruned vs unpruned vs the ideal "LLM fed only the kept tokens".

    tokenprune bench --preset cpu            # mid-size random configs, a few minutes on 2 cores
    tokenprune bench --preset gpu            # real-size architectures, random weights, one GPU
    tokenprune bench --preset tiny           # CI smoke test

Modules: ``presets`` (model geometries), ``timing`` (timers, decode clock, memory, other work on
the machine), ``sanity`` (the bounds every row must meet), ``reference`` (the official-style eager +
``output_attentions`` selection), ``run`` (the measurement loop), ``report`` (markdown and plots).
"""
