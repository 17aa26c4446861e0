"""The one block walk against two oracles: the built model's parameters, and the costs
the pre-walk code computed (``pre_walk_costs.json``: parameter count, FLOPs, the digest of
the parameter names and shapes, and the latency table's per-block FLOPs at batch 2, for 21
configs, written by the code before :mod:`engine.model.blocks` existed)."""

import hashlib
import json
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from engine.config import UNetConfig
from engine.model import latency
from engine.model.blocks import walk
from engine.model.cost import block_layers, flops, param_count
from engine.model.unet import UNet

RECORDED = json.loads((Path(__file__).parent / "pre_walk_costs.json").read_text())


def built_params(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(UNet(cfg).parameters())}


def digest(shapes: dict[str, tuple[int, ...]]) -> str:
    lines = "\n".join(f"{k}:{'x'.join(map(str, s))}" for k, s in sorted(shapes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize("case", range(len(RECORDED)))
def test_each_block_prices_exactly_the_weights_built_at_its_path(case):
    cfg = UNetConfig(**RECORDED[case]["config"])
    shapes = built_params(cfg)
    owned: set[str] = set()
    for block in walk(cfg):
        keys = {k for k in shapes if any(k.startswith(f"{p}.") for p in block.prefixes)}
        assert keys and not keys & owned, block.path
        owned |= keys
        built = sum(_size(shapes[k]) for k in keys)
        assert built == sum(layer.params for layer in block_layers(cfg, block)), block.path
    assert owned == set(shapes)  # every weight belongs to exactly one block


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("case", range(len(RECORDED)))
def test_costs_and_parameter_layout_match_the_pre_walk_code(case):
    rec = RECORDED[case]
    cfg = UNetConfig(**rec["config"])
    assert param_count(cfg) == rec["param_count"]
    assert flops(cfg) == rec["flops"]
    assert digest(built_params(cfg)) == rec["param_digest"]  # checkpoints still load
    assert [latency.block_flops(cfg, b, 2) for b in walk(cfg)] == rec["block_flops_batch2"]


def test_decoder_blocks_read_the_encoder_skips_in_reverse():
    cfg = UNetConfig(image_size=8, base_width=8, width_mults=(1, 2), num_res_blocks=2,
                     norm_groups=4, attn_levels=(1,), head_dim=8)
    blocks = walk(cfg)
    # Pushed: conv_in, two level-0 blocks, the downsample, two level-1 blocks.
    read = [tuple(b.ins[1]) for b in blocks if b.stage == "up" and b.kind == "res"]
    assert read == [("L1", 16), ("L1", 16), ("L0", 8), ("L0", 8), ("L0", 8), ("in", 8)]
    assert [b.cin for b in blocks if b.stage == "up" and b.kind == "res"] == [
        32, 32, 24, 24, 16, 16]  # the first block of level 0 reads the upsampled level 1
    assert [b.res for b in blocks if b.kind == "res"] == [8, 8, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8]
    assert [b.path for b in blocks if b.kind == "attn"] == [
        "down.1.attns.0", "down.1.attns.1", "mid_attn.0",
        "up.0.attns.0", "up.0.attns.1", "up.0.attns.2"]
