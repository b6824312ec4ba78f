"""Shared fixtures: a tiny randomly initialised Llama (fast) and the real bundled target (slow)."""
from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from scylla.models import Target

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SCYLLA_COMPILE", "0")   # the q4 compile costs 30-110 s a process; one test turns it on


def tiny_llama(vocab: int = 96, layers: int = 4, hidden: int = 32, max_pos: int = 256, seed: int = 0,
               init_range: float = 0.2, eos: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_pos, initializer_range=init_range,
                      bos_token_id=1, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()  # float64: no near-tie flips in equality tests
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=0, bos_token_id=1)
    return model


def tiny_target(**kwargs) -> Target:
    return Target(tiny_llama(**kwargs), tokenizer=None, name="tiny-llama", quant="none", device="cpu")


@pytest.fixture
def tiny():
    return tiny_target()


@pytest.fixture(scope="session")
def tiny_chat_target_dir(tmp_path_factory):
    """A 4-layer random Llama saved with the real SmolLM2 tokenizer and chat template (4: the
    shared prefill keeps hidden states of layers 2 and n - 3)."""
    from transformers import AutoTokenizer

    from scylla.models import ensure_bundled_cached

    src = ensure_bundled_cached()  # setup.sh has done it; otherwise this caches it now
    out = tmp_path_factory.mktemp("tiny-chat-target")
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def real_target():
    """The fp32 reference (--quant none): what transformers' generate() runs too."""
    from scylla.models import load_target

    return load_target(quant="none")


@pytest.fixture(scope="session")
def real_q4_target(real_target):
    """The default: the same model, its linears from the GGUF's own blocks on the int4 kernel."""
    from scylla.models import Target, gguf_of

    t = real_target
    return Target(t.model, t.tokenizer, t.name, "q4", t.device, "lean", gguf_of("smollm2"))


# ---------------------------------------------------------------- e2e: a real server and Chromium
# (Streamlit's own e2e conftest does the same: start `streamlit run`, poll /_stcore/health,
# then wait for the app's script to stop running before asserting.)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def wait_for(condition, timeout_s: float = 30.0, every_s: float = 0.02) -> bool:
    """Poll until condition() holds; False after timeout_s. Waits on background work
    are generous: a loaded CI machine starts threads and processes slowly."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc, timeout_s: float = 90.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit not healthy after {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def e2e_db(tmp_path_factory):
    """A temporary copy of the committed store (SCYLLA_DB), so the committed file never changes."""
    import shutil

    from scylla import store

    db = tmp_path_factory.mktemp("e2e-store") / "results.duckdb"
    if (REPO_ROOT / "results.duckdb").is_file():
        shutil.copy(REPO_ROOT / "results.duckdb", db)
    store.init_db(db)
    return db


@contextlib.contextmanager
def streamlit_process(launcher: list[str], db, logs, **env_extra):
    """`<launcher> run app.py` on 127.0.0.1:<free port> against store `db`; yields the URL
    once /_stcore/health answers, and stops the server after."""
    import subprocess

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SCYLLA_DB=str(db), SCYLLA_RUNS_DIR=str(logs / "runs"),
               PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error", **env_extra)
    log = open(logs / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [*launcher, "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def streamlit_server(e2e_db, tmp_path_factory):
    """`streamlit run app.py` on 127.0.0.1:<free port>; yields the base URL."""
    import sys

    with streamlit_process([sys.executable, "-m", "scylla.serve"], e2e_db,
                           tmp_path_factory.mktemp("e2e-server")) as url:
        yield url


@pytest.fixture(scope="session")
def chromium():
    if not os.path.exists(CHROMIUM):
        # CI installs Chromium, so there a missing browser is a failure, not a skip
        if os.environ.get("SCYLLA_STRICT"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright import sync_api
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    yield pg
    context.close()
