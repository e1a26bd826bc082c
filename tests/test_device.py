"""``--device``: what each text selects, the one-line error for a device that is not there (in every
command that runs the model), and a model placed in bfloat16 (what a GPU gets) serving the same
answers as in float32 — run here on the CPU, whose bf16 kernels take the same code path.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from kiban.cli import main
from kiban.device import DeviceError, Placement, place_model, resolve_device
from kiban.tasks import HeadConfig, PooledHead
from kiban.tiny import tiny_model

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_without_a_gpu_select_the_cpu_in_float32():
    assert resolve_device("cpu") == Placement(torch.device("cpu"), torch.float32)
    assert resolve_device(" CPU ") == Placement(torch.device("cpu"), torch.float32)
    if NO_CUDA:
        assert resolve_device("auto") == Placement(torch.device("cpu"), torch.float32)
    else:
        placement = resolve_device("auto")
        assert placement.device.type == "cuda"
        native_bf16 = torch.cuda.get_device_capability(placement.device)[0] >= 8  # not emulated
        assert placement.dtype == (torch.bfloat16 if native_bf16 else torch.float32)


@pytest.mark.parametrize("text", ["tpu", "gpu", "cpu:1", "cuda:", "cuda:x", "", "auto:0"])
def test_a_text_that_names_no_device_is_refused_with_the_choices(text):
    with pytest.raises(DeviceError, match=r"is not a device; use one of auto\|cpu\|cuda\|cuda:N"):
        resolve_device(text)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_says_so_and_names_the_alternative(text):
    with pytest.raises(DeviceError) as error:
        resolve_device(text)
    message = str(error.value)
    assert message.startswith(f"--device {text}: no CUDA device here") and "use --device cpu" in message
    assert "\n" not in message


@pytest.mark.skipif(NO_CUDA, reason="needs a GPU")
def test_a_gpu_index_past_the_last_one_names_the_ones_there():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


MISSING = "cuda" if NO_CUDA else f"cuda:{torch.cuda.device_count()}"
COMMANDS = {
    "serve": ["serve", "no-such-model-dir"],
    "finetune": ["finetune", "toxicity", "--data", "no-such.csv"],
    "predict": ["predict", "no-such-head", "--data", "no-such.csv"],
    "embed": ["embed", "no-such.h5ad"],
    "variants": ["variants", "--wild-type", "MKT", "--variants", "no-such.csv"],
    "quickstart": ["quickstart", "--out", "no-such-run", "--model", "tiny"],
    "evaluate": ["evaluate", "no-such-model-dir"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_model_command_refuses_a_missing_device_in_one_line_before_any_work(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*COMMANDS[name], "--device", MISSING]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kiban {name}: error: --device {MISSING}:"), err
    assert "\n" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_place_model_casts_weights_and_keeps_integer_buffers():
    model = tiny_model(["protein"], seed=0)
    integer = {n: b.dtype for n, b in model.named_buffers() if not b.is_floating_point()}
    place_model(model, Placement(torch.device("cpu"), torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in model.named_buffers() if not b.is_floating_point()} == integer


def test_a_bfloat16_engine_serves_the_float32_answers():
    """The server keeps the model in its placement's dtype; every modality's features are cast to
    the encoder's dtype, the head reads bf16 states, and the vectors stay close to float32's.
    """
    from kiban.serve import InferenceEngine

    items = [("protein", "MKTAYIAKQRQISFVKSHFSRQ"), ("molecule", "CC(=O)Oc1ccccc1C(=O)O"), ("text", "p53")]
    record = {
        "messages": [{"role": "user", "content": "Does <protein> bind <molecule>?"}],
        "inputs": {"protein": ["MKTAYIAKQR"], "molecule": ["CCO"]},
    }

    async def answers(placement):
        model = tiny_model(["protein", "molecule"], seed=0).eval()
        torch.manual_seed(1)
        head = PooledHead(
            HeadConfig(task="tox", modality="molecule", kind="classification", labels=["no", "yes"], input_dim=32)
        ).eval()
        engine = InferenceEngine(model=model, heads={"tox": head}, placement=placement)
        await engine.start()
        try:
            assert {p.dtype for p in engine.model.parameters()} == {placement.dtype}
            vectors = await engine.embed(items)
            predicted = await engine.predict("tox", ["CC(=O)Oc1ccccc1C(=O)O", "CCO"])
            completion = await engine.generate(record, max_tokens=4)
        finally:
            await engine.stop()
        return vectors.float(), predicted, completion

    full, predicted_full, completion_full = asyncio.run(answers(resolve_device("cpu")))
    half, predicted_half, completion_half = asyncio.run(
        answers(Placement(torch.device("cpu"), torch.bfloat16))
    )
    assert half.shape == full.shape
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.99
    for a, b in zip(predicted_full, predicted_half):
        assert a["probabilities"].keys() == b["probabilities"].keys()
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) < 0.05
    assert completion_half.completion_tokens >= 1 and completion_full.completion_tokens >= 1


def test_a_model_is_placed_then_quantised_and_serves_close_to_float(tmp_path):
    """``--device`` with ``--quantize``: the weights reach the device (bfloat16, as on a GPU) before
    they are quantised (on the CPU into kiban's int8 layers, on CUDA by torchao), so the backbone's
    linears hold int8 weights, everything else is in the placement's dtype, and the engine's
    vectors stay close to the float32 model's. (Decoder layer 0 stays float, in bfloat16.)
    """
    from kiban.adapt.qlinear import Int8Linear
    from kiban.adapt.quantize import load_model
    from kiban.serve import InferenceEngine

    tiny_model(["protein"], seed=0).save_pretrained(tmp_path / "model")
    bf16 = Placement(torch.device("cpu"), torch.bfloat16)
    model = load_model(tmp_path / "model", quantize="int8", placement=bf16)
    # every linear is quantised but decoder layer 0's (kiban.adapt.quantize.DEFAULT_FLOAT_LAYERS),
    # which stays in the placement's dtype
    kept = [name for name, m in model.llm.named_modules() if isinstance(m, torch.nn.Linear)]
    assert kept and all(name.startswith("model.layers.0.") for name in kept)
    quantised = [m for m in model.llm.modules() if isinstance(m, Int8Linear)]
    assert quantised and all(m.weight.dtype == torch.int8 for m in quantised)
    others = [p for p in model.parameters() if p.is_floating_point()]
    assert others and {p.dtype for p in others} == {torch.bfloat16}

    async def vectors(**engine_options):
        engine = InferenceEngine(model_dir=tmp_path / "model", **engine_options)
        await engine.start()
        try:
            await engine.wait_ready()
            assert getattr(engine.model, "quantization", None) == engine_options.get("quantize")
            return (await engine.embed([("protein", "MKTAYIAKQRQISFVKSHFSRQ")])).float()
        finally:
            await engine.stop()

    full = asyncio.run(vectors())
    quantised = asyncio.run(vectors(placement=bf16, quantize="int8"))
    assert torch.nn.functional.cosine_similarity(quantised, full).min() > 0.98
