"""fusesoup: fuse heterogeneous LLMs (FuseLLM) and soup their variants (SoupLM), as a DVC + Prefect pipeline."""
