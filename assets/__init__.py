"""Embedded offline defaults, installed as package data ``tokenprune.assets``: the tiny trained
LLaVA (``tiny-llava-vqa``) and video OneVision (``tiny-ov-video``) checkpoints, ``demo.png`` and the
demo's example scenes and clip (``examples/``). Found with ``importlib.resources``."""
