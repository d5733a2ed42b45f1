"""Recipes: the shipped files parse, rules resolve first-match-wins, and bad input names the file, line and key."""
import pytest

from squeeze import Recipe
from squeeze.errors import RecipeError
from squeeze.recipe import parse

from conftest import RECIPES


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = Recipe.load(path)
    assert recipe.name == path.stem


def test_int8_baseline_routing():
    r = Recipe.load(RECIPES / "int8-baseline.toml")
    s, why = r.settings_for("blocks.0.mlp.fc.weight", "mlp", 512 * 256)
    assert (s.scheme, s.bits, s.clip, s.codec, why) == ("int", 8, "percentile", "zlib", "defaults")
    s, why = r.settings_for("blocks.0.attn_scale", "control", 256)
    assert (s.scheme, s.float_dtype, why) == ("float", "f32", "control")
    s, why = r.settings_for("some.bias", "other", 1000)
    assert (s.scheme, s.float_dtype, why) == ("float", "f16", "small")


RULES = """
name = "t"
[defaults]
bits = 6
[[rules]]
match = "re:^blocks\\\\.[01]\\\\."
role = "mlp"
bits = 8
[[rules]]
match = ["*.mlp.*", "tok_emb.*"]
bits = 5
[[rules]]
match = "blocks.0.attn_scale"
scheme = "int"
bits = 7
"""


def test_rules_first_match_wins_and_explicit_scheme_beats_small_routing():
    r = parse(RULES, "t.toml")
    assert r.settings_for("blocks.1.mlp.fc.weight", "mlp", 10**6)[0].bits == 8
    assert r.settings_for("blocks.2.mlp.fc.weight", "mlp", 10**6)[0].bits == 5
    assert r.settings_for("blocks.1.attn.c_q.weight", "attention", 10**6)[0].bits == 6
    assert r.settings_for("tok_emb.weight", "embedding", 10**6)[0].bits == 5
    s, _ = r.settings_for("blocks.0.attn_scale", "control", 256)
    assert (s.scheme, s.bits) == ("int", 7)
    assert r.settings_for("blocks.1.attn_scale", "control", 256)[0].scheme == "float"
    assert r.settings_for("blocks.2.mlp.small", "mlp", 100)[0].scheme == "float"


@pytest.mark.parametrize("text,message", [
    ("[defaults]\nbits = 6\ncolour = 3\n", r"t.toml:3: unknown key 'colour' in \[defaults\]"),
    ("name = 'x'\nfoo = 1\n", r"t.toml:2: unknown key 'foo'"),
    ("[defaults]\nbits = 9\n", r"t.toml:2: bits = 9: bits must be 2..8"),
    ("[defaults]\nclip = 'minmax'\n", r"t.toml:2: clip = 'minmax': expected one of absmax, percentile, std, mse"),
    ("[defaults]\nbits = '6'\n", r"t.toml:2: bits = '6': expected an integer"),
    ("[encode]\ncodec = 'gzip'\n", r"t.toml:2: codec = 'gzip'"),
    ("[encode]\nbrotli_quality = 12\n", r"t.toml:2: brotli_quality = 12: expected an integer in 0..11"),
    ("[keep_float]\nmax_numel = -1\n", r"t.toml:2: max_numel = -1"),
    ("[[rules]]\nmatch = '*'\n[[rules]]\nmatch = 'a'\nbitz = 4\n", r"t.toml:5: unknown key 'bitz' in \[rules\]"),
    ("[[rules]]\nbits = 4\n", r"t.toml:1: rule 1 has no 'match' key"),
    ("[[rules]]\nmatch = 're:('\n", r"t.toml:2: match = 're:\(': invalid regex"),
    ("[[rules]]\nmatch = '*'\nrole = 'mystery'\n", r"t.toml:3: role = 'mystery'"),
    ("[defaults\n", r"t.toml: invalid TOML"),
])
def test_bad_recipes_fail_loudly(text, message):
    with pytest.raises(RecipeError, match=message):
        parse(text, "t.toml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="nope.toml: no such recipe file"):
        Recipe.load(tmp_path / "nope.toml")
