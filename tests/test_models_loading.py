"""Model loading from local folders (offline), fingerprints, devices, dtypes and errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from cwa.errors import (  # noqa: E402
    InvalidInput,
    ModelLoadError,
    UnsupportedArchitecture,
)
from cwa.models import loading  # noqa: E402
from cwa.models.loading import (  # noqa: E402
    DeviceUnavailable,
    LoadedModel,
    canonical_config_json,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)
from cwa.progress import RecordingReporter  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_tokenizer(folder: Path) -> None:
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(folder)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "gpt2",
        vocab_size=len(WORDS) + 3,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model = tiny_gpt2()
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder, model


def test_loads_local_folder_in_eval_mode_with_tokenizer(saved):
    folder, original = saved
    reporter = RecordingReporter()
    loaded = load_model(str(folder), attn_implementation="eager", reporter=reporter)
    assert isinstance(loaded, LoadedModel)
    assert not any(module.training for module in loaded.model.modules())
    assert (loaded.device, loaded.dtype, loaded.attn_implementation) == ("cpu", "float32", "eager")
    assert loaded.path == str(folder.resolve()) and loaded.ref == str(folder)
    assert loaded.arch.family == "gpt2" and loaded.arch.n_layers == 2
    assert loaded.tokenizer("w0 w5 w39")["input_ids"] == [3, 8, 42]
    ids = torch.tensor([[3, 8, 42, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)
    assert any("loading" in message for _, message in reporter.messages)


def test_fingerprint_same_weights_same_value_changed_weight_differs(saved):
    folder, original = saved
    first = load_model(str(folder), load_tokenizer=False)
    second = load_model(str(folder), attn_implementation="sdpa", load_tokenizer=False)
    assert first.tokenizer is None
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0
    # same weights: same fingerprint across loads, attention backends and the in-memory model
    assert first.fingerprint == second.fingerprint == model_fingerprint(original)
    # a different seed (other weights) or one changed weight: a different fingerprint
    assert model_fingerprint(tiny_gpt2(seed=1)) != first.fingerprint
    weight = dict(first.model.named_parameters())["transformer.h.1.mlp.c_fc.weight"]
    with torch.no_grad():
        old = weight[3, 7].clone()
        weight[3, 7] = torch.nextafter(old, old + 1)  # one ulp
        changed = model_fingerprint(first.model)
        weight[3, 7] = old
    assert changed != first.fingerprint
    assert model_fingerprint(first.model) == first.fingerprint


def test_fingerprint_definition_by_hand():
    """sha256 over canonical config JSON then, per parameter in name order, header + bytes."""
    model = tiny_gpt2()
    digest = hashlib.sha256(b"cwa-fingerprint-v1\0")
    digest.update(canonical_config_json(model).encode())
    for name, param in sorted(model.named_parameters()):
        digest.update(f"\0{name}\0float32\0{list(param.shape)}".encode())
        digest.update(param.detach().numpy().tobytes())  # little-endian float32, C order
    assert model_fingerprint(model) == digest.hexdigest()
    # provenance keys are not part of the identity
    data = json.loads(canonical_config_json(model))
    assert "transformers_version" not in data and "_name_or_path" not in data
    assert data["__class__"] == "GPT2LMHeadModel" and data["n_layer"] == 2


def test_fingerprint_streams_large_tensors_in_chunks(monkeypatch):
    model = tiny_gpt2()
    whole = model_fingerprint(model)
    from cwa.models import fingerprint

    monkeypatch.setattr(fingerprint, "_FINGERPRINT_CHUNK_ELEMENTS", 7)
    assert model_fingerprint(model) == whole


def test_dtypes(saved, tmp_path):
    folder, _ = saved
    bf16 = load_model(str(folder), dtype="bfloat16", load_tokenizer=False)
    assert bf16.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.fingerprint != load_model(str(folder), load_tokenizer=False).fingerprint
    # a half-precision checkpoint loads as float32 under auto on the CPU
    half_folder = tmp_path / "half"
    tiny_gpt2().to(torch.float16).save_pretrained(half_folder)
    assert load_model(str(half_folder), load_tokenizer=False).dtype == "float32"
    assert load_model(str(half_folder), dtype="fp16", load_tokenizer=False).dtype == "float16"
    assert (
        resolve_dtype("auto", torch.device("cuda"), AutoConfig.for_model("gpt2", dtype="bfloat16"))
        == torch.bfloat16
    )
    with pytest.raises(InvalidInput, match="unknown dtype"):
        load_model(str(folder), dtype="int3")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidInput, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")
        with pytest.raises(DeviceUnavailable):
            resolve_device("cuda:1")
    else:
        with pytest.raises(DeviceUnavailable, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_toy_refs_resolve_through_ensure_toy_model(saved, monkeypatch):
    folder, _ = saved
    calls: list[str] = []

    def fake_ensure_toy_model(variant: str = "gpt2", **kwargs) -> Path:
        calls.append(variant)
        return folder

    import cwa.toy

    monkeypatch.setattr(cwa.toy, "ensure_toy_model", fake_ensure_toy_model, raising=False)
    loaded = load_model("toy", load_tokenizer=False)
    assert loaded.ref == "toy" and loaded.path == str(folder)
    load_model("toy-llama", load_tokenizer=False)
    assert calls == ["gpt2", "llama"]


def test_missing_path_errors(tmp_path, saved):
    folder, _ = saved
    with pytest.raises(ModelLoadError, match="^no model folder at .*check the path"):
        load_model(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(ModelLoadError, match="no model folder at './nope'"):
        load_model("./nope")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load_model(str(folder / "config.json"))
    with pytest.raises(InvalidInput, match="empty model reference"):
        load_model("  ")


def test_hub_name_offline_says_so():
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/definitely-not-cached-model")
    message = str(info.value)
    assert "offline (HF_HUB_OFFLINE=1)" in message and "local model folder" in message
    assert "\n" not in message


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


def _hub_exception(cls: type) -> BaseException:
    error = cls.__new__(cls)  # skip the HTTP-response constructor
    Exception.__init__(error, "hub said no")
    return error


def test_hub_error_translation():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    unreachable = _chained(OSError("We couldn't connect"), socket.gaierror(-2, "Name unknown"))
    message = str(loading._hub_error("gpt2", unreachable, offline=False))
    assert "could not reach the Hugging Face hub" in message and "HF_HUB_OFFLINE=1" in message
    missing = _chained(OSError("x"), _hub_exception(RepositoryNotFoundError))
    assert "no model named 'org/x'" in str(loading._hub_error("org/x", missing, offline=False))
    gated = _chained(OSError("x"), _hub_exception(GatedRepoError))
    assert "gated" in str(loading._hub_error("meta/llama", gated, offline=False))


def test_not_a_causal_lm(tmp_path):
    AutoConfig.for_model("vit").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="'vit' model .*not a causal language"):
        load_model(str(tmp_path))


def test_unknown_or_remote_code_configs(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    auto_map = {"AutoConfig": "conf.MyConfig", "AutoModelForCausalLM": "mod.MyLM"}
    (remote / "config.json").write_text(json.dumps({"model_type": "my_lm", "auto_map": auto_map}))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(remote))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "my_lm"}))
    with pytest.raises(UnsupportedArchitecture, match="transformers cannot read this config"):
        load_model(str(unknown))
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "config.json").write_text("{}")
    with pytest.raises(UnsupportedArchitecture, match="no model_type"):
        load_model(str(untyped))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read as JSON"):
        load_model(str(broken))


def test_missing_weights_or_tokenizer(tmp_path):
    config_only = tmp_path / "config-only"
    tiny_gpt2().config.save_pretrained(config_only)
    with pytest.raises(ModelLoadError, match="needs model.safetensors"):
        load_model(str(config_only))
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_gpt2().save_pretrained(no_tokenizer)
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_model(str(no_tokenizer))
    assert load_model(str(no_tokenizer), load_tokenizer=False).tokenizer is None


def test_bad_attention_implementation(saved):
    folder, _ = saved
    with pytest.raises(InvalidInput, match="attention implementation 'bogus'"):
        load_model(str(folder), attn_implementation="bogus")


def test_llama_layout_loads_with_eager_and_gqa(tmp_path):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        bos_token_id=1,
        eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    loaded = load_model(str(tmp_path), attn_implementation="eager")
    assert loaded.arch.family == "llama" and loaded.arch.n_kv_heads == 2
    assert loaded.model.config._attn_implementation == "eager"
    # double backward works with eager attention (needed by Hessian-vector products)
    ids = torch.tensor([[3, 4, 5, 6]])
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    loss = loaded.model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), params[:1])
    assert torch.isfinite(hvp[0]).all()


def test_incomplete_or_mismatched_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    tiny_gpt2().save_pretrained(folder)
    save_tokenizer(folder)
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 weight.*c_fc.weight.*random"):
        load_model(str(folder))
    mismatched = tmp_path / "mismatched"
    tiny_gpt2().save_pretrained(mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["n_inner"] = 48  # MLP width no longer matches the stored tensors
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not fit its config"):
        load_model(str(mismatched), load_tokenizer=False)
