"""lmms-eval plugin: ``--model tokenprune`` (chat style; ``--force_simple`` for the simple style),
registered through the ``lmms_eval.models`` entry point. Tasks: ``--include_path`` the folder
``tokenprune.eval.tasks.include_path()`` (built on first use)."""
