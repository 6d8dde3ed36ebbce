"""TransformerEngine-backed layers (CUDA only; built by :class:`megatron_ext.layers.backend.LayerBackend`)."""
