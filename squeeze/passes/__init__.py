"""Compiler passes. Each module holds a Config dataclass and a pure `run(state, config) -> State`.

Order (squeeze/pipeline.py): tie -> classify -> stack -> plan -> allocate -> quantize -> gptq -> lowrank -> pack ->
encode.
"""
