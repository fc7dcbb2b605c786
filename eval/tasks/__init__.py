"""Offline lmms-eval tasks shipped with tokenprune (``--include_path`` this folder)."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
