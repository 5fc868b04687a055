"""DVC stage entry points (`python -m stages.<name>`): thin scripts over the fusesoup package.

Set before torch loads: oneDNN caches a JIT primitive per tensor shape (GELU, for one), and every new batch shape
of a length-bucketed pass is new, so its cache (1024 entries) grows RSS with the corpus until it fills (measured:
+60 MB per 512 sequences for code-neox). Creating a primitive costs ~0.2 ms, well under the pass it serves.
"""
import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
