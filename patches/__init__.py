"""Model-family adapters, one module per family; importing registers them by model_type."""
from . import llava  # noqa: F401
from . import qwen_vl  # noqa: F401
from . import llava_next  # noqa: F401
