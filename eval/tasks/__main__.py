"""``python -m tokenprune.eval.tasks``: build the local task if needed and print its include path."""
from .build import include_path

print(include_path())
