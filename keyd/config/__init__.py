"""keyd's configuration: ``parse_config`` (pure) and ``load_config`` into frozen dataclasses."""

from keyd.config.model import (
    DEFAULT_CONFIG,
    Config,
    CryptLayer,
    Degraded,
    Layer,
    LoopLayer,
    MountLayer,
    RaidLayer,
    TrustConfig,
    Volume,
)
from keyd.config.parse import load_config, parse_config

__all__ = ["DEFAULT_CONFIG", "Config", "CryptLayer", "Degraded", "Layer", "LoopLayer",
           "MountLayer", "RaidLayer", "TrustConfig", "Volume", "load_config", "parse_config"]
