"""squeeze: compile trained PyTorch checkpoints into the smallest self-describing artifact that still scores well.

    blob = squeeze.compile(state_dict, squeeze.Recipe.load("recipes/int6-mixed.toml"))
    tensors = squeeze.load(blob)           # or a path
    report = squeeze.inspect(blob)         # where every byte went
    result = squeeze.verify.verify("model.sqz", "final_model.pt", "val_*.bin", "tokenizer.model")  # BPB drift
    result = squeeze.export(model, batches, "final_model.sqz", budget=16_000_000, code=[__file__])  # in train_gpt.py
"""
from .budget import compile_to_budget
from .compiler import __version__, compile, compile_state_dict
from .export import export
from .errors import CheckpointError, FormatError, RecipeError, SqueezeError
from .inspect import inspect
from .loader import load
from .recipe import Recipe
from . import verify
from . import qat

__all__ = ["compile", "compile_state_dict", "compile_to_budget", "export", "load", "inspect", "Recipe",
           "SqueezeError", "FormatError", "RecipeError", "CheckpointError", "__version__"]
