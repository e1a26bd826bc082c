import pytest

from kiban.encoders import InvalidInput, create_encoder
from kiban.fusion import IGNORE_INDEX, KibanProcessor, byte_tokenizer


@pytest.fixture(scope="module")
def processor():
    featurizers = {m: create_encoder(m, preset="tiny").featurizer for m in ("protein", "molecule")}
    return KibanProcessor(byte_tokenizer(), featurizers)


def _chat(user, answer="Aspirin."):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_loss_covers_assistant_tokens_only(processor):
    record = {"messages": _chat("Name <molecule>.", "Aspirin."), "inputs": {"molecule": ["CC(=O)Oc1ccccc1C(=O)O"]}}
    processed = processor.process(record)
    trained = [t for t, label in zip(processed.input_ids, processed.labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == "Aspirin.<|im_end|>\n"
    assert [m for m, _ in processed.features] == ["molecule"]
    assert sum(1 for t in processed.input_ids if t < 0) == 1


def test_placeholders_bind_in_order_across_turns(processor):
    record = {
        "messages": [
            {"role": "user", "content": "Compare <protein> and <protein>."},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": "Does <molecule> bind the first?"},
        ],
        "inputs": {"protein": ["MKTAYIAK", "MKV"], "molecule": "CCO"},
    }
    processed = processor.process(record, add_generation_prompt=True)
    assert [m for m, _ in processed.features] == ["protein", "protein", "molecule"]
    assert processed.features[0][1]["tokens"].numel() > processed.features[1][1]["tokens"].numel()
    text = processor.tokenizer.decode([t for t in processed.input_ids if t >= 0])
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": _chat("What is <protein>?"), "inputs": {}}, "placeholder <protein> number 1 has no input"),
        ({"messages": _chat("What is <molecule>?"), "inputs": {"molecule": ["CCO", "CCN"]}},
         "2 molecule input(s) but 1 <molecule> placeholder"),
        ({"messages": _chat("What is <cell>?"), "inputs": {"cell": [{}]}}, "this model has no cell encoder"),
        ({"messages": [], "inputs": {}}, "has no messages"),
        ({"messages": [{"role": "user"}], "inputs": {}}, "needs a string 'content'"),
        ({"messages": [{"role": "assistant", "content": "Hi."}], "inputs": {}}, "starts with an assistant message"),
    ],
)
def test_prompt_and_inputs_that_disagree_are_named(processor, record, message):
    with pytest.raises(InvalidInput, match="record") as error:
        processor.process({**record, "id": "record-7"})
    assert message in str(error.value) and "record-7" in str(error.value)
