"""Text environments behind one interface (envs/base.py). envs/ imports nothing from the rest of the repo."""
from envs.base import EnvPool, make_env

__all__ = ["EnvPool", "make_env"]
