"""``mini::shapes``: the bundled demo CLIP, its shapes renderer (``shapes``) and its trainer (``train``).

The weights and the model card live beside this file; only ``shapes`` is used at run time (by the demo).
"""
