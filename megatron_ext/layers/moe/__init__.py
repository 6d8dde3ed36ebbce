"""Mixture-of-experts layers: router, routed experts, shared expert, dispatch, the MoE block."""
from megatron_ext.layers.moe.experts import RoutedExperts
from megatron_ext.layers.moe.moe_layer import MoELayer, MoEOutput
from megatron_ext.layers.moe.router import RouterStats, TopKRouter, load_balancing_loss
from megatron_ext.layers.moe.shared_expert import SharedExpert

__all__ = ["MoELayer", "MoEOutput", "RoutedExperts", "RouterStats", "SharedExpert", "TopKRouter",
           "load_balancing_loss"]
