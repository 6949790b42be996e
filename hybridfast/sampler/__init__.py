"""The hybrid batch sampler: each step one mono batch (one language) or one cross batch
(each slot its own query and passage language).

    hybrid.py     HybridBatchSampler over the C++ planner (hybridfast._C), rank slices, epochs,
                  state_dict / load_state_dict, lang_weights specs
    reference.py  the planner's pure-Python twin (slot-for-slot parity, and the fallback)
"""
from hybridfast.sampler.hybrid import MODES, HybridBatchSampler, parse_lang_weights, reference_plan, splitmix64

__all__ = ["HybridBatchSampler", "reference_plan", "splitmix64", "parse_lang_weights", "MODES"]
