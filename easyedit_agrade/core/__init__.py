"""Editing core shared by the methods: tokenisation, H/∇G caching, the hypernetwork, weight edits, checkpoints.

Submodules (import them directly; this package imports nothing heavy itself):

- :mod:`.tokenize` — ``encode_prompt_target`` (prompt+target with a target mask, causal-LM label shift).
- :mod:`.cache` — ``LayerStack`` (run only the layers edits need), ``KeyGradCapture`` / ``cache_keys_and_grads``.
- :mod:`.hypernet` — ``RunningNormalizer``, ``LowRankBlock``, ``HyperNetwork``, ``EditorNetworks``.
- :mod:`.weights` — ``apply_deltas`` / ``restore_weights`` (bit-exact; nn.Linear vs Conv1D layouts).
- :mod:`.checkpoint` — safetensors + JSON, atomic writes, training checkpoints.

See ``docs/core_api.md``.
"""
