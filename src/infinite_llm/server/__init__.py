"""The OpenAI-compatible HTTP server (``pip install infinite-llm[server]``)."""

from infinite_llm.config import ServerConfig
from infinite_llm.server.api import build_app
from infinite_llm.server.launch import run_server

__all__ = ["ServerConfig", "build_app", "run_server"]
