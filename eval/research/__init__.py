"""Research code, kept in the repository and not installed: the trainers that rebuilt the embedded
tiny models (``train``, ``train_video``, ``transfer``), the probes and experiments behind the
fidelity write-up (``probe_video``, ``holitom_tau``), the example assets' builder (``make_assets``),
the GPU lease scripts that ran them, and their one-off results (``results/``). Run from the repo
root, e.g. ``python -m eval.research.train --out assets/tiny-llava-vqa``."""
