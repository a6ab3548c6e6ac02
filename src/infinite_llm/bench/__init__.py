"""Benchmarks a user runs: ``infinite-llm bench serve`` (any OpenAI-compatible server),
``bench offline`` (the engine in this process) and ``bench sweep`` (instances, modes and
request rates), on the standard workloads, random prompts or a request trace; numbers
under ``vllm bench serve``'s keys."""
