"""Property tests: a mutated artifact either loads into exactly the tensors its header describes or raises FormatError
(the tiny decoder: ValueError("squeeze: ...")), promptly; a recipe either parses or raises RecipeError.

CI runs a bounded, derandomized number of examples; `python bench/fuzz_artifacts.py --count N` runs the same
mutators for as long as wanted.
"""
import dataclasses
import json
import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from squeeze import codecs, recipe
from squeeze.errors import RecipeError

from bench.fuzz_artifacts import (STRUCTURAL, TinyDecoder, assemble_any, check_inspect, check_load,
                                  damage_rans_model, damage_section_bytes, edit_value, mutate, parts_of,
                                  seed_artifacts)

SECONDS_PER_LOAD = 10.0  # generous for a loaded CI machine; a load of these artifacts takes milliseconds
CI = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds() -> dict:
    return seed_artifacts()


def assert_loads_or_refuses(blob: bytes, inspect: bool = False):
    """squeeze.load (and with `inspect`, what `squeeze inspect` runs) returns the header's tensors or raises a
    one-line FormatError, in bounded time."""
    start = time.perf_counter()
    outcome = check_load(blob)
    assert outcome in ("ok", "FormatError")
    if inspect:
        assert check_inspect(blob, loads=outcome == "ok") in ("ok", "FormatError")
    assert time.perf_counter() - start < SECONDS_PER_LOAD


# ---------------------------------------------------------------------------------------------------------------
# Artifacts

@settings(max_examples=300, **CI)
@given(rng=st.randoms(use_true_random=False))
def test_mutated_artifacts(seeds, rng):
    """Byte damage, preamble fields, JSON text damage and structural edits, mixed as the long run mixes them."""
    _, _, blob = mutate(rng, seeds)
    assert_loads_or_refuses(blob)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**64, 2**64), st.sampled_from([0, 1, 2, 8, 9, 2**32 - 1, 2**32, 2**40]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.sampled_from(["f32", "bf16", "f8e4m3", "f8e5m2", "bool", "rans", "zlib", "dense", "byte", "mlp",
                     "tok_emb.weight"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=10)


@settings(max_examples=300, **CI)
@given(seed_name=st.sampled_from(["rans", "zlib", "raw-dense", "default"]), rng=st.randoms(use_true_random=False),
       value=JSON_VALUES)
def test_header_field_edits(seeds, seed_name, rng, value):
    """Any JSON value in place of any header value (CRCs valid): the checks behind the CRC must refuse it."""
    parts = parts_of(seeds[seed_name])
    edit_value(rng, parts, value)
    assert_loads_or_refuses(assemble_any(parts), inspect=True)


@settings(max_examples=150, **CI)
@given(seed_name=st.sampled_from(["rans", "brotli", "zstd", "lzma", "default"]), rng=st.randoms(use_true_random=False),
       edits=st.lists(st.sampled_from([damage_section_bytes, damage_rans_model]), min_size=1, max_size=2))
@pytest.mark.slow
def test_damaged_sections_behind_valid_checksums(seeds, seed_name, rng, edits):
    """Stored section bytes and rans models damaged with sizes and CRCs re-declared: the codecs must refuse them."""
    parts = parts_of(seeds[seed_name])
    for edit in edits:
        edit(rng, parts)
    assert_loads_or_refuses(assemble_any(parts))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyDecoder(str(tmp_path_factory.mktemp("tiny")))


@settings(max_examples=100, **CI)
@given(rng=st.randoms(use_true_random=False), n_edits=st.integers(1, 2))
def test_tiny_decoder_on_edited_headers(seeds, tiny, rng, n_edits):
    """The emitted decoder answers damage its CRCs cannot see with its one-line ValueError, or decodes."""
    parts = parts_of(seeds[rng.choice(sorted(seeds))])
    for _ in range(n_edits):
        rng.choice(STRUCTURAL)(rng, parts)
    assert tiny.check(assemble_any(parts)) in ("ok", "ValueError")


def test_the_fuzz_seeds_cover_every_codec_and_packing(seeds):
    codecs_used, packs_used = set(), set()
    for blob in seeds.values():
        header = parts_of(blob).header
        codecs_used |= {s["codec"] for s in header["sections"]}
        packs_used |= {t["q"]["pack"] for t in header["tensors"] if "q" in t}
        assert check_load(blob) == "ok"
    assert codecs_used == set(codecs.NAMES) and packs_used == {"byte", "dense"}  # a new codec needs a seed


def test_a_replayed_case_is_the_same_case(seeds):
    """The long run names failing cases by (seed, index); replaying one must rebuild the same bytes."""
    assert mutate(random.Random("0:42"), seeds) == mutate(random.Random("0:42"), seeds)


# ---------------------------------------------------------------------------------------------------------------
# Recipes

def parses_or_refuses(text: str):
    try:
        parsed = recipe.parse(text, "fuzz.toml")
    except RecipeError as e:
        assert str(e).startswith("fuzz.toml") and "\n" not in str(e), str(e)
        return
    parsed.settings_for("blocks.0.mlp.fc.weight", "mlp", 1 << 20)  # a parsed recipe is usable


@settings(max_examples=200, **CI)
@given(text=st.text(max_size=200))
def test_recipe_parser_on_arbitrary_text(text):
    parses_or_refuses(text)


RECIPE_LINES = st.sampled_from([
    "[defaults]", "[keep_float]", "[encode]", "[[rules]]", "[rules]", "[defaults.x]", 'name = "n"', "name = 3",
    "bits = 6", "bits = 1", "bits = 6.0", "bits = true", 'bits = "6"', "group_size = -1", "group_size = 64",
    'clip = "std"', 'clip = "max"', "clip_std_k = 0", "clip_std_k = nan", "clip_percentile = 101",
    'scale_dtype = "fp32"', 'scale_dtype = "keep"', 'float_dtype = "keep"', 'pack = "dense"', 'codec = "rans"',
    'codec = "gzip"', 'match = "*.mlp.*"', 'match = ["a", "re:b"]', 'match = "re:("', "match = []", 'role = "mlp"',
    'role = "head"', "max_numel = 0", "max_numel = -1", 'control_dtype = "bf16"', "control_patterns = [1]",
    'candidates = ["rans", "brotli"]', "candidates = []", 'group_by = "tensor"', "brotli_quality = 12",
    "lzma_extreme = 1", 'shuffle = "off"', "x = 1", "bits = 6\nbits = 7", "= 1", "[", 'a = """', "rules = 3",
    "defaults = []", 'scheme = "float"', "mse_grid = 0", "scale_min = -1"])


@settings(max_examples=300, **CI)
@given(lines=st.lists(RECIPE_LINES, max_size=12))
def test_recipe_parser_on_toml_like_lines(lines):
    parses_or_refuses("\n".join(lines) + "\n")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (int, str)):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def toml_document(doc: dict) -> str:
    """A TOML text for a dict: scalars and arrays first, then [tables], then [[arrays of tables]]."""
    def body(table):
        return [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    lines = body({k: v for k, v in doc.items() if not isinstance(v, dict) and not _is_table_array(v)})
    for key, table in doc.items():
        if isinstance(table, dict):
            lines += [f"[{json.dumps(key)}]", *body(table)]
    for key, tables in doc.items():
        if _is_table_array(tables):
            for table in tables:
                lines += [f"[[{json.dumps(key)}]]", *body(table)]
    return "\n".join(lines) + "\n"


def _field_names(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


WORDS = st.sampled_from(["auto", "int", "float", "fp16", "fp32", "bf16", "keep", "byte", "dense", "std", "mse",
                         "absmax", "percentile", "rans", "zlib", "brotli", "raw", "role", "tensor", "all", "off", "*",
                         "re:(", "re:.*", "mlp", "control", ""])
SCALARS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 6, 8, 9, -1, 64, 1024, 1025]),
                    st.floats(), st.booleans(), WORDS, st.text(max_size=5))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)), max_leaves=6)


def _table(keys: list):
    return st.dictionaries(st.sampled_from(keys + ["junk"]), VALUES, max_size=4)


SETTING_KEYS = _field_names(recipe.TensorSettings)
RECIPE_DICTS = st.fixed_dictionaries({}, optional={
    "name": VALUES, "description": VALUES, "defaults": _table(SETTING_KEYS),
    "keep_float": _table(_field_names(recipe.KeepFloat)),
    "encode": _table(_field_names(recipe.EncodeParams) + ["group_by", "candidates", "shuffle", "codec"]),
    "rules": st.lists(st.one_of(_table(SETTING_KEYS + ["match", "role"]), VALUES), max_size=3)})


@pytest.mark.slow
@settings(max_examples=300, **CI)
@given(doc=RECIPE_DICTS)
def test_recipe_parser_on_recipe_shaped_documents(doc):
    parses_or_refuses(toml_document(doc))


@pytest.mark.parametrize("text", ["rules = [1]", 'rules = ["match"]', "[keep_float]\ncontrol_dtype = []",
                                  "[keep_float]\nsmall_dtype = {}", "[defaults]\nclip_std_k = inf",
                                  "[defaults]\nscale_min = inf"])
def test_malformed_recipes_are_recipe_errors(text):
    with pytest.raises(RecipeError):
        recipe.parse(text, "fuzz.toml")
