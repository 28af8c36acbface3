"""Inference streams: reading Server-Sent Events as answers, and continuing a cut answer elsewhere."""
