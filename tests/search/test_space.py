"""Search-space files: presets, decoding into configs, and errors that name line and key."""

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from engine.config import Config
from search.space import load_space, parse_space, presets
from search.space_toml import SpaceError


@pytest.mark.parametrize("name", ["smoke", "demo", "mac"])
def test_presets_decode_to_configs(name):
    space = load_space(name)
    dists = space.distributions()
    assert dists and all("." in key for key in dists)
    first = {k: d.to_external_repr(0) if isinstance(d, CategoricalDistribution) else
             (int(d.low) if isinstance(d, IntDistribution) else d.low) for k, d in dists.items()}
    config = space.decode(first)
    assert isinstance(config, Config)
    assert config.unet.image_size == space.data.image_size
    rungs = space.rungs.steps(config.train.steps)
    assert rungs[-1] == config.train.steps and list(rungs) == sorted(set(rungs))
    assert {"smoke", "demo", "mac"} <= set(presets())



def test_the_demo_preset_is_a_ten_minute_search_of_architectures_and_schedules():
    space = load_space("demo")
    fixed = {p.name: p.value for p in space.params if not p.searched}
    assert (space.study.trials, space.study.pruner, space.data.dataset, space.data.image_size,
            space.evaluate.fid_samples) == (2, "none", "digits", 16, 200)
    assert (fixed["train.steps"], fixed["train.batch_size"]) == (600, 32)
    assert (fixed["unet.width_mults"], fixed["train.lr_decay"]) == ([1, 2, 2], "cosine")
    assert space.rungs.steps(fixed["train.steps"]) == (300, 600)
    dists = space.distributions()
    assert {"schedule.sampler", "schedule.steps", "schedule.spacing"} <= set(dists)
    assert dists["schedule.steps"].low >= 8  # fewer sampler steps cost legibility
    # class-conditional and always guided: 0.88-0.975 legible at 800 steps, 0.615 without
    assert fixed["unet.num_classes"] == 10 and dists["schedule.guidance"].low > 1


def test_list_choices_round_trip_through_optuna():
    space = parse_space("""
[unet]
width_mults = { choice = [[1, 2], [1, 2, 2]] }
attn_levels = { choice = [[], [1]] }
""")
    dist = space.distributions()["unet.width_mults"]
    assert dist.choices == ("[1, 2]", "[1, 2, 2]")
    config = space.decode({"unet.width_mults": "[1, 2, 2]", "unet.attn_levels": "[1]"})
    assert config.unet.width_mults == (1, 2, 2) and config.unet.attn_levels == (1,)


def test_ranges_become_int_and_float_distributions():
    space = parse_space("""
[schedule]
steps = { int = [4, 16], log = true }
[train]
learning_rate = { float = [1e-4, 1e-2], log = true }
batch_size = { int = [16, 64], step = 16 }
""")
    d = space.distributions()
    assert d["schedule.steps"] == IntDistribution(4, 16, log=True)
    assert d["train.learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["train.batch_size"] == IntDistribution(16, 64, step=16)


def test_fingerprint_ignores_only_the_trial_target():
    base = load_space("smoke")
    more = parse_space(base.source.replace("trials = 4", "trials = 40"))
    other = parse_space(base.source.replace("batch_size = 8", "batch_size = 16"))
    assert base.fingerprint() == more.fingerprint() != other.fingerprint()


@pytest.mark.parametrize("text, expected", [
    ("[unet]\nbase_widht = 16\n",
     "x.toml:2: [unet] unknown key 'base_widht' (did you mean 'base_width'?)"),
    ("[unet]\n\nactivation = { choice = ['relu', 'tanh'] }\n",
     "x.toml:3: [unet] activation: value 'tanh': never gives a valid config"),
    ("[study]\ntrials = 'many'\n", "x.toml:2: [study] trials: expected int"),
    ("[study]\ntrials = 0\n", "x.toml:2: [study] trials: must be >= 1"),
    ("[evaluate]\nlatency_rounds = 0\n", "x.toml:2: [evaluate] latency_rounds: must be in 1..20"),
    ("[schedule]\nsteps = { int = [9, 2] }\n", "x.toml:2: [schedule] steps: low 9 is above high 2"),
    ("[train]\nlearning_rate = { float = [0.0, 1.0], log = true }\n",
     "x.toml:2: [train] learning_rate: log ranges need low > 0"),
    ("[unet]\nimage_size = 8\n", "[unet] unknown key 'image_size' (set it in [data])"),
    ("[optimizer]\nlr = 1\n", "x.toml:1: unknown table [optimizer]"),
    ("[unet\n", "x.toml: invalid TOML"),
    ("[unet]\nbase_width = { choice = [] }\n", "base_width: choice must be a non-empty list"),
    ("[unet]\nbase_width = { pick = [8] }\n", "needs exactly one of choice, int or float"),
    ("[study]\nsampler = 'cmaes'\n", "x.toml:2: [study] sampler: must be one of tpe, nsga2"),
    ("[unet]\nattn_levels = { choice = [[], [3]] }\n", "attn_levels: value [3]: never gives"),
    ("[unet]\nbase_width = 16\n[train]\nsteps = 100\nlr_decay = 'cosin'\n",
     "x.toml:5: [train] lr_decay: never gives a valid config (TrainConfig.lr_decay='cosin'"),
])
def test_invalid_files_name_line_and_key(text, expected):
    with pytest.raises(SpaceError) as err:
        parse_space(text, origin="x.toml")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_lists_presets(tmp_path):
    with pytest.raises(SpaceError, match="no such space file or preset.*smoke"):
        load_space(tmp_path / "nope.toml")


@pytest.mark.parametrize("text", ["", "[study]\ntrials = 3\n[data]\nimage_size = 8\n",
                                  "[unet]\nbase_width = 8\n"])
def test_a_file_that_searches_nothing_is_refused(tmp_path, text):
    path = tmp_path / "nothing.toml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=f"^{path}: searches nothing"):
        load_space(path)
    parse_space(text)  # as text (a stored study's, a test's settings), it is no error


@pytest.mark.parametrize(("value", "expected"), [
    ("{ choice = [1e9] }", "base_width: value 1000000000.0: never gives a valid config"),
    ("{ choice = [8, true] }", "base_width: value True: UNetConfig.base_width: expected int"),
    ("{ choice = [8, 12.5] }", "base_width: value 12.5: UNetConfig.base_width: expected int"),
    ("{ float = [8, 16] }", "base_width: a float range on an integer field"),
    ("{ int = [8, 4096] }", "base_width: value 4096: never gives a valid config"),
    ('"16"', "base_width: UNetConfig.base_width: expected int, got '16'"),
])
def test_searched_values_are_typed_and_sized_like_configs(value, expected):
    with pytest.raises(SpaceError, match=r"x.toml:2: \[unet\] ") as err:
        parse_space(f"[unet]\nbase_width = {value}\n", origin="x.toml")
    assert expected in str(err.value)
