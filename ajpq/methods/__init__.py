"""Compression methods that share AJPQ's interface (model, data, budget, seed in; run folder and policy out)."""
