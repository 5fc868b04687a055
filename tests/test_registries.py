"""Each method family is named once (a Literal in params.py) and dispatched through one table that holds exactly
those names; an unknown name's error lists the known ones."""
from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from fusesoup import params
from fusesoup.align.vocab_map import VOCAB_MAPS
from fusesoup.bootstrap import ARCHITECTURES
from fusesoup.errors import StageError, lookup
from fusesoup.fusion import FUSE_METHODS, source_weights
from fusesoup.soup.learn import GROUPINGS, group_of
from fusesoup.soup.recipes import STRATEGIES
from fusesoup.train.engine import ENGINES
from fusesoup.train.loss import FUSION_LOSSES

REGISTRIES = [(params.Architecture, ARCHITECTURES), (params.VocabMethod, VOCAB_MAPS),
              (params.FuseMethod, FUSE_METHODS), (params.FusionLoss, FUSION_LOSSES), (params.Engine, ENGINES),
              (params.SoupStrategy, STRATEGIES), (params.Granularity, GROUPINGS)]


@pytest.mark.parametrize("names, table", REGISTRIES, ids=[str(get_args(names)[0]) for names, _ in REGISTRIES])
def test_every_table_holds_exactly_its_family(names, table):
    assert tuple(table) == get_args(names)


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(StageError, match=r"^unknown fuse.method 'max_ce'; known: min_ce, avg_ce, min_ce_token, "
                                         r"avg_ce_token$"):
        source_weights(np.zeros((2, 3)), "max_ce")
    with pytest.raises(StageError, match=r"^unknown soup.granularity 'block'; known: model, layer, module$"):
        group_of("model.layers.0.mlp.up_proj.weight", "block")
    assert lookup({"a": 1}, "a", "thing") == 1


def test_params_refuse_a_name_outside_the_family(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((Path(__file__).parents[1] / "params.yaml").read_text().replace(
        "method: min_ce ", "method: max_ce "))
    with pytest.raises(params.ParamsError, match="fuse.method"):
        params.load_params(path)
