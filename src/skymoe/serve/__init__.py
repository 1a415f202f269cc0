"""The OpenAI-compatible HTTP server (``skymoe serve``) and its load benchmark
(``skymoe bench serve``). See docs/serving.md."""
