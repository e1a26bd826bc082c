"""The property-condition encoder: bounds arrive as scaled numbers, one token per property, and a
condition it cannot read is refused by name (the registry tests cover shapes, masks and save/load).
"""

from __future__ import annotations

import math

import pytest
import torch

from kiban.design.conditions import PROPERTIES, parse_conditions
from kiban.encoders import InvalidInput, create_encoder
from kiban.encoders.properties import NAMES, SCALES


def test_one_token_per_property_in_the_conditions_order():
    assert NAMES == tuple(p.name for p in PROPERTIES.values())


def test_bounds_are_flagged_and_scaled_and_open_ends_are_zero():
    featurizer = create_encoder("properties", preset="tiny").featurizer
    values = featurizer("logP 1 to 3, MW at most 450, QED > 0.6")["values"]
    assert values.shape == (len(NAMES), 5)
    logp, mw, qed = (values[NAMES.index(n)] for n in ("logP", "MW", "QED"))
    centre, scale = SCALES["logP"]
    assert logp.tolist() == pytest.approx([1, 1, (1 - centre) / scale, 1, (3 - centre) / scale])
    centre, scale = SCALES["MW"]
    assert mw.tolist() == pytest.approx([1, 0, 0, 1, (450 - centre) / scale])
    centre, scale = SCALES["QED"]
    assert qed.tolist() == pytest.approx([1, 1, (0.6 - centre) / scale, 0, 0])
    asked = {NAMES.index(n) for n in ("logP", "MW", "QED")}
    assert all(values[i].abs().sum() == 0 for i in range(len(NAMES)) if i not in asked)
    # the same conditions as Condition objects, as text in the records' own wording, or in any order
    conditions = parse_conditions("logP 1-3, MW < 450, QED > 0.6")
    assert torch.equal(featurizer(conditions)["values"], values)
    assert torch.equal(featurizer(", ".join(c.text() for c in reversed(conditions)))["values"], values)
    assert featurizer("MW at least 100000")["values"][NAMES.index("MW"), 2] == 8.0  # clipped
    assert featurizer("")["values"].abs().sum() == 0  # nothing asked


def test_different_bounds_give_different_tokens_and_unasked_properties_the_same():
    torch.manual_seed(0)
    encoder = create_encoder("properties", preset="tiny").eval()
    with torch.no_grad():
        low, high = encoder.encode(["MW at most 200", "MW at least 500"]).embeddings
    mw = NAMES.index("MW")
    assert not torch.allclose(low[mw], high[mw])
    others = [i for i in range(len(NAMES)) if i != mw]
    assert torch.allclose(low[others], high[others])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("potency > 3", r"invalid properties input 'potency > 3'.*unknown property 'potency'"),
        ("MW about 3", r"'MW about 3' is not written like"),
        ("logP 3-1", r"the interval is empty"),
        (42, r"expected conditions as text .* got int"),
    ],
)
def test_an_unreadable_condition_is_refused_by_name(item, message):
    featurizer = create_encoder("properties", preset="tiny").featurizer
    with pytest.raises(InvalidInput, match=message):
        featurizer(item, item_id=item if isinstance(item, str) else "record 7")


def test_a_record_binds_conditions_to_a_properties_placeholder():
    from kiban.design.molecules import design_record
    from kiban.tiny import tiny_model

    model = tiny_model(["properties"], seed=0)
    conditions = parse_conditions("logP 1-3, MW < 450")
    record = design_record(conditions, properties=True)
    assert record["inputs"] == {"properties": ["logP 1 to 3, MW at most 450"]}
    batch = model.prepare([{**record, "messages": record["messages"] + [{"role": "assistant", "content": "[C]"}]}])
    assert (batch.input_ids < 0).sum().item() == 1  # one slot, filled with one token per property
    assert math.isfinite(model(batch).loss.item())
    assert "inputs" not in design_record(properties=True)  # nothing asked: the plain prompt
