"""GPT-2-family text generation on Ray Serve."""
