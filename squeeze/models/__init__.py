"""Reference model definitions used to rebuild checkpoints (e.g. by ``squeeze verify``)."""

from squeeze.models.pgolf import GPT, GPTConfig, config_from_state_dict

__all__ = ["GPT", "GPTConfig", "config_from_state_dict"]
