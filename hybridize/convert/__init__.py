"""Conversion: plans, attention-to-mixer initializers, the streaming builder and `hybridize convert`."""
