"""Built-in strategies; importing this package registers them."""
from .base import Selection, StrategySpec, VisionInfo, VisualTokens  # noqa: F401
from .baselines import PoolConfig, RandomConfig  # noqa: F401
from .fastv import FastVConfig  # noqa: F401
from .fopru import FoPruConfig  # noqa: F401
from .hiprune import HiPruneConfig  # noqa: F401
from .holitom import HoliTomConfig, HoliTomInnerConfig  # noqa: F401
from .visionzip import VisionZipConfig  # noqa: F401
