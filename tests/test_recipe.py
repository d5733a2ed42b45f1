"""Recipes: the shipped files parse, rules resolve first-match-wins, and bad input names the file, line and key."""
import dataclasses

import pytest

from squeeze import Recipe, recipe
from squeeze.errors import RecipeError
from squeeze.recipe import BudgetSettings, GPTQSettings, KeepFloat, parse

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
    ("[encode]\ncodes_candidates = ['rans', 'gzip']\n", r"t.toml:2: codes_candidates = \['rans', 'gzip'\]: expected a "
     r"list of raw, "),
    ("[encode]\ncodes_candidates = []\n", r"t.toml:2: codes_candidates = \[\]: expected a list of raw, "),
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


def test_codes_candidates():
    assert parse("[encode]\ncandidates = ['brotli']\n", "t.toml").encode.codes_candidates is None  # as candidates
    enc = parse("[encode]\ncandidates = ['brotli', 'rans']\ncodes_candidates = ['rans']\n", "t.toml").encode
    assert (enc.candidates, enc.codes_candidates) == (("brotli", "rans"), ("rans",))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="nope.toml: no such recipe file"):
        Recipe.load(tmp_path / "nope.toml")


def test_budget_table():
    r = parse("[budget]\nbits_choices = [4, 6, 5]\nclip_k_choices = [3, 7.5]\ngroup_choices = []\n"
              "lowrank_ranks = [4, 8]\nfloat_option = false\n", "t.toml")
    b = r.budget
    assert (b.bits_choices, b.clip_k_choices, b.group_choices, b.lowrank_ranks, b.float_option) == \
        ((4, 6, 5), (3.0, 7.5), (), (4, 8), False)
    assert all(type(k) is float for k in b.clip_k_choices)
    assert parse("[budget]\ngroup_choices = [64]\n", "t.toml").budget == BudgetSettings(group_choices=(64,))


def test_budget_defaults_are_the_allocators():
    from squeeze.passes.allocate import AllocateConfig
    config = AllocateConfig()
    assert dataclasses.asdict(BudgetSettings()) == dataclasses.asdict(config)
    assert Recipe().budget == parse("", "t.toml").budget == BudgetSettings()


@pytest.mark.parametrize("line,message", [
    ("bits_choices = 4", "bits_choices = 4: expected a non-empty list of distinct integers in 2..8"),
    ("bits_choices = []", "bits_choices = []: expected a non-empty list of distinct integers in 2..8"),
    ("bits_choices = [1, 4]", "bits_choices = [1, 4]: expected a non-empty list of distinct integers in 2..8"),
    ("bits_choices = [9]", "bits_choices = [9]: expected a non-empty list of distinct integers in 2..8"),
    ("bits_choices = [4, 4]", "bits_choices = [4, 4]: expected a non-empty list of distinct integers in 2..8"),
    ("bits_choices = [4.0]", "bits_choices = [4.0]: expected a non-empty list of distinct integers in 2..8"),
    ("bits_choices = [true]", "bits_choices = [True]: expected a non-empty list of distinct integers in 2..8"),
    ("clip_k_choices = 3.5", "clip_k_choices = 3.5: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = []", "clip_k_choices = []: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = [0]", "clip_k_choices = [0]: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = [-2.5]", "clip_k_choices = [-2.5]: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = [inf]", "clip_k_choices = [inf]: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = [nan]", "clip_k_choices = [nan]: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = ['3']", "clip_k_choices = ['3']: expected a non-empty list of positive, finite numbers"),
    ("clip_k_choices = [false]", "clip_k_choices = [False]: expected a non-empty list of positive, finite numbers"),
    ("group_choices = 128", "group_choices = 128: expected a list of positive integers"),
    ("group_choices = [0]", "group_choices = [0]: expected a list of positive integers"),
    ("group_choices = [64.0]", "group_choices = [64.0]: expected a list of positive integers"),
    ("lowrank_ranks = 4", "lowrank_ranks = 4: expected a list of integers in 1..256"),
    ("lowrank_ranks = [0]", "lowrank_ranks = [0]: expected a list of integers in 1..256"),
    ("lowrank_ranks = [257]", "lowrank_ranks = [257]: expected a list of integers in 1..256"),
    ("lowrank_ranks = [true]", "lowrank_ranks = [True]: expected a list of integers in 1..256"),
    ("float_option = 1", "float_option = 1: expected true or false"),
    ("float_option = 'yes'", "float_option = 'yes': expected true or false"),
    ("bits = 4", "unknown key 'bits' in [budget]"),
])
def test_bad_budget_values(line, message):
    with pytest.raises(RecipeError) as e:
        parse(f"[budget]\n# what --budget may choose\n{line}\n", "t.toml")
    assert str(e.value) == f"t.toml:3: {message}"


def test_budget_must_be_a_table():
    with pytest.raises(RecipeError) as e:
        parse("budget = [4]\n", "t.toml")
    assert str(e.value) == "t.toml:1: budget must be a table [budget]"


def test_each_schema_covers_its_dataclass():
    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}
    assert set(recipe._SETTINGS) == names(recipe.TensorSettings)
    assert set(recipe._KEEP_FLOAT) == names(KeepFloat)
    assert set(recipe._ENCODE) == names(recipe.EncodeSettings) - {"params"} | {"codec"} | names(recipe.EncodeParams)
    assert set(recipe._GPTQ) == names(GPTQSettings)
    assert set(recipe._BUDGET) == names(BudgetSettings)
