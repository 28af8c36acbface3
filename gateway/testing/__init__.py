"""Tools for trying and testing the gateway: an OpenAI-compatible mock inference server."""
